"""The rollup repository: hourly and daily tallies of the request log, kept by the writer.

Invariants:
- ``add`` runs inside the writer's transaction, with the request-log rows it tallies, so
  a rollup never counts a row that was not committed and never misses one that was;
- one ``metric_rollups`` row per (period, bucket start, series); its histograms are JSON
  maps (``domain.histogram``), so a row is read, merged and written back. On PostgreSQL
  several processes may write at once: the transaction first takes the advisory lock
  ``ROLLUP_LOCK`` (held until commit), so two writers never interleave on a row and never
  deadlock. On SQLite the writer's ``BEGIN IMMEDIATE`` already excludes every other writer;
- retention deletes raw rows only: rollups keep every total.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, tuple_, update

from parley.domain import histogram
from parley.domain.rollup import Dims, Tally, tally_rows
from parley.domain.times import utc
from parley.store.schema import metric_rollups as t

# pg_advisory_xact_lock key for rollup updates ("parley-r").
ROLLUP_LOCK = 0x7061726C65792D72

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


def add(conn: Connection, attempt_rows: Sequence[dict[str, Any]]) -> None:
    """Add request-log rows (the writer's dicts, committed in this transaction)."""
    tallies = tally_rows(list(attempt_rows))
    if not tallies:
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ROLLUP_LOCK})")
    keyed = {
        (period, start, dims.key()): (dims, tally)
        for (period, start, dims), tally in tallies.items()
    }
    stored = _stored(conn, list(keyed))
    new_rows: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for (period, start, series), (dims, tally) in keyed.items():
        found = stored.get((period, start, series))
        if found is None:
            new_rows.append(_row(period, start, series, dims, tally))
        else:
            row_id, old = found
            merged = old.merge(tally)
            changed.append({"b_id": row_id, **_values(merged)})
    if new_rows:
        conn.execute(t.insert(), new_rows)
    if changed:
        conn.execute(
            update(t)
            .where(t.c.id == bindparam("b_id"))
            .values({name: bindparam(name) for name in _value_names()}),
            changed,
        )


def rows_between(
    conn: Connection,
    period: str,
    start: datetime,
    end: datetime,
    filters: Mapping[str, Any] | None = None,
) -> Iterator[tuple[datetime, Dims, Tally]]:
    """Every rollup row of ``period`` with ``start <= bucket_start < end`` that matches
    ``filters`` (dimension name -> value; a list means any of)."""
    query = select(t).where(t.c.period == period, t.c.bucket_start >= start, t.c.bucket_start < end)
    for name, value in (filters or {}).items():
        column = t.c[name]
        query = query.where(
            column.in_(value) if isinstance(value, list | tuple) else column == value
        )
    for row in conn.execute(query):
        m = row._mapping
        yield _aware(m["bucket_start"]), _dims(m), _tally(m)


def _stored(
    conn: Connection, keys: list[tuple[str, datetime, str]]
) -> dict[tuple[str, datetime, str], tuple[int, Tally]]:
    found: dict[tuple[str, datetime, str], tuple[int, Tally]] = {}
    for chunk in range(0, len(keys), 300):
        part = keys[chunk : chunk + 300]
        query = select(t).where(tuple_(t.c.period, t.c.bucket_start, t.c.series_key).in_(part))
        for row in conn.execute(query):
            m = row._mapping
            found[(m["period"], _aware(m["bucket_start"]), m["series_key"])] = (m["id"], _tally(m))
    return found


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


def _dims(m: Any) -> Dims:
    return Dims(*(m[name] for name in Dims._fields))


def _tally(m: Any) -> Tally:
    tally = Tally(**{name: m[name] for name in _COUNTERS})
    for column, attribute in _HISTOGRAMS:
        setattr(tally, attribute, histogram.decode(m[column]))
    return tally


def _aware(value: datetime) -> datetime:
    return utc(value)
