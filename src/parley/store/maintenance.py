"""The SQL of maintenance: VACUUM, ANALYZE, checkpoints and the integrity queries.

SQLite's VACUUM, checkpoints and ``PRAGMA`` checks cannot run inside a transaction, and
the engine begins one for every statement it runs (see ``store.engine``), so those go
to the driver connection underneath, where ``sqlite3`` runs each in autocommit.
PostgreSQL's VACUUM likewise needs an ``AUTOCOMMIT`` connection.

Invariants:
- nothing here deletes or changes a row: the integrity functions only count and name
  what is wrong, and VACUUM / ANALYZE rewrite storage and statistics, not contents;
- identifiers interpolated into SQL come from ``store.schema`` or from the database's
  own catalogue, never from a caller's string; checkpoint modes are checked against a
  fixed list;
- ``vacuum_into`` writes a new file and never touches the database file itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Table, and_, exists, func, inspect, select

from parley.errors import StoreError
from parley.store import documents
from parley.store.schema import attachments, conversations, messages, metadata

_CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")


@contextmanager
def _driver(engine: sqlalchemy.Engine) -> Iterator[Any]:
    """The ``sqlite3`` connection under a pooled connection, outside any transaction."""
    with engine.connect() as conn:
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        try:
            yield dbapi_connection
        except sqlite3.Error as exc:
            # What SQLAlchemy would have wrapped, had the statement gone through it.
            raise StoreError(f"SQLite: {exc}") from exc


def existing_tables(engine: sqlalchemy.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


# --- SQLite ---------------------------------------------------------------------------


def sqlite_checkpoint(engine: sqlalchemy.Engine, mode: str) -> tuple[int, int, int]:
    """``PRAGMA wal_checkpoint(mode)``: (busy, log pages, pages checkpointed).

    PASSIVE never waits for (nor blocks) the writer; TRUNCATE waits for readers and
    writers and leaves an empty log, for when no server runs.
    """
    if mode not in _CHECKPOINT_MODES:
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    with _driver(engine) as dbapi_connection:
        busy, frames, done = dbapi_connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(busy), int(frames), int(done)


def sqlite_pages(engine: sqlalchemy.Engine) -> tuple[int, int, int]:
    """(page size, pages in the file, free pages): what a VACUUM would give back."""
    with _driver(engine) as dbapi_connection:
        size = dbapi_connection.execute("PRAGMA page_size").fetchone()[0]
        count = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        free = dbapi_connection.execute("PRAGMA freelist_count").fetchone()[0]
    return int(size), int(count), int(free)


def sqlite_integrity(engine: sqlalchemy.Engine, *, quick: bool, limit: int = 20) -> list[str]:
    """``PRAGMA integrity_check`` (or the faster ``quick_check``, which skips matching
    indexes against their tables); ``[]`` when the database is sound, else up to
    ``limit`` of SQLite's messages."""
    pragma = "quick_check" if quick else "integrity_check"
    with _driver(engine) as dbapi_connection:
        found = [row[0] for row in dbapi_connection.execute(f"PRAGMA {pragma}({int(limit)})")]
    return [] if found == ["ok"] else found


def sqlite_foreign_key_violations(engine: sqlalchemy.Engine) -> dict[str, int]:
    """``PRAGMA foreign_key_check``: rows naming a parent row that does not exist, counted
    per foreign key (``"messages.conversation_id -> conversations"``)."""
    counts: dict[tuple[str, int, str], int] = {}
    with _driver(engine) as dbapi_connection:
        for table, _rowid, parent, fkid in dbapi_connection.execute("PRAGMA foreign_key_check"):
            key = (table, fkid, parent)
            counts[key] = counts.get(key, 0) + 1
        found: dict[str, int] = {}
        for (table, fkid, parent), count in counts.items():
            columns = [
                row[3]  # (id, seq, table, from, to, ...): "from" is the child's column
                for row in dbapi_connection.execute(
                    "SELECT * FROM pragma_foreign_key_list(?)", (table,)
                )
                if row[0] == fkid
            ]
            found[f"{table}.{','.join(columns)} -> {parent}"] = count
    return found


def sqlite_analyze(engine: sqlalchemy.Engine, *, limit: int = 0) -> None:
    """Refresh the query planner's statistics. ``limit`` > 0 samples about that many rows
    per index (``PRAGMA analysis_limit``): milliseconds on any size of database, so it
    may run under a live server; 0 reads every row."""
    with _driver(engine) as dbapi_connection:
        dbapi_connection.execute(f"PRAGMA analysis_limit={int(limit)}")
        dbapi_connection.execute("ANALYZE")
        dbapi_connection.execute("PRAGMA analysis_limit=0")


def sqlite_vacuum(engine: sqlalchemy.Engine) -> None:
    """Rebuild the database file in place, giving free pages back to the file system."""
    with _driver(engine) as dbapi_connection:
        dbapi_connection.execute("VACUUM")


def sqlite_vacuum_into(engine: sqlalchemy.Engine, target: Path) -> None:
    """Write a compacted copy of the database to ``target`` (which must not exist)."""
    with _driver(engine) as dbapi_connection:
        dbapi_connection.execute("VACUUM INTO ?", (str(target),))


def sqlite_prepare_copy(path: Path) -> list[str]:
    """Check a database file made by ``sqlite_vacuum_into`` and put it in WAL mode, as
    parley's database is; ``[]`` when sound, else SQLite's integrity messages."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        found = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        if found != ["ok"]:
            return found
        conn.execute("PRAGMA journal_mode=WAL")
        return []
    finally:
        conn.close()


# --- PostgreSQL -----------------------------------------------------------------------


def pg_vacuum(engine: sqlalchemy.Engine, tables: Iterable[str], *, full: bool) -> None:
    """``VACUUM (ANALYZE)`` the tables; ``full`` rewrites them compactly (``VACUUM FULL``
    locks each table exclusively while it runs: only with no server up)."""
    options = "FULL, ANALYZE" if full else "ANALYZE"
    _pg_autocommit(engine, f"VACUUM ({options})", tables)


def pg_analyze(engine: sqlalchemy.Engine, tables: Iterable[str]) -> None:
    _pg_autocommit(engine, "ANALYZE", tables)


def _pg_autocommit(engine: sqlalchemy.Engine, command: str, tables: Iterable[str]) -> None:
    names = sorted(tables)
    if not names:
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        quote = conn.dialect.identifier_preparer.quote
        conn.exec_driver_sql(f"{command} {', '.join(quote(name) for name in names)}")


def pg_database_size(engine: sqlalchemy.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one())


# --- Both -----------------------------------------------------------------------------


def dangling_references(conn: Connection, present: set[str]) -> dict[str, int]:
    """Per foreign key of ``store.schema``: rows naming a parent row that does not exist
    (what ``PRAGMA foreign_key_check`` finds, as queries any database can run). Tables
    not in ``present`` (a schema behind the code) are skipped."""
    found: dict[str, int] = {}
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue
        for fk in table.foreign_key_constraints:
            parent_table = fk.referred_table
            if parent_table.name not in present:
                continue
            count = _dangling(conn, table, parent_table, fk.elements)
            if count:
                child = ",".join(element.parent.name for element in fk.elements)
                found[f"{table.name}.{child} -> {parent_table.name}"] = count
    return found


def _dangling(conn: Connection, table: Table, parent_table: Table, elements: Any) -> int:
    parent = parent_table.alias("parent")  # a table may reference itself
    named = and_(*(table.c[e.parent.name].is_not(None) for e in elements))
    match = and_(*(parent.c[e.column.name] == table.c[e.parent.name] for e in elements))
    query = select(func.count()).select_from(table).where(named, ~exists().where(match))
    return int(conn.execute(query).scalar_one())


def messages_without_conversation(conn: Connection) -> int:
    """Messages whose conversation is gone: history that no longer shows anywhere."""
    orphan = ~exists().where(conversations.c.id == messages.c.conversation_id)
    return int(conn.execute(select(func.count()).select_from(messages).where(orphan)).scalar_one())


def attachment_hashes(conn: Connection) -> set[str]:
    """Every blob any attachment row or document names."""
    named = set(conn.execute(select(attachments.c.sha256).distinct()).scalars())
    return named | documents.hashes(conn)
