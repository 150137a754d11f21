"""The SQL of retention: find, count and delete rows older than a cutoff, a batch at a time.

Tables are named, not imported from ``store.schema``, so that retention can list a table
a later schema adds (and run before it exists): every table pruned here has an integer
primary key ``id`` and a timestamp column given by the caller.

Invariants:
- every delete is bounded: at most ``limit`` rows (``delete_older``) or one window of
  ``limit`` primary keys (``delete_older_in_window``), so the caller's transaction, and
  on SQLite the write lock it holds, stays short however large the table is;
- rows are chosen only by ``column < cutoff``; nothing here follows a foreign key. Rows
  that reference a deleted row are the schema's business (``ON DELETE SET NULL`` on the
  request log), which the database enforces inside the same statement.

Every function runs in the caller's transaction; deletes need a write transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Connection,
    DateTime,
    Integer,
    TableClause,
    column,
    delete,
    func,
    inspect,
    select,
    table,
)


def _table(name: str, timestamp: str) -> TableClause:
    # The column's type makes the cutoff bind exactly as stored timestamps are written
    # (on SQLite: UTC text that compares in order).
    return table(name, column("id", Integer), column(timestamp, DateTime(timezone=True)))


def table_exists(conn: Connection, name: str) -> bool:
    return inspect(conn).has_table(name)


def indexed(conn: Connection, name: str, timestamp: str) -> bool:
    """Whether an index on ``name`` starts with ``timestamp`` (so a range on it is a seek)."""
    for index in inspect(conn).get_indexes(name):
        columns = index.get("column_names") or []
        if columns and columns[0] == timestamp:
            return True
    return False


def count_older(conn: Connection, name: str, timestamp: str, cutoff: datetime) -> int:
    t = _table(name, timestamp)
    query = select(func.count()).select_from(t).where(t.c[timestamp] < cutoff)
    return int(conn.execute(query).scalar_one())


def delete_older(conn: Connection, name: str, timestamp: str, cutoff: datetime, limit: int) -> int:
    """Delete up to ``limit`` rows older than ``cutoff`` (oldest first); how many went.

    Needs an index on ``timestamp`` (``indexed``): the subquery then reads only the
    rows it deletes. Without one, use ``delete_older_in_window``.
    """
    t = _table(name, timestamp)
    oldest = select(t.c.id).where(t.c[timestamp] < cutoff).order_by(t.c[timestamp]).limit(limit)
    result = conn.execute(delete(t).where(t.c.id.in_(oldest)))
    return int(result.rowcount)


def id_bounds(conn: Connection, name: str) -> tuple[int, int] | None:
    """The smallest and largest primary key in ``name``, or None when it is empty."""
    t = table(name, column("id", Integer))
    low, high = conn.execute(select(func.min(t.c.id), func.max(t.c.id))).one()
    return None if low is None else (int(low), int(high))


def delete_older_in_window(
    conn: Connection, name: str, timestamp: str, cutoff: datetime, start: int, stop: int
) -> int:
    """Delete rows older than ``cutoff`` whose id is in ``[start, stop)``; how many went.

    The fallback for a table without an index on ``timestamp``: the primary key bounds
    the rows read, whatever their age.
    """
    t = _table(name, timestamp)
    query = delete(t).where(t.c.id >= start, t.c.id < stop, t.c[timestamp] < cutoff)
    return int(conn.execute(query).rowcount)


def checkpoint(conn: Connection) -> None:
    """On SQLite, copy what the write-ahead log holds into the database (PASSIVE: never
    waits for, nor blocks, the writer). Run between batches, outside a transaction, so
    that the log retention fills is folded in here rather than by whichever of the
    writer's commits crosses the auto-checkpoint threshold, making a request wait."""
    if conn.dialect.name != "sqlite" or conn.in_transaction():
        return
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
