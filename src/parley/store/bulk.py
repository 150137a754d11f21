"""Fast bulk inserts for the store's hot path: reserved ids and driver-level executemany.

Repositories that write many rows per transaction (the exchange writer) use these
instead of ``conn.execute(insert(table), rows)``: measured on SQLite, SQLAlchemy's
per-row parameter handling cost more than the insert itself. The SQL is still compiled
by SQLAlchemy for the connection's dialect and every value still goes through the
column type's own bind processor, so what is stored is exactly what Core would store.

Invariants:
- ``assign_ids`` gives rows ascending primary keys nobody else can take: on SQLite the
  caller's transaction must hold the write lock (``BEGIN IMMEDIATE``); on PostgreSQL the
  keys come from the column's sequence;
- ``bulk_insert`` writes rows in list order, so a row may reference (by foreign key) a
  row earlier in the same list;
- public ids are UUIDv7 (time-ordered, 74 random bits): unique indexes on them grow at
  one end instead of dirtying a random page per insert.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, text


def new_public_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version, 74 random bits."""
    rand = int.from_bytes(os.urandom(10))
    return uuid.UUID(
        int=((time.time_ns() // 1_000_000) << 80)
        | (0x7 << 76)
        | (((rand >> 62) & 0xFFF) << 64)
        | (0x2 << 62)
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )


def assign_ids(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Set ``row["id"]`` of every row to a fresh primary key, ascending in list order."""
    if not rows:
        return
    ids: Sequence[int]
    if conn.dialect.name == "sqlite":
        top: int = conn.execute(select(func.max(table.c.id))).scalar() or 0
        ids = range(top + 1, top + 1 + len(rows))
    else:
        ids = conn.execute(
            text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
            {"t": table.name, "n": len(rows)},
        ).scalars().all()
    for row, row_id in zip(rows, ids, strict=True):
        row["id"] = row_id


def bulk_insert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """One ``executemany`` of ``rows`` (every row with the same keys), in list order."""
    if not rows:
        return
    dialect = conn.dialect
    compiled = insert(table).compile(dialect=dialect, column_keys=list(rows[0]))
    processors: dict[str, Callable[[Any], Any]] = {}
    for key in rows[0]:
        bind = table.c[key].type.dialect_impl(dialect).bind_processor(dialect)
        if bind is not None:
            processors[key] = bind
    if compiled.positional:
        # Column by column: one tight loop per column, then zip builds the row tuples.
        columns = [_column(rows, key, processors.get(key)) for key in compiled.positiontup or ()]
        params: Sequence[Any] = list(zip(*columns, strict=True))
    elif processors:
        converted = {key: _column(rows, key, proc) for key, proc in processors.items()}
        params = [
            {**row, **{key: values[i] for key, values in converted.items()}}
            for i, row in enumerate(rows)
        ]
    else:
        params = rows
    conn.exec_driver_sql(compiled.string, params)  #


def _column(
    rows: Sequence[dict[str, Any]], key: str, proc: Callable[[Any], Any] | None
) -> list[Any]:
    if proc is None:
        return [row[key] for row in rows]
    out: list[Any] = []
    # Rows of a batch share values (the batch's time, an exchange's start): convert once.
    last: Any = out
    converted: Any = None
    for row in rows:
        value = row[key]
        if value is None:
            out.append(None)
        elif value is last:
            out.append(converted)
        else:
            last, converted = value, proc(value)
            out.append(converted)
    return out
