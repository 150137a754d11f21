"""The metrics repository: rollups over a window, the raw request log page by page, HTTP
metrics, and the public ids reports show instead of internal ones.

Invariants:
- a window is read from day rollups for the whole days inside it, hour rollups for the
  whole hours at its edges (or a day row less the fewer hours outside the window), and
  the raw log only for the parts of hours it starts and ends in (``store.edges``), so a
  30-day report reads ~30 day rows and at most 24 hour rows per series, and at most half
  an hour of raw rows at each end;
- the request log is paged by ``id`` descending (commit order); a cursor is the public id
  of the row that ended the previous page, so pages are stable while new rows arrive and
  no internal id, which would tell how many requests everyone made, ever leaves;
- callers that are not admins are always filtered to their own user id by the API; this
  module applies whatever filters it is given.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy
from sqlalchemy import Row, case, func, select

from parley.domain.rollup import DAY, HOUR, Dims, Tally, by_model, model_level
from parley.errors import InvalidRequest
from parley.store import edges, rollups
from parley.store.edges import ceil_day, floor_day
from parley.store.schema import api_keys, http_metrics, request_log, users

# Request-log columns a listing may filter on (rollup dimensions have the same names).
LOG_FILTERS = ("user_id", "api_key_id", "provider", "model", "origin", "success", "error_type")


@dataclass(frozen=True, slots=True)
class Counted:
    """Rollup-shaped rows counting exactly [start, end), the window that was counted."""

    start: datetime
    end: datetime
    rows: list[edges.Row]


@dataclass(frozen=True, slots=True)
class LogPage:
    rows: list[dict[str, Any]]
    next_cursor: str | None


class MetricsStore:
    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    def window(
        self,
        start: datetime,
        end: datetime,
        filters: Mapping[str, Any],
        group_by: Sequence[str] = (),
        *,
        days: bool = True,
    ) -> Counted:
        """Tallies of exactly [start, end): rollups for whole hours (and, with ``days``,
        whole days), the raw log for the parts of hours at its edges (``store.edges``);
        model-level rows when the grouping and filters need nothing finer. Each row is
        at the start of its hour or day. An edge whose raw rows retention pruned is
        rounded out to its whole hour: ``Counted`` says which window was counted."""
        level = model_level([*filters, *group_by])
        hour, day = (by_model(HOUR), by_model(DAY)) if level else (HOUR, DAY)
        with edges.snapshot(self._engine) as conn:
            span = edges.raw_span(conn)
            chosen = edges.plan(start, end, span, lambda h: edges.complete(conn, h, span))
            lo, hi = chosen.rollup_start, chosen.rollup_end
            rows: list[edges.Row] = []
            less: list[edges.Row] = []
            hours = [(lo, hi, 1)] if lo < hi else []
            read_days = None
            if days and lo < hi:
                # Whole days from day rows; a day the window covers in part, by its shorter
                # side too: its hours inside, or the day less its hours outside.
                net_days, hours = edges.sides(lo, hi, edges.DAY, floor_day, _rollup_hours())
                first = min([ceil_day(lo), *net_days])
                last = max([floor_day(hi), *(d + edges.DAY for d in net_days)])
                if first < last:
                    read_days = (first, last)
                    rows += rollups.rows_between(conn, day, first, last, filters)
            for a, b, sign in hours:
                found = rollups.rows_between(conn, hour, a, b, filters)
                (rows if sign > 0 else less).extend(found)
            rows = edges.counted_rows(conn, chosen, rows, less, read_days, filters, level)
        return Counted(chosen.start, chosen.end, rows)

    def period(
        self,
        period: str,
        start: datetime,
        end: datetime,
        filters: Mapping[str, Any],
        group_by: Sequence[str] = (),
    ) -> list[tuple[datetime, Dims, Tally]]:
        """Rows of ``period`` (HOUR or DAY; their model-level twin when enough)."""
        if model_level([*filters, *group_by]):
            period = by_model(period)
        with self._engine.connect() as conn:
            return list(rollups.rows_between(conn, period, start, end, filters))

    def raw(
        self, start: datetime, end: datetime, filters: Mapping[str, Any]
    ) -> Iterator[dict[str, Any]]:
        """Raw request-log rows in [start, end): for buckets finer than an hour."""
        query = _filtered(
            select(request_log).where(
                request_log.c.created_at >= start, request_log.c.created_at < end
            ),
            filters,
        )
        with self._engine.connect() as conn:
            for row in conn.execute(query):
                yield dict(row._mapping)

    def requests_page(
        self,
        filters: Mapping[str, Any],
        *,
        start: datetime | None,
        end: datetime | None,
        cursor: uuid.UUID | None,
        limit: int,
    ) -> LogPage:
        """A page of rows, last committed first; ``cursor``: the public id of the row
        that ended the previous page (``InvalidRequest`` when no row has it)."""
        query = _filtered(select(request_log), filters)
        if start is not None:
            query = query.where(request_log.c.created_at >= start)
        if end is not None:
            query = query.where(request_log.c.created_at < end)
        with self._engine.connect() as conn:
            if cursor is not None:
                last = conn.execute(
                    select(request_log.c.id).where(request_log.c.public_id == cursor)
                ).scalar()
                if last is None:
                    raise InvalidRequest(
                        "'cursor' must be a page's next_cursor (or its request was pruned "
                        "by retention since: start again from the first page)",
                        "cursor",
                    )
                query = query.where(request_log.c.id < last)
            query = query.order_by(request_log.c.id.desc()).limit(limit + 1)
            found = [dict(r._mapping) for r in conn.execute(query)]
        more = len(found) > limit
        found = found[:limit]
        return LogPage(found, str(found[-1]["public_id"]) if more and found else None)

    def http_tallies(
        self, start: datetime, end: datetime, user_id: int | None
    ) -> Sequence[Row[str, str, int, int, int, float]]:
        """The HTTP metrics of [start, end) added up by the database: per route template,
        method and latency bin (``histogram.bin_of``'s), the request count, the 5xx count
        and the summed response time, so the report never loads the rows themselves."""
        t = http_metrics.c
        latency_bin = edges.sql_bin(t.response_time_ms, self._engine.dialect.name != "sqlite")
        query = select(
            t.endpoint,
            t.method,
            latency_bin.label("bin"),
            func.count().label("n"),
            func.sum(case((t.status_code >= 500, 1), else_=0)).label("server_errors"),
            func.sum(t.response_time_ms).label("total_ms"),
        ).where(t.created_at >= start, t.created_at < end)
        if user_id is not None:
            query = query.where(t.user_id == user_id)
        query = query.group_by(t.endpoint, t.method, latency_bin)
        with self._engine.connect() as conn:
            return conn.execute(query).all()

    def public_ids(
        self, user_ids: set[int], key_ids: set[int]
    ) -> tuple[dict[int, uuid.UUID], dict[int, uuid.UUID]]:
        """Public ids of the users and API keys a report names."""
        with self._engine.connect() as conn:
            user_map = (
                {
                    r.id: r.public_id
                    for r in conn.execute(
                        select(users.c.id, users.c.public_id).where(users.c.id.in_(user_ids))
                    )
                }
                if user_ids
                else {}
            )
            key_map = (
                {
                    r.id: r.public_id
                    for r in conn.execute(
                        select(api_keys.c.id, api_keys.c.public_id).where(
                            api_keys.c.id.in_(key_ids)
                        )
                    )
                }
                if key_ids
                else {}
            )
        return user_map, key_map

    def internal_id(self, table: str, public_id: uuid.UUID) -> int | None:
        t = users if table == "users" else api_keys
        with self._engine.connect() as conn:
            found = conn.execute(select(t.c.id).where(t.c.public_id == public_id)).scalar()
        return int(found) if found is not None else None


def _rollup_hours() -> tuple[datetime, datetime]:
    """The hours that may hold rollup rows: any before now (rollups are kept forever; the
    raw log's span would not do, as retention prunes it)."""
    return datetime.min.replace(tzinfo=UTC), datetime.now(UTC)


def _filtered(query: Any, filters: Mapping[str, Any]) -> Any:
    for name, value in filters.items():
        column = request_log.c[name]
        query = query.where(
            column.in_(value) if isinstance(value, list | tuple) else column == value
        )
    return query
