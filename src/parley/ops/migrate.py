"""Schema migrations: the one runner behind ``parley db`` and server start.

Invariants:
- Alembic only, with its environment inside the package (``parley/store/migrations``) and
  its configuration built here: there is no ``alembic.ini`` to drift from the code;
- every upgrade or downgrade is one transaction, DDL included, opened here and handed to
  Alembic; an upgrade that reaches head is compared with the models (``store.schema``)
  before it commits, and any difference rolls the whole upgrade back;
- the transaction first takes the database's migration lock (SQLite's write lock via
  ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so processes starting together agree
  through the database and migrate once;
- server start (``prepare_on_start``) creates an empty database at head, accepts one at
  head whose schema matches the models, and refuses, with a ``ConfigError`` that names
  the fix, a database behind head (it may hold data: ``parley db upgrade`` migrates it),
  at a revision this code does not know (written by a newer parley), or holding tables
  but no revision (not a parley database).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import OperationalError

from parley.errors import ConfigError
from parley.settings import Settings
from parley.store.engine import create_engine, migration_transaction
from parley.store.schema import metadata

# pg_advisory_xact_lock key shared by every parley process migrating one database.


def script_location() -> str:
    """The directory holding ``env.py`` and ``versions/``, inside the installed package."""
    return str(files("parley.store") / "migrations")


def alembic_config(
    settings: Settings | None = None, connection: Connection | None = None
) -> Config:
    """Alembic's configuration, pointing at the migrations shipped in the package."""
    config = Config()
    config.set_main_option("script_location", script_location())
    config.set_main_option("path_separator", "os")
    if settings is not None:
        config.attributes["settings"] = settings
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def heads() -> list[str]:
    """The head revision(s) this code ships (one, unless someone branched)."""
    return list(_script().get_heads())


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, first line of its docstring), newest first."""
    out: list[tuple[str, str | None, str]] = []
    for script in _script().walk_revisions():
        down = script.down_revision
        down_text = down if down is None or isinstance(down, str) else ",".join(down)
        out.append((script.revision, down_text, script.doc))
    return out


def current(settings: Settings) -> str | None:
    """The database's revision, or None when it has none (empty or not parley's)."""
    with _connection(settings) as conn:
        return _current(conn)


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate up to ``revision``; at head, the schema is validated before committing."""
    with _migrating(settings) as conn:
        _known(conn)
        _alembic(command.upgrade, settings, conn, revision)
        if _current(conn) in heads():
            _refuse_drift(conn)


def downgrade(settings: Settings, revision: str) -> None:
    """Migrate down to ``revision`` (``base`` drops every table parley created)."""
    with _migrating(settings) as conn:
        _known(conn)
        _alembic(command.downgrade, settings, conn, revision)


def check(settings: Settings) -> list[str]:
    """Every difference between the database's schema and the models (empty: none)."""
    with _connection(settings) as conn:
        return _drift(conn)


def prepare_on_start(settings: Settings) -> str:
    """Make sure the database is at head and matches the models; return the revision."""
    head = _single_head()
    with _migrating(settings) as conn:
        revision = _current(conn)
        if revision is None:
            tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
            if tables:
                raise ConfigError(
                    f"the database has tables ({', '.join(tables)}) but no parley schema "
                    "revision: refusing to use it; point DATABASE_URL at a parley database "
                    "or an empty one"
                )
            _alembic(command.upgrade, settings, conn, "head")
        elif revision != head:
            _known(conn)
            raise ConfigError(
                f"database schema is at {revision}, code expects {head}: run `parley db upgrade`"
            )
        _refuse_drift(conn)
        return head


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _single_head() -> str:
    found = heads()
    if len(found) != 1:
        raise ConfigError(f"parley's migrations have {len(found)} heads: {', '.join(found)}")
    return found[0]


def _current(conn: Connection) -> str | None:
    revisions = MigrationContext.configure(conn).get_current_heads()
    return ",".join(revisions) if revisions else None


def _known(conn: Connection) -> None:
    """Refuse a database migrated by a newer parley: its revision is not ours."""
    revision = _current(conn)
    if revision is None:
        return
    script = _script()
    for rev in revision.split(","):
        try:
            found = script.get_revision(rev)
        except (CommandError, RevisionError):
            found = None
        if found is None:
            raise ConfigError(
                f"database schema is at revision {rev}, which this version of parley does "
                "not know (a newer parley migrated it): refusing to use it; run that newer "
                "parley, or restore a backup taken before it"
            )


def _alembic(run: Callable[..., Any], settings: Settings, conn: Connection, *args: str) -> None:
    try:
        run(alembic_config(settings, conn), *args)
    except (CommandError, RevisionError) as exc:
        raise ConfigError(f"migration failed: {exc}") from exc
    except Exception as exc:
        # Raised inside the migration transaction, which rolls back as this propagates.
        raise ConfigError(
            f"migration failed and was rolled back: {type(exc).__name__}: {exc}"
        ) from exc


def _refuse_drift(conn: Connection) -> None:
    drift = _drift(conn)
    if drift:
        raise ConfigError("database schema does not match parley's models: " + "; ".join(drift))


def _drift(conn: Connection) -> list[str]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return [_describe(diff) for diff in compare_metadata(context, metadata)]


def _describe(diff: Any) -> str:
    """One line per difference, in words an operator can act on."""
    if isinstance(diff, list):  # alembic groups one column's modifications in a list
        return "; ".join(_describe(d) for d in diff)
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


@contextmanager
def _connection(settings: Settings) -> Iterator[Connection]:
    engine = create_engine(settings)
    try:
        with _connect(engine.connect) as conn:
            yield conn
    finally:
        engine.dispose()


@contextmanager
def _migrating(settings: Settings) -> Iterator[Connection]:
    """One transaction holding the migration lock; commits only if the body returns."""
    engine = create_engine(settings)
    try:
        _connect(engine.connect).close()  # an unreachable database: one clear error
        with migration_transaction(engine) as conn:
            yield conn
    finally:
        engine.dispose()


def _connect(connect: Callable[[], Connection]) -> Connection:
    try:
        return connect()
    except OperationalError as exc:
        raise ConfigError(f"cannot connect to the database: {exc.orig or exc}") from exc
