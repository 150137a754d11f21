"""Schema drift: every difference between a database's schema and parley's models.

``parley db check`` prints these lines, and a migration to head is refused (rolled back)
while there is any. Each line is in words an operator can act on ("index X on T is
missing from the database"), never Alembic's tuples. Reads only.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from parley.store.schema import metadata


def drift(conn: Connection) -> list[str]:
    """One line per difference between the database on ``conn`` and the models."""
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "transactional_ddl": True}
    )
    return [describe(diff) for diff in compare_metadata(context, metadata)]


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
