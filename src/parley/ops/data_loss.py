"""What a downgrade would discard: the tables and columns it drops that hold data.

The downgrade is rehearsed on the database itself, inside a savepoint of the migration
transaction (``ops.migrate`` holds the lock, so nothing else writes meanwhile): the
tables and columns that store data (``store.census``) are read before and after it, the
savepoint is rolled back, and each one that went is counted on the restored database.
So the list is what these revisions do to this database on its dialect, never a list
kept beside the revisions that could drift from them. Indexes, triggers, constraints and
derived objects (the full-text index, generated columns) hold nothing that the rows do
not, and are not listed. A table a downgrade renames would be listed as dropped (none
does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection

from parley.store.census import census, stored_layout


@dataclass(frozen=True, slots=True)
class Loss:
    """A dropped table (``column`` None) and its rows, or a dropped column of a table that
    stays and its non-null values."""

    table: str
    column: str | None
    count: int

    def __str__(self) -> str:
        if self.column is None:
            return f"{self.table}: {_counted(self.count, 'row')}"
        return f"{self.table}.{self.column}: {_counted(self.count, 'non-null value')}"


def rehearse(conn: Connection, run: Callable[[], None]) -> tuple[Loss, ...]:
    """What ``run`` (the downgrade, on ``conn``) drops that holds data; ``run``'s changes
    are rolled back. Tables first, then columns, each by name."""
    before = stored_layout(conn)
    savepoint = conn.begin_nested()
    try:
        run()
        after = stored_layout(conn)
    finally:
        savepoint.rollback()
    tables: list[Loss] = []
    columns: list[Loss] = []
    for table in sorted(before):
        if table not in after:
            rows, _ = census(conn, table)
            if rows:
                tables.append(Loss(table, None, rows))
            continue
        gone = sorted(before[table] - after[table])
        if gone:
            _, values = census(conn, table, gone)
            columns += [Loss(table, name, n) for name, n in zip(gone, values, strict=True) if n]
    return (*tables, *columns)


def _counted(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
