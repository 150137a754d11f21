"""The limits repository: per-key and per-user limits, and the usage they are checked on.

Invariants:
- a limit row names exactly one subject, an API key or a user (a unique column each);
  every limit is optional. Setting limits changes only the fields given (None removes
  one) in one atomic upsert, so any number of concurrent writers (API requests, CLI
  runs, processes) of one subject all succeed and leave one row, each field as the last
  writer that gave it left it;
- every value is checked before it is written (``check_values``, whoever sets it): the
  per-minute limits are integers from 1 to ``MAX_PER_MINUTE`` (what PostgreSQL's
  ``integer`` column holds), spend limits finite numbers of 0 or more;
- requests per minute are counted at request time in ``rate_windows``, one row per subject
  and minute, incremented with one atomic upsert that counts only below the limit
  (``INSERT .. ON CONFLICT DO UPDATE .. WHERE requests < limit RETURNING``), so several
  parley processes on one database never let more than the limit through in a minute,
  and a refused request is counted nowhere: the counts of one request's limits are
  taken in one transaction, rolled back if any of them is full (``take_request``);
- tokens per minute and spend are read from what the writer committed: the request log
  rows that finished over the last 60 seconds (``finished_at``: a sliding window; a stream
  counts when it ends, however long it ran; partial streams record their usage too) and
  the day rollups (``metric_rollups``), so they need no writes of their own.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from parley.domain.rollup import DAY
from parley.domain.times import utc, utc_or_none
from parley.errors import InvalidRequest, refuse_unknown
from parley.store.schema import api_keys, limits, metric_rollups, rate_windows, request_log, users

LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "usd_per_day", "usd_per_month")
_PER_MINUTE = frozenset({"requests_per_minute", "tokens_per_minute"})
# The largest value of the per-minute columns (``Integer``: 32 bits on PostgreSQL).
MAX_PER_MINUTE = 2**31 - 1
MINUTE = timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Limit:
    user_id: int | None
    api_key_id: int | None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None

    @property
    def subject(self) -> str:
        """The ``rate_windows`` key: ``key:<id>`` or ``user:<id>``."""
        if self.api_key_id is not None:
            return f"key:{self.api_key_id}"
        return f"user:{self.user_id}"

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


@dataclass(frozen=True, slots=True)
class Usage:
    requests_this_minute: int
    tokens_last_minute: int
    # When the oldest of the rows counted in ``tokens_last_minute`` finished: the tokens
    # window frees up a minute after it.
    oldest_token_at: datetime | None
    usd_today: float
    usd_this_month: float


class LimitStore:
    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    def all_limits(self) -> list[Limit]:
        with self._engine.connect() as conn:
            return [_limit(r._mapping) for r in conn.execute(select(limits))]

    def listing(self) -> list[dict[str, Any]]:
        """Every limit with its subject's public id (for the admin API)."""
        query = (
            select(
                limits,
                users.c.public_id.label("user_public_id"),
                api_keys.c.public_id.label("key_public_id"),
            )
            .outerjoin(users, users.c.id == limits.c.user_id)
            .outerjoin(api_keys, api_keys.c.id == limits.c.api_key_id)
            .order_by(limits.c.id)
        )
        with self._engine.connect() as conn:
            return [
                {
                    "user": _text(r.user_public_id),
                    "api_key": _text(r.key_public_id),
                    **_limit(r._mapping).values(),
                }
                for r in conn.execute(query)
            ]

    def set_limit(
        self, *, user_id: int | None, api_key_id: int | None, values: Mapping[str, object]
    ) -> Limit:
        """Set the limits given in ``values`` for one subject and keep its others (a field
        given as None: that limit is removed); return all of the subject's limits.
        ``InvalidRequest`` for a value ``check_values`` refuses."""
        if (user_id is None) == (api_key_id is None):
            raise ValueError("a limit names exactly one of a user and an API key")
        checked = check_values(values)
        given: dict[str, Any] = {name: checked.get(name) for name in LIMIT_FIELDS if name in values}
        given["updated_at"] = datetime.now(UTC)
        column, _subject_id = _subject_column(limits, user_id, api_key_id)
        with self._engine.begin() as conn:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            statement = insert(limits).values(user_id=user_id, api_key_id=api_key_id, **given)
            # One statement: a read then a write let two concurrent writers of one subject
            # both insert (the second failed on the unique column), or merge into values
            # another writer had just changed.
            row = conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[column],
                    set_={name: statement.excluded[name] for name in given},
                ).returning(limits)
            ).one()
        return _limit(row._mapping)

    def remove_limits(
        self, *, user_id: int | None, api_key_id: int | None, fields: Collection[str]
    ) -> Limit | None:
        """Remove the limits named in ``fields`` of one subject and keep its others; return
        what is left, or None when the subject has no limits at all (nothing is created)."""
        unknown = sorted(set(fields) - set(LIMIT_FIELDS))
        if unknown:
            raise ValueError(f"not limit fields: {', '.join(unknown)}")
        column, subject_id = _subject_column(limits, user_id, api_key_id)
        changes: dict[str, Any] = dict.fromkeys(fields)
        changes["updated_at"] = datetime.now(UTC)
        with self._engine.begin() as conn:
            row = conn.execute(
                update(limits).where(column == subject_id).values(changes).returning(limits)
            ).one_or_none()
        return None if row is None else _limit(row._mapping)

    def delete_limit(self, *, user_id: int | None, api_key_id: int | None) -> bool:
        column, subject_id = _subject_column(limits, user_id, api_key_id)
        with self._engine.begin() as conn:
            return bool(conn.execute(delete(limits).where(column == subject_id)).rowcount)

    def take_request(self, found: Sequence[Limit], window_start: datetime) -> Limit | None:
        """Count one request in the minute starting at ``window_start`` of each limit of
        ``found`` that has ``requests_per_minute`` (in ``found``'s order), unless one of
        them has already counted that many: then count it in none of them and return the
        first such limit. None: the request was counted and may go.

        One transaction: a request refused by its user's limit does not use up a slot of
        its key's. On PostgreSQL each counter's row stays locked until the commit; callers
        pass a key's limit before its user's (``Limiter.limits_of``), so two requests
        always lock in the same order and cannot deadlock."""
        with self._engine.connect() as conn, conn.begin() as transaction:
            for limit in found:
                if limit.requests_per_minute is None:
                    continue
                count = _count_request(
                    conn, limit.subject, window_start, below=limit.requests_per_minute
                )
                if count is None:
                    transaction.rollback()
                    return limit
        return None

    def count_request(self, subject: str, window_start: datetime) -> int:
        """Count one request in ``subject``'s minute whatever its limit; return the count
        including it."""
        with self._engine.begin() as conn:
            count = _count_request(conn, subject, window_start, below=None)
        assert count is not None
        return count

    def counts_since(self, subject: str, since: datetime) -> list[tuple[datetime, int]]:
        """``subject``'s counts of the minutes starting at or after ``since``, oldest first."""
        with self._engine.connect() as conn:
            found = conn.execute(
                select(rate_windows.c.window_start, rate_windows.c.requests)
                .where(rate_windows.c.subject == subject)
                .where(rate_windows.c.window_start >= since)
                .order_by(rate_windows.c.window_start)
            ).all()
        return [(utc(start), int(count)) for start, count in found]

    def uncount(self, subject: str, window_start: datetime) -> None:
        """Take back one count of ``subject``'s minute (one that ``count_request`` added)."""
        with self._engine.begin() as conn:
            conn.execute(
                update(rate_windows)
                .where(rate_windows.c.subject == subject)
                .where(rate_windows.c.window_start == window_start)
                .where(rate_windows.c.requests > 0)
                .values(requests=rate_windows.c.requests - 1)
            )

    def forget(self, subject: str) -> None:
        """Delete every count of ``subject``."""
        with self._engine.begin() as conn:
            conn.execute(delete(rate_windows).where(rate_windows.c.subject == subject))

    def usage(self, limit: Limit, now: datetime) -> Usage:
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        with self._engine.connect() as conn:
            requests = conn.execute(
                select(rate_windows.c.requests).where(
                    rate_windows.c.subject == limit.subject,
                    rate_windows.c.window_start == minute_of(now),
                )
            ).scalar()
            tokens, oldest = _tokens_since(conn, limit, now - MINUTE)
            return Usage(
                requests_this_minute=int(requests or 0),
                tokens_last_minute=tokens,
                oldest_token_at=oldest,
                usd_today=_spend_since(conn, limit, today),
                usd_this_month=_spend_since(conn, limit, today.replace(day=1)),
            )

    def prune_windows(self, before: datetime) -> int:
        """Delete request counters of minutes before ``before`` (maintenance)."""
        with self._engine.begin() as conn:
            result = conn.execute(delete(rate_windows).where(rate_windows.c.window_start < before))
            return int(result.rowcount)


def check_values(values: Mapping[str, object]) -> dict[str, Any]:
    """The limits given in ``values`` (None: no limit), checked; ``InvalidRequest`` naming
    the field for an unknown field or a value a limit column cannot hold."""
    refuse_unknown(values, LIMIT_FIELDS)
    out: dict[str, Any] = {}
    for name in LIMIT_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"'{name}' must be a number or null", name)
        if name in _PER_MINUTE:
            if not isinstance(value, int) or not 1 <= value <= MAX_PER_MINUTE:
                raise InvalidRequest(
                    f"'{name}' must be an integer from 1 to {MAX_PER_MINUTE}, or null", name
                )
        elif not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"'{name}' must be a finite number of 0 or more, or null", name)
        out[name] = value
    return out


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _count_request(
    conn: Connection, subject: str, window_start: datetime, *, below: int | None
) -> int | None:
    """Add one to the subject's count of the minute if it is ``below`` (or always, for
    None); the new count, or None when it was not below and is left as it was."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(rate_windows)
        .values(subject=subject, window_start=window_start, requests=1, tokens=0)
        .on_conflict_do_update(
            index_elements=[rate_windows.c.subject, rate_windows.c.window_start],
            set_={"requests": rate_windows.c.requests + 1},
            # A row this statement does not update is not returned. On PostgreSQL the
            # condition is checked on the row's latest version, after any concurrent
            # writer of it committed, so concurrent requests never count past ``below``.
            where=None if below is None else rate_windows.c.requests < below,
        )
        .returning(rate_windows.c.requests)
    )
    count = conn.execute(statement).scalar_one_or_none()
    return None if count is None else int(count)


def _tokens_since(conn: Connection, limit: Limit, since: datetime) -> tuple[int, datetime | None]:
    column, subject_id = _subject_column(request_log, limit.user_id, limit.api_key_id)
    # By finish time: a stream's tokens count once it ended, however long ago it started.
    tokens, oldest = conn.execute(
        select(
            func.coalesce(func.sum(request_log.c.total_tokens), 0),
            func.min(request_log.c.finished_at),
        ).where(column == subject_id, request_log.c.finished_at >= since)
    ).one()
    return int(tokens), utc_or_none(oldest)


def _spend_since(conn: Connection, limit: Limit, since_day: datetime) -> float:
    column, subject_id = _subject_column(metric_rollups, limit.user_id, limit.api_key_id)
    total = conn.execute(
        select(func.coalesce(func.sum(metric_rollups.c.cost_usd), 0.0)).where(
            column == subject_id,
            metric_rollups.c.period == DAY,
            metric_rollups.c.bucket_start >= utc(since_day),
        )
    ).scalar_one()
    return float(total)


def _subject_column(
    table: sqlalchemy.Table, user_id: int | None, api_key_id: int | None
) -> tuple[sqlalchemy.Column[Any], int | None]:
    if api_key_id is not None:
        return table.c.api_key_id, api_key_id
    return table.c.user_id, user_id


def _limit(m: Any) -> Limit:
    return Limit(m["user_id"], m["api_key_id"], *(m[name] for name in LIMIT_FIELDS))


def _text(public_id: uuid.UUID | None) -> str | None:
    return None if public_id is None else str(public_id)
