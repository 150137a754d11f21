"""What a database stores, table by table and column by column: the reads behind
``ops.data_loss``, which tells what a downgrade would discard.

``stored_layout`` names every table that stores rows and, for each, the columns that
store values. Left out are the objects the database derives from those rows, which a
downgrade may drop without losing anything: Alembic's version table, SQLite's virtual
tables and their shadow tables (the FTS5 full-text index) and generated columns
(PostgreSQL's search vectors). ``census`` counts a table's rows and the non-null values
of some of its columns in one scan. Everything here reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy import Connection, inspect

_VERSION_TABLE = "alembic_version"


def stored_layout(conn: Connection) -> dict[str, frozenset[str]]:
    """``{table: its columns}`` for every table holding data the database cannot rebuild."""
    inspector = inspect(conn)
    derived = _derived_tables(conn)
    return {
        table: frozenset(
            column["name"]
            for column in inspector.get_columns(table)
            if column.get("computed") is None
        )
        for table in inspector.get_table_names()
        if table != _VERSION_TABLE and table not in derived
    }


def census(conn: Connection, table: str, columns: Sequence[str] = ()) -> tuple[int, list[int]]:
    """The rows of ``table`` and the non-null values of each of ``columns``, in order."""
    counts = [sa.func.count(sa.column(name)) for name in columns]
    found = conn.execute(sa.select(sa.func.count(), *counts).select_from(sa.table(table))).one()
    return int(found[0]), [int(n) for n in found[1:]]


def _derived_tables(conn: Connection) -> set[str]:
    """SQLite's virtual tables and their shadow tables (named ``<virtual table>_<part>``)."""
    if conn.dialect.name != "sqlite":
        return set()
    tables = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'").all()
    virtual = {
        name for name, sql in tables if (sql or "").upper().startswith("CREATE VIRTUAL TABLE")
    }
    return {
        name
        for name, _sql in tables
        if name in virtual or any(name.startswith(f"{v}_") for v in virtual)
    }
