"""Exact window edges: the part of an hour a window covers, counted from the raw log in SQL.

Rollups count whole hours and days. A window ``[start, end)`` that starts or ends inside an
hour (a "last 30 days" from now always does) counts the part of that hour inside it from
the raw request log, added up by the database into the same tallies as the rollups
(``Dims`` and ``Tally``), so reports merge them as they merge rollup rows.

Invariants:
- whole hours and days come from the rollups only, never from a scan of the raw log;
- an edge hour reads its shorter side (``plan``): the raw rows inside the window or, when
  fewer minutes of raw rows lie outside it, the hour's rollup less the raw rows outside
  (counts, sums and histogram bins subtract exactly). Minutes before the oldest or after
  the newest raw row hold no rows, so they cost nothing: the hour a "last N days" window
  ends in is its rollup less nothing;
- an edge hour of which retention pruned any raw row is counted whole from its rollup,
  and the window reported as counted is rounded out to it;
- rollups and raw rows are read in one snapshot (``snapshot``): a commit between two reads
  could otherwise make a subtraction take out rows its rollup never counted;
- raw values are binned in SQL with ``histogram.bin_of``'s formula and ``GUARD``, in
  the same single pass that adds up the counts and sums per series (``edge_query``);
  the reads go through the index on ``request_log.created_at`` (or a user's or key's index
  on (id, created_at) when the report is filtered by one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy
from sqlalchemy import Float, Integer, String, and_, case, cast, func, literal, null, or_, select

from parley.domain import histogram
from parley.domain.rollup import MODEL_HOUR, Dims, Tally
from parley.domain.times import utc
from parley.store.schema import metric_rollups, request_log

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

Row = tuple[datetime, Dims, Tally]
# A raw part of an edge hour, [lo, hi), and whether it is added (1) or taken out (-1).
Piece = tuple[datetime, datetime, int]


@dataclass(frozen=True, slots=True)
class Plan:
    """How to count a window: rollups of [rollup_start, rollup_end), less or plus pieces."""

    start: datetime  # the window counted (rounded out where the raw rows were pruned)
    end: datetime
    rollup_start: datetime
    rollup_end: datetime
    # Edge hours read whole from the rollups, less their raw rows outside the window.
    net_hours: frozenset[datetime]
    pieces: tuple[Piece, ...]


@contextmanager
def snapshot(engine: sqlalchemy.Engine) -> Iterator[sqlalchemy.Connection]:
    """A connection whose reads all see one state of the database: on SQLite the engine's
    ``BEGIN`` (WAL: fixed at the first read), on PostgreSQL a REPEATABLE READ transaction."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def plan(
    start: datetime,
    end: datetime,
    span: tuple[datetime, datetime] | None,
    kept: Callable[[datetime], bool],
) -> Plan:
    """The reads that count [start, end) exactly. ``span``: the oldest and newest raw
    row (None: none); ``kept(hour)``: whether every raw row of ``hour`` is still stored."""
    first, last = floor_hour(start), floor_hour(end)
    if start != first and not kept(first):
        start = first
    if end != last and not kept(last):
        end = last + HOUR
    net, pieces = sides(start, end, HOUR, floor_hour, span)
    rollup_start, rollup_end = ceil_hour(start), floor_hour(end)
    if net:
        rollup_start = min(rollup_start, *net)
        rollup_end = max(rollup_end, *(hour + HOUR for hour in net))
    return Plan(start, end, rollup_start, rollup_end, frozenset(net), tuple(pieces))


def sides(
    start: datetime,
    end: datetime,
    unit: timedelta,
    floor: Callable[[datetime], datetime],
    span: tuple[datetime, datetime] | None,
) -> tuple[set[datetime], list[Piece]]:
    """The units (hours or days) that [start, end) covers only in part, read by their
    shorter side: the part inside (a piece added), or the whole unit, which is then in
    the returned set, less the parts outside (pieces taken out). Costs are the time
    between the oldest and newest of ``span``."""
    net: set[datetime] = set()
    pieces: list[Piece] = []
    for first in sorted({floor(moment) for moment in (start, end) if floor(moment) != moment}):
        inside = (max(start, first), min(end, first + unit))
        around = ((first, inside[0]), (inside[1], first + unit))
        outside = [(lo, hi) for lo, hi in around if lo < hi]
        if sum(_cost(part, span) for part in outside) < _cost(inside, span):
            net.add(first)
            pieces += [(lo, hi, -1) for lo, hi in outside]
        else:
            pieces.append((*inside, 1))
    return net, pieces


def _cost(part: tuple[datetime, datetime], span: tuple[datetime, datetime] | None) -> float:
    """Seconds of ``part`` that may hold raw rows (between the oldest and newest)."""
    if span is None:
        return 0.0
    lo, hi = max(part[0], span[0]), min(part[1], span[1])
    return max(0.0, (hi - lo).total_seconds())


def raw_span(conn: sqlalchemy.Connection) -> tuple[datetime, datetime] | None:
    """The oldest and newest raw row's time (two index lookups), or None when none."""
    t = request_log.c.created_at
    found = conn.execute(
        select(select(func.min(t)).scalar_subquery(), select(func.max(t)).scalar_subquery())
    ).one()
    return None if found[0] is None else (utc(found[0]), utc(found[1]))


def complete(
    conn: sqlalchemy.Connection, hour: datetime, span: tuple[datetime, datetime] | None
) -> bool:
    """Whether every request of ``hour`` still has its raw row. Retention deletes the
    oldest rows first, so an hour from the oldest row on is whole; an older one (only a
    window reaching back to retention's edge asks) is whole if its raw rows are as many
    as its rollups count."""
    if span is not None and hour >= span[0]:
        return True
    t = request_log.c.created_at
    raw = conn.execute(select(func.count()).where(t >= hour, t < hour + HOUR)).scalar() or 0
    r = metric_rollups.c
    counted = conn.execute(
        select(func.coalesce(func.sum(r.requests), 0)).where(
            r.period == MODEL_HOUR, r.bucket_start == hour
        )
    ).scalar()
    return int(raw) == int(counted or 0)


def counted_rows(
    conn: sqlalchemy.Connection,
    chosen: Plan,
    rows: Sequence[Row],
    less: Sequence[Row],
    days: tuple[datetime, datetime] | None,
    filters: Mapping[str, Any],
    model_level: bool,
) -> list[Row]:
    """The rollup ``rows`` of the plan with its edges applied: the raw pieces inside the
    window added as rows of their hour, and the raw pieces outside it, and the hour rows
    ``less``, taken out of the row that holds them (its day's, when ``rows`` has the day
    rows of ``days``' range, else its hour's)."""
    held = {(at, dims): tally for at, dims, tally in rows}
    out: list[Row] = []

    def take(at: datetime, dims: Dims, tally: Tally) -> None:
        day = floor_day(at)
        holder = day if days is not None and days[0] <= day < days[1] else floor_hour(at)
        found = held.get((holder, dims))
        if found is not None:  # always, in one snapshot: the rollup counted the rows
            found.subtract(tally)

    for at, dims, tally in less:
        take(at, dims, tally)
    for lo, hi, sign in chosen.pieces:
        for dims, tally in raw_tallies(conn, lo, hi, filters, model_level):
            if sign > 0:
                out.append((floor_hour(lo), dims, tally))
            else:
                take(lo, dims, tally)
    out += [(at, dims, tally) for (at, dims), tally in held.items() if tally.requests]
    return out


_MODEL_DIMS = ("provider", "model", "success", "error_type")
# Histogram of the Tally -> the request-log column it bins.
_BINNED = {
    "latency_ms": "response_time_ms",
    "ttft_ms": "time_to_first_token_ms",
    "tps": "tokens_per_second",
}
# Columns summed (the binned ones for the Tally's ``*_sum``).
_VALUES = ("prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", *_BINNED.values())


def raw_tallies(
    conn: sqlalchemy.Connection,
    lo: datetime,
    hi: datetime,
    filters: Mapping[str, Any],
    model_level: bool,
) -> Iterator[tuple[Dims, Tally]]:
    """The raw rows of [lo, hi) matching ``filters``, added up by the database per series
    (every dimension, or by model alone as the model-level rollups are)."""
    names = _MODEL_DIMS if model_level else Dims._fields
    query = edge_query(lo, hi, filters, names, conn.dialect.name == "postgresql")
    for row in conn.execute(query):
        m = row._mapping
        tally = Tally(
            requests=int(m["n"]),
            prompt_tokens=int(m["prompt_tokens"] or 0),
            completion_tokens=int(m["completion_tokens"] or 0),
            total_tokens=int(m["total_tokens"] or 0),
            cost_usd=float(m["cost_usd"] or 0.0),
            priced=int(m["priced"]),
            latency_ms_sum=float(m["response_time_ms"] or 0.0),
            ttft_ms_sum=float(m["time_to_first_token_ms"] or 0.0),
            tps_sum=float(m["tokens_per_second"] or 0.0),
        )
        for hist in _BINNED:
            text = m[f"b_{hist}"]
            if text:
                setattr(tally, hist, {int(b): n for b, n in Counter(text.split(",")).items()})
        yield (
            Dims(
                m.get("user_id"),
                m.get("api_key_id"),
                m["provider"],
                m["model"],
                m.get("origin"),
                bool(m["success"]),
                m["error_type"],
            ),
            tally,
        )


def edge_query(
    lo: datetime,
    hi: datetime,
    filters: Mapping[str, Any],
    names: Sequence[str],
    postgres: bool,
) -> Any:
    """The statement of ``raw_tallies``: one pass over the rows of [lo, hi), grouped by
    ``names``: counts and sums, and each histogram's bins as a list (``1,-3,1``) that
    ``raw_tallies`` counts. A GROUP BY per histogram would be exact in SQL too, but
    SQLite sorts the rows for every GROUP BY: four passes took 2-3 times as long as this
    one (``docs/benchmarks.md``)."""
    t = request_log.c
    where = [t.created_at >= lo, t.created_at < hi]
    for name, value in filters.items():
        column = t[name]
        where.append(column.in_(value) if isinstance(value, list | tuple) else column == value)
    keys = [t[name] for name in names]
    return (
        select(
            *keys,
            func.count().label("n"),
            *(func.sum(t[name]).label(name) for name in _VALUES),
            func.count(t.cost_usd).label("priced"),
            *(
                func.aggregate_strings(cast(sql_bin(t[column], postgres), String), ",").label(
                    f"b_{hist}"
                )
                for hist, column in _BINNED.items()
            ),
        )
        .where(and_(*where))
        .group_by(*keys)
    )


def sql_bin(column: Any, postgres: bool) -> Any:
    """``histogram.bin_of`` in SQL: NULL for NULL, the floor bin at or below ``FLOOR``
    (also used by the HTTP report, ``store.metrics``)."""
    floor_bin = literal(histogram.FLOOR_BIN)
    low = column <= literal(histogram.FLOOR, Float)
    if postgres:
        # PostgreSQL has no log2 for double precision; NaN is the floor bin, as in Python.
        log2 = func.ln(column) / literal(math.log(2), Float)
        low = or_(low, column == literal(math.nan, Float))
    else:
        log2 = func.log2(column)
    scaled = log2 * literal(histogram.BINS_PER_DOUBLING) + literal(histogram.GUARD, Float)
    # An integer, so that the list reads "56", not "56.0".
    whole = cast(func.floor(scaled), Integer)
    return case((column.is_(None), null()), (low, floor_bin), else_=whole)


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def floor_day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_day(moment: datetime) -> datetime:
    floor = floor_day(moment)
    return floor if floor == moment else floor + DAY


def ceil_hour(moment: datetime) -> datetime:
    floor = floor_hour(moment)
    return floor if floor == moment else floor + HOUR
