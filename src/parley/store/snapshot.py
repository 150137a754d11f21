"""Whole-database reads and copies for backups and restores: the SQL behind ``ops.backup``.

- ``copy_sqlite`` copies a live SQLite database with SQLite's online backup API in one
  step: one read transaction on the source, so the copy is a consistent snapshot while
  the writer keeps committing (WAL readers never block it), and never a half-copied file.
- ``exported_snapshot`` opens a REPEATABLE READ transaction on PostgreSQL and exports its
  snapshot, so that ``pg_dump --snapshot`` and ``table_summaries`` read the very same
  state: the digests in a manifest describe exactly the rows in its dump.
- ``table_summaries`` gives each table's row count and a SHA-256 digest of its contents,
  rows in primary-key order, each value encoded with its type. Two databases of the same
  kind with the same rows give the same digests, whatever their physical layout, so a
  restore can prove it reproduced what was backed up. (Digests are only compared between
  databases of one kind: SQLite and PostgreSQL return different Python types.)

Everything here reads, except ``copy_sqlite`` (which writes only its target file) and
``RESET_SCHEMA_SQL`` (text handed to ``psql`` by a restore, run in its transaction).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, inspect
from sqlalchemy.pool import NullPool

from parley.store.engine import BUSY_TIMEOUT_MS

# Everything parley keeps on PostgreSQL lives in the ``public`` schema; a restore empties
# it first, in the same transaction as the restore, so that nothing the archive does not
# hold survives (a table added by a later migration, say). A session still holding a
# table (a forgotten psql) makes the restore fail after a minute rather than hang.
RESET_SCHEMA_SQL = (
    "SET lock_timeout = '60s'; DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;"
)


def sqlite_file_engine(path: Path) -> sqlalchemy.Engine:
    """An engine on one SQLite file (a snapshot being checked), closed on dispose."""
    return sqlalchemy.create_engine(f"sqlite:///{path}", poolclass=NullPool, hide_parameters=True)


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy the live database ``source`` into the new file ``target`` in one step.

    Raises ``sqlite3.Error`` (``FileNotFoundError`` when ``source`` is missing: opening it
    must never create an empty database in its place).
    """
    if not source.is_file():
        raise FileNotFoundError(f"no database file at {source}")
    src = sqlite3.connect(f"{source.as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        dst = sqlite3.connect(target)
        try:
            # pages=-1: the whole database under one read lock. A stepped copy restarts
            # whenever another connection writes, and under load would never finish.
            src.backup(dst, pages=-1)
        finally:
            dst.close()
    finally:
        src.close()


def integrity_problems(conn: Connection) -> list[str]:
    """``PRAGMA integrity_check`` on SQLite: empty when the file is sound."""
    if conn.dialect.name != "sqlite":
        return []
    lines = [str(row[0]) for row in conn.exec_driver_sql("PRAGMA integrity_check").all()]
    return [] if lines == ["ok"] else lines


def schema_revision(conn: Connection) -> str | None:
    """The Alembic revision recorded in the database, None when it has none."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    revisions = sorted(
        str(row[0]) for row in conn.exec_driver_sql("SELECT version_num FROM alembic_version")
    )
    return ",".join(revisions) if revisions else None


def has_tables(conn: Connection) -> bool:
    return bool(inspect(conn).get_table_names())


def server_version(conn: Connection) -> str | None:
    if conn.dialect.name != "postgresql":
        return None
    return str(conn.exec_driver_sql("SHOW server_version").scalar_one())


def table_summaries(conn: Connection) -> dict[str, dict[str, Any]]:
    """``{table: {"rows": count, "digest": sha256 hex}}`` for every table, by name."""
    inspector = inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    out: dict[str, dict[str, Any]] = {}
    for table in sorted(inspector.get_table_names()):
        primary = inspector.get_pk_constraint(table).get("constrained_columns") or []
        sql = f"SELECT * FROM {quote(table)}"
        digest = hashlib.sha256()
        count = 0
        if primary:
            sql += " ORDER BY " + ", ".join(quote(c) for c in primary)
            result = conn.execution_options(stream_results=True, yield_per=2000)
            for row in result.exec_driver_sql(sql):
                digest.update(_encode_row(row))
                count += 1
        else:
            # No key to order by (and JSON columns cannot be sorted in SQL): sort the
            # encoded rows instead. parley's tables all have keys; this is for safety.
            encoded = sorted(_encode_row(row) for row in conn.exec_driver_sql(sql))
            for item in encoded:
                digest.update(item)
            count = len(encoded)
        out[table] = {"rows": count, "digest": digest.hexdigest()}
    return out


@contextmanager
def exported_snapshot(engine: sqlalchemy.Engine) -> Iterator[tuple[Connection, str]]:
    """A REPEATABLE READ transaction on PostgreSQL and its exported snapshot id.

    The snapshot stays importable (``pg_dump --snapshot``) until the block ends.
    """
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            snapshot = str(conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar_one())
            yield conn, snapshot


def _encode_row(row: Any) -> bytes:
    parts = [_encode(value) for value in row]
    return b"R%d:" % len(parts) + b"".join(parts)


def _encode(value: Any) -> bytes:
    """One value, tagged with its type and length-prefixed, so no two rows collide."""
    if value is None:
        tag, text = b"N", b""
    elif isinstance(value, bool):
        tag, text = b"B", b"1" if value else b"0"
    elif isinstance(value, int):
        tag, text = b"I", str(value).encode()
    elif isinstance(value, float):
        tag, text = b"F", value.hex().encode()
    elif isinstance(value, str):
        tag, text = b"S", value.encode("utf-8", "surrogatepass")
    elif isinstance(value, bytes | bytearray | memoryview):
        tag, text = b"X", bytes(value)
    elif isinstance(value, dict | list):
        tag, text = b"J", json.dumps(value, sort_keys=True, default=str).encode()
    elif isinstance(value, datetime) and value.tzinfo is not None:
        # The session's time zone decides the offset PostgreSQL returns: compare instants.
        tag, text = b"T", value.astimezone(UTC).isoformat().encode()
    else:  # date, time, Decimal, UUID, timedelta: their str is exact and canonical
        tag, text = type(value).__name__.encode(), str(value).encode()
    return tag + b"%d:" % len(text) + text
