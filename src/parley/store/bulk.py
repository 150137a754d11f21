"""Fast bulk writes for the store's hot path: reserved ids and driver-level statements.

Repositories that write many rows per transaction (the exchange writer) use these
instead of ``conn.execute(insert(table), rows)``: measured on SQLite, SQLAlchemy's
per-row parameter handling cost more than the insert itself. The SQL is still compiled
by SQLAlchemy for the connection's dialect and every value still goes through the
column type's own bind processor, so what is stored is exactly what Core would store;
on SQLite, a DATETIME is formatted in one C call and the Boolean and Float processors
are skipped (``_processors``; a test compares every column with Core's). That holds for
the values the store passes: bools to Boolean columns, ints and floats to Float ones
(Core would also take a Decimal, and refuse a non-bool in a Boolean column).

Invariants:
- ``assign_ids`` gives rows ascending primary keys nobody else can take: on SQLite the
  caller's transaction must hold the write lock (``BEGIN IMMEDIATE``); on PostgreSQL the
  keys come from the column's sequence;
- ``bulk_insert`` writes rows in list order, so a row may reference (by foreign key) a
  row earlier in the same list;
- public ids are UUIDv7 (time-ordered, 74 random bits): unique indexes on them grow at
  one end instead of dirtying a random page per insert;
- on SQLite, a large batch's rows go in as multi-row ``INSERT ... VALUES (...), (...)``
  statements of 64 rows (``execute_rows``), not one ``executemany`` step each: the
  driver releases and re-takes the GIL around every step, and with the event loop busy
  each re-take waits for the interpreter's switch interval (5 ms). Measured with one
  busy Python thread beside it, the writer fell from ~4,700 to 14 exchanges/s with a
  step per row.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Dialect, Table, insert
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql import sqltypes

# Looked up once: reading an Enum member costs a descriptor call each time.
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown


def _uuid7(rand: int) -> uuid.UUID:
    value = (
        ((time.time_ns() // 1_000_000) << 80)
        | (0x7 << 76)
        | (((rand >> 62) & 0xFFF) << 64)
        | (0x2 << 62)
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    # UUID(int=...) re-checks the range and sets fields through __setattr__ guards; the
    # value is in range by construction, and this runs several times per exchange.
    public_id = object.__new__(uuid.UUID)
    object.__setattr__(public_id, "int", value)
    object.__setattr__(public_id, "is_safe", _UNKNOWN_SAFETY)
    return public_id


def new_public_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version, 74 random bits."""
    return _uuid7(int.from_bytes(os.urandom(10)))


class PublicIds:
    """UUIDv7s whose random bits come from one ``os.urandom`` read per 256 ids.

    A system call costs tens of microseconds on a busy virtual machine, more than the
    rest of an id; the bits are the same cryptographic ones, read in bulk.
    """

    __slots__ = ("_buffer", "_position")

    _CHUNK = 10 * 256

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0

    def new(self) -> uuid.UUID:
        position = self._position
        if position + 10 > len(self._buffer):
            self._buffer = os.urandom(self._CHUNK)
            position = 0
        self._position = position + 10
        return _uuid7(int.from_bytes(self._buffer[position : position + 10]))


def assign_ids(conn: Connection, plan: Sequence[tuple[Table, Sequence[dict[str, Any]]]]) -> None:
    """Set ``row["id"]`` of every row to a fresh primary key, ascending in list order.

    One round trip for all tables: on SQLite one ``SELECT`` of every table's ``max(id)``
    (the write lock held by the caller keeps them free), on PostgreSQL one statement
    drawing from each table's sequence.
    """
    wanted = [(table, rows) for table, rows in plan if rows]
    if not wanted:
        return
    cursor = conn.connection.cursor()
    try:
        if conn.dialect.name == "sqlite":
            # Table names come from the schema, never from input.
            cursor.execute(
                "SELECT " + ", ".join(f"(SELECT max(id) FROM {t.name})" for t, _ in wanted)
            )
            tops = cursor.fetchone()
            assert tops is not None
            for (_, rows), top in zip(wanted, tops, strict=True):
                for offset, row in enumerate(rows, start=(top or 0) + 1):
                    row["id"] = offset
        else:
            parts = [
                f"SELECT {i} AS k, nextval(pg_get_serial_sequence('{t.name}', 'id')) AS id "
                f"FROM generate_series(1, {len(rows)})"
                for i, (t, rows) in enumerate(wanted)
            ]
            cursor.execute(" UNION ALL ".join(parts))
            ids: dict[int, list[int]] = {}
            for k, row_id in cursor.fetchall():
                ids.setdefault(k, []).append(row_id)
            for i, (_, rows) in enumerate(wanted):
                for row, row_id in zip(rows, sorted(ids[i]), strict=True):
                    row["id"] = row_id
    finally:
        cursor.close()


def bulk_insert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` (every row with the same keys) in list order, as ``execute_rows``."""
    if not rows:
        return
    sql, order, processors = _compiled(conn.dialect, table, tuple(rows[0]))
    if order is not None:
        # Column by column: one tight loop per column, then zip builds the row tuples.
        columns = [_column(rows, key, processors.get(key)) for key in order]
        params: Sequence[Any] = list(zip(*columns, strict=True))
    elif processors:
        converted = {key: _column(rows, key, proc) for key, proc in processors.items()}
        params = [
            {**row, **{key: values[i] for key, values in converted.items()}}
            for i, row in enumerate(rows)
        ]
    else:
        params = rows
    # Straight to the driver: SQLAlchemy's execute machinery cost more than a small
    # batch's insert. Same connection, so the caller's transaction covers it.
    execute_rows(conn, sql, params)


# Rows per multi-row statement on SQLite (fewer if the columns would pass the driver's
# limit of bound parameters). Fewer rows than that go through ``executemany``: measured
# at a group commit of 8 exchanges, multi-row statements cost SQLite ~20% more CPU than
# single-row ones, and a few dozen steps give up the GIL only a few dozen times.
_CHUNK_ROWS = 64


def execute_rows(conn: Connection, sql: str, params: Sequence[Any]) -> None:
    """Run the one-row statement ``sql`` (``INSERT ... VALUES (...)``) for every
    parameter tuple of ``params``, in order: ``executemany``, on SQLite with every full
    chunk of rows as one multi-row statement (see the module's invariants)."""
    if not params:
        return
    cursor = conn.connection.cursor()
    try:
        done = 0
        if conn.dialect.name == "sqlite" and isinstance(params[0], tuple):
            head, _, row = sql.partition(" VALUES ")
            size = _chunk_rows(conn, len(params[0]))
            done = _full_chunks(cursor, _multi_row(head, row, size), params, size)
        if done < len(params):
            cursor.executemany(sql, params[done:] if done else params)
    finally:
        cursor.close()


def _full_chunks(cursor: Any, statement: str, params: Sequence[Any], size: int) -> int:
    """Run the ``size``-row ``statement`` on each full chunk of ``params``; return how
    many rows that covered (the rest are the caller's)."""
    done = 0
    while len(params) - done >= size:
        chunk = params[done : done + size]
        cursor.execute(statement, list(itertools.chain.from_iterable(chunk)))
        done += size
    return done


def _chunk_rows(conn: Connection, width: int) -> int:
    limit: int = conn.connection.driver_connection.getlimit(  # type: ignore[union-attr]
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
    )
    return max(1, min(_CHUNK_ROWS, limit // max(width, 1)))


@functools.lru_cache(maxsize=256)
def _multi_row(head: str, row: str, size: int, tail: str = "") -> str:
    return f"{head} VALUES {', '.join([row] * size)}{tail}"


def bulk_update(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Set, for each row, its other keys on the row whose primary key is its ``id`` (every
    row with the same keys); of two rows for one id, the later one wins."""
    if not rows:
        return
    keys = tuple(key for key in rows[0] if key != "id")
    processors = _processors(conn.dialect, table, keys)
    columns = [_column(rows, key, processors.get(key)) for key in (*keys, "id")]
    names = tuple(table.c[key].name for key in keys)
    update_rows(conn, table.name, names, list(zip(*columns, strict=True)))


def update_rows(
    conn: Connection, table_name: str, names: tuple[str, ...], params: Sequence[tuple[Any, ...]]
) -> None:
    """Set columns ``names`` to each tuple's values on the row whose ``id`` is the tuple's
    last item; of two tuples for one id, the later one wins. ``executemany``, on SQLite
    with every full chunk as one ``UPDATE ... FROM (VALUES ...)`` (see the invariants)."""
    if not params:
        return
    mark = placeholder(conn.dialect.paramstyle)
    cursor = conn.connection.cursor()
    try:
        # One tuple per id (its last), where it first appeared: of two rows for one id,
        # a multi-row statement's join would update it from either.
        latest = list({values[-1]: values for values in params}.values())
        done = 0
        # UPDATE ... FROM came with SQLite 3.33 (2020); an older library updates row by row.
        if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
            size = _chunk_rows(conn, len(names) + 1)
            statement = _multi_row_update(table_name, names, mark, size)
            done = _full_chunks(cursor, statement, latest, size)
        if done < len(latest):
            cursor.executemany(_update(table_name, names, mark), latest[done:])
    finally:
        cursor.close()


@functools.lru_cache(maxsize=32)
def _update(table_name: str, names: tuple[str, ...], mark: str) -> str:
    assignments = ", ".join(f"{name} = {mark}" for name in names)
    return f"UPDATE {table_name} SET {assignments} WHERE id = {mark}"


@functools.lru_cache(maxsize=32)
def _multi_row_update(table_name: str, names: tuple[str, ...], mark: str, size: int) -> str:
    assignments = ", ".join(f"{name} = v.column{i}" for i, name in enumerate(names, 1))
    return _multi_row(
        f"UPDATE {table_name} SET {assignments} FROM (",
        f"({', '.join([mark] * (len(names) + 1))})",
        size,
        f") AS v WHERE {table_name}.id = v.column{len(names) + 1}",
    )


@functools.lru_cache(maxsize=128)
def _compiled(
    dialect: Dialect, table: Table, keys: tuple[str, ...]
) -> tuple[str, tuple[str, ...] | None, dict[str, Callable[[Any], Any]]]:
    """The INSERT for ``keys`` of ``table``, its positional order and bind processors.

    A memo of a pure function: compiling costs about 0.5 ms, more than writing a small
    batch, and the statement only depends on the dialect, the table and the columns.
    """
    compiled = insert(table).compile(dialect=dialect, column_keys=list(keys))
    order = tuple(compiled.positiontup or ()) if compiled.positional else None
    return compiled.string, order, _processors(dialect, table, keys)


@functools.lru_cache(maxsize=128)
def _processors(
    dialect: Dialect, table: Table, keys: tuple[str, ...]
) -> dict[str, Callable[[Any], Any]]:
    """The bind processors of ``keys``' column types on ``dialect`` (keys without one are
    passed to the driver as they are); a memo, as ``_compiled``: read-only to callers."""
    processors: dict[str, Callable[[Any], Any]] = {}
    for key in keys:
        impl = table.c[key].type.dialect_impl(dialect)
        if dialect.name == "sqlite" and isinstance(impl, _SQLITE_STORED_AS_GIVEN):
            continue
        bind = impl.bind_processor(dialect)
        if bind is not None:
            processors[key] = _fast_datetime(impl, bind)
    return processors


# Types whose bind processor changes nothing SQLite stores: a bool binds as the integer
# 0 or 1 either way, and a FLOAT column's REAL affinity stores an int as a real. Skipped,
# they save a Python call per value (nine per request-log row).
_SQLITE_STORED_AS_GIVEN = (sqltypes.Boolean, sqltypes.Float)


# SQLAlchemy's default text form of a DATETIME on SQLite.
_SQLITE_DATETIME_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"
)


def _fast_datetime(impl: Any, bind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``bind``, or for a SQLite DATETIME in SQLAlchemy's default format an equivalent
    that gives the same text from one C call: SQLAlchemy's fills the format from a dict
    of seven fields, ~5% of the writer's time at 512-exchange commits (py-spy). Like it,
    it stores the wall-clock time and drops the offset (the store's times are all UTC);
    anything but a ``datetime`` goes to ``bind``."""
    if (
        not isinstance(impl, sqlite.DATETIME)
        or getattr(impl, "_storage_format", None) != _SQLITE_DATETIME_FORMAT
    ):
        return bind

    def process(value: Any) -> Any:
        if value.__class__ is datetime.datetime:
            return value.isoformat(" ", "microseconds")[:26]
        return bind(value)

    return process


def placeholder(paramstyle: str) -> str:
    """The driver's parameter marker for driver-level SQL (sqlite3 ``?``, psycopg ``%s``)."""
    return "?" if paramstyle == "qmark" else "%s"


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
