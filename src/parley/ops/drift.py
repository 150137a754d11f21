"""Schema drift: every difference between a database's schema and parley's models.

``parley db check`` prints these lines, and a migration to head is refused (rolled back)
while there is any. Each line is in words an operator can act on ("index X on T is
missing from the database"), never Alembic's tuples. Reads only.

The full-text index's objects (``schema.FULL_TEXT``: FTS5 tables, their shadow tables
and triggers on SQLite; generated columns and GIN indexes on PostgreSQL) are not in the
models: they are left out of Alembic's comparison and checked for by name instead, as are
the triggers that fill the search outbox (``schema.OUTBOX_TRIGGERS``).
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from parley.store.schema import FULL_TEXT, OUTBOX_TRIGGERS, FullText, metadata

# FTS5's shadow tables of a table named X: X_data, X_idx, X_docsize, X_config (X_content
# only without external content).
_FTS5_SHADOWS = ("data", "idx", "docsize", "config", "content")


def drift(conn: Connection) -> list[str]:
    """One line per difference between the database on ``conn`` and the models."""
    full_text = FULL_TEXT.get(conn.dialect.name, FullText())
    unmodelled = _unmodelled(full_text)

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "column":
            return f"{obj.table.name}.{name}" not in unmodelled
        return name not in unmodelled

    context = MigrationContext.configure(
        conn,
        opts={"compare_type": True, "transactional_ddl": True, "include_object": include},
    )
    found = [describe(diff) for diff in compare_metadata(context, metadata)]
    return found + _missing_full_text(conn, full_text) + _missing_outbox_triggers(conn)


def _unmodelled(full_text: FullText) -> frozenset[str]:
    shadows = (f"{table}_{suffix}" for table in full_text.tables for suffix in _FTS5_SHADOWS)
    return frozenset((*full_text.tables, *shadows, *full_text.columns, *full_text.indexes))


def _missing_full_text(conn: Connection, full_text: FullText) -> list[str]:
    """A line per full-text object the database lacks."""
    inspector = inspect(conn)
    missing: list[str] = []
    tables = set(inspector.get_table_names())
    missing += [f"full-text table {t}" for t in full_text.tables if t not in tables]
    if full_text.triggers:
        present = {
            row[0]
            for row in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        }
        missing += [f"full-text trigger {t}" for t in full_text.triggers if t not in present]
    for qualified in full_text.columns:
        table, column = qualified.split(".")
        if table not in tables:
            continue  # the missing table is reported by the model comparison
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            missing.append(f"full-text column {qualified}")
    if full_text.indexes:
        indexes = {
            row[0]
            for row in conn.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
        }
        missing += [f"full-text index {i}" for i in full_text.indexes if i not in indexes]
    return [f"{what} is missing from the database" for what in missing]


def _missing_outbox_triggers(conn: Connection) -> list[str]:
    """A line per trigger of the search outbox (``schema.OUTBOX_TRIGGERS``) that is missing."""
    expected = OUTBOX_TRIGGERS.get(conn.dialect.name, ())
    if not expected:
        return []
    if conn.dialect.name == "sqlite":
        query = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    else:
        query = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
    present = {row[0] for row in conn.exec_driver_sql(query)}
    return [
        f"search outbox trigger {name} is missing from the database"
        for name in expected
        if name not in present
    ]


def describe(diff: Any) -> str:
    """One Alembic difference in words."""
    if isinstance(diff, list):  # alembic groups one column's modifications in a list
        return "; ".join(describe(d) for d in diff)
    kind, *rest = diff
    where = (
        "missing from the database"
        if kind.startswith("add_")
        else "in the database but not in the models"
    )
    if kind in ("add_table", "remove_table"):
        return f"table {rest[0].name} is {where}"
    if kind in ("add_column", "remove_column"):
        return f"column {rest[1]}.{rest[2].name} is {where}"
    if kind.startswith("modify_"):
        _schema, table, column, _existing, in_db, in_models = rest
        return (
            f"column {table}.{column} {kind.removeprefix('modify_')} is {in_db!r} "
            f"in the database, {in_models!r} in the models"
        )
    obj = rest[0]
    name = getattr(obj, "name", None) or "(unnamed)"
    table = getattr(getattr(obj, "table", None), "name", "?")
    return f"{kind.split('_', 1)[1]} {name} on {table} is {where}"
