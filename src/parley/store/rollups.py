"""The rollup repository: hourly and daily tallies of the request log, kept by the writer.

Invariants:
- ``add`` runs inside the writer's transaction, with the request-log rows it tallies, so
  a rollup never counts a row that was not committed and never misses one that was;
- one ``metric_rollups`` row per (period, bucket start, series); its histograms are JSON
  maps (``domain.histogram``), so a row is read, merged and written back. On PostgreSQL
  several processes may write at once: the writer's transaction holds the advisory lock
  ``exchanges.WRITER_LOCK`` from its start (``write_batch``), so two writers never
  interleave on a row and never deadlock. On SQLite the writer's ``BEGIN IMMEDIATE``
  already excludes every other writer;
- retention deletes raw rows only: rollups keep every total.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, select

from parley.domain import histogram
from parley.domain.rollup import Dims, Tally, tally_rows
from parley.domain.times import utc
from parley.store.bulk import assign_ids, bulk_insert, placeholder, update_rows
from parley.store.schema import metric_rollups as t

_COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "priced",
    "latency_ms_sum",
    "ttft_ms_sum",
    "tps_sum",
)
_HISTOGRAMS = (("latency_ms_hist", "latency_ms"), ("ttft_ms_hist", "ttft_ms"), ("tps_hist", "tps"))
# What ``rows_between`` reads after the bucket start, in the order of ``Dims`` and then
# ``Tally``'s fields (counters, then histograms).
_READ = tuple(
    t.c[name] for name in (*Dims._fields, *_COUNTERS, *(column for column, _ in _HISTOGRAMS))
)


class RollupCache:
    """The rollup rows one writer connection last wrote, so a batch need not read them back.

    SQLite only: ``PRAGMA data_version`` changes when any other connection commits, so
    while it holds still, the rows this connection wrote are the rows stored, and the
    writer's ``BEGIN IMMEDIATE`` keeps it so until the commit. Any other commit, another
    connection or a batch that was never settled empties the cache: the next batch
    reads what it needs, as without a cache. PostgreSQL always reads (its writers are
    several processes).

    A batch's rows are pending until ``settle()``, which the writer calls after the
    commit succeeded: a rolled-back batch never leaves its tallies behind. Past
    ``max_rows`` rows (each hour and day adds its own) the cache starts over, so a
    database that nobody else writes to cannot make it grow for as long as the server runs.
    """

    __slots__ = ("_connection", "_max_rows", "_pending", "_rows", "_version")

    def __init__(self, max_rows: int = 4096) -> None:
        self._max_rows = max_rows
        self._rows: dict[_Key, tuple[int, Tally]] = {}
        self._pending: dict[_Key, tuple[int, Tally]] | None = None
        self._connection: object | None = None
        self._version: int | None = None

    def settle(self) -> None:
        """The transaction that wrote the pending rows committed: they are stored."""
        if self._pending is not None:
            if len(self._rows) + len(self._pending) > self._max_rows:
                self._rows = {}
            self._rows.update(self._pending)
            self._pending = None

    def _valid_for(self, conn: Connection) -> dict[_Key, tuple[int, Tally]]:
        """The cached rows, or an emptied cache when they may be stale."""
        raw = conn.connection.dbapi_connection
        (version,) = raw.execute("PRAGMA data_version").fetchone()  # type: ignore[union-attr]
        if self._pending is not None or raw is not self._connection or version != self._version:
            self._rows = {}
            self._pending = None
            self._connection, self._version = raw, version
        return self._rows


_Key = tuple[str, datetime, str]


def add(
    conn: Connection, attempt_rows: Sequence[dict[str, Any]], cache: RollupCache | None = None
) -> None:
    """Add request-log rows (the writer's dicts, committed in this transaction).

    With ``cache`` (SQLite), rows this connection wrote are merged without reading them;
    the caller calls ``cache.settle()`` once the transaction committed.
    """
    tallies = tally_rows(list(attempt_rows))
    if not tallies:
        return
    sqlite = conn.dialect.name == "sqlite"
    keyed = {
        (period, start, dims.key()): (dims, tally)
        for (period, start, dims), tally in tallies.items()
    }
    known = cache._valid_for(conn) if cache is not None and sqlite else {}
    missing = [key for key in keyed if key not in known]
    stored = {**known, **_stored(conn, missing)} if missing else known
    new_rows: list[dict[str, Any]] = []
    new_tallies: list[Tally] = []
    changed: list[tuple[Any, ...]] = []
    written: dict[_Key, tuple[int, Tally]] = {}
    for key, (dims, tally) in keyed.items():
        found = stored.get(key)
        if found is None:
            new_rows.append(_row(*key, dims, tally))
            new_tallies.append(tally)
        else:
            row_id, old = found
            merged = old.plus(tally)  # the cached tally stays as stored
            changed.append((*_values(merged).values(), row_id))
            written[key] = (row_id, merged)
    if new_rows:
        assign_ids(conn, [(t, new_rows)])
        bulk_insert(conn, t, new_rows)
        for row, tally in zip(new_rows, new_tallies, strict=True):
            written[(row["period"], row["bucket_start"], row["series_key"])] = (row["id"], tally)
    update_rows(conn, t.name, _value_names(), changed)
    if cache is not None and sqlite:
        cache._pending = written


def rows_between(
    conn: Connection,
    period: str,
    start: datetime,
    end: datetime,
    filters: Mapping[str, Any] | None = None,
) -> Iterator[tuple[datetime, Dims, Tally]]:
    """Every rollup row of ``period`` with ``start <= bucket_start < end`` that matches
    ``filters`` (dimension name -> value; a list means any of)."""
    query = select(t.c.bucket_start, *_READ).where(
        t.c.period == period, t.c.bucket_start >= start, t.c.bucket_start < end
    )
    for name, value in (filters or {}).items():
        column = t.c[name]
        query = query.where(
            column.in_(value) if isinstance(value, list | tuple) else column == value
        )
    # Positional rows, not a mapping and a lookup per name: a 30-day report reads ~1,500
    # rows of 20 values (docs/benchmarks.md). ``Tally``'s fields are in ``_READ``'s order,
    # which test_rollups' read-back of every field checks.
    dims_end = len(Dims._fields)
    counters_end = dims_end + len(_COUNTERS)
    decode = histogram.decode
    for at, *values in conn.execute(query):
        yield (
            _aware(at),
            Dims(*values[:dims_end]),
            Tally(
                *values[dims_end:counters_end],
                *(decode(text) for text in values[counters_end:]),
            ),
        )


def _stored(conn: Connection, keys: list[_Key]) -> dict[_Key, tuple[int, Tally]]:
    """The stored rows of ``keys``: one driver-level query per 200 keys."""
    mark = placeholder(conn.dialect.paramstyle)
    to_db = _bucket_processor(conn.dialect)
    found: dict[_Key, tuple[int, Tally]] = {}
    cursor = conn.connection.cursor()
    try:
        for chunk in range(0, len(keys), 200):
            part = keys[chunk : chunk + 200]
            by_stored = {
                (period, to_db(start) if to_db else start, series): (period, start, series)
                for period, start, series in part
            }
            match = f"(period = {mark} AND bucket_start = {mark} AND series_key = {mark})"
            cursor.execute(
                f"SELECT period, bucket_start, series_key, id, {', '.join(_value_names())} "
                f"FROM metric_rollups WHERE {' OR '.join([match] * len(part))}",
                [value for key in by_stored for value in key],
            )
            for period, start, series, row_id, *values in cursor.fetchall():
                key = by_stored.get((period, start, series))
                if key is None:  # PostgreSQL: the same instant in the session's zone
                    key = (period, utc(start), series)
                found[key] = (row_id, _tally(dict(zip(_value_names(), values, strict=True))))
    finally:
        cursor.close()
    return found


@functools.lru_cache(maxsize=4)
def _bucket_processor(dialect: Dialect) -> Callable[[Any], Any] | None:
    processor: Callable[[Any], Any] | None = t.c.bucket_start.type.dialect_impl(
        dialect
    ).bind_processor(dialect)
    return processor


def _value_names() -> tuple[str, ...]:
    return _COUNTERS + tuple(column for column, _ in _HISTOGRAMS)


def _values(tally: Tally) -> dict[str, Any]:
    values: dict[str, Any] = {name: getattr(tally, name) for name in _COUNTERS}
    for column, attribute in _HISTOGRAMS:
        values[column] = histogram.encode(getattr(tally, attribute))
    return values


def _row(period: str, start: datetime, series: str, dims: Dims, tally: Tally) -> dict[str, Any]:
    return {
        "period": period,
        "bucket_start": start,
        "series_key": series,
        **dims._asdict(),
        **_values(tally),
    }


def _tally(m: Any) -> Tally:
    tally = Tally(**{name: m[name] for name in _COUNTERS})
    for column, attribute in _HISTOGRAMS:
        setattr(tally, attribute, histogram.decode(m[column]))
    return tally


def _aware(value: datetime) -> datetime:
    return utc(value)
