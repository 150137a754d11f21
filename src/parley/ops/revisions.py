"""The revisions parley ships and the one a database is at: Alembic's plumbing, read-only.

Alembic's environment lives inside the package (``parley/store/migrations``) and its
configuration is built here: there is no ``alembic.ini`` to drift from the code. Nothing
here changes a database; ``ops.migrate`` runs the revisions.
"""

from __future__ import annotations

from importlib.resources import files

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, inspect

from parley.errors import ConfigError
from parley.settings import Settings


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


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def heads() -> list[str]:
    """The head revision(s) this code ships (one, unless someone branched)."""
    return list(script().get_heads())


def single_head() -> str:
    found = heads()
    if len(found) != 1:
        raise ConfigError(f"parley's migrations have {len(found)} heads: {', '.join(found)}")
    return found[0]


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, first line of its docstring), newest first."""
    out: list[tuple[str, str | None, str]] = []
    for revision in script().walk_revisions():
        down = revision.down_revision
        down_text = down if down is None or isinstance(down, str) else ",".join(down)
        out.append((revision.revision, down_text, revision.doc))
    return out


def current_on(conn: Connection) -> str | None:
    """The revision of the database on ``conn`` (None: none, empty or not parley's)."""
    # Reads only; the option just keeps Alembic from logging "non-transactional DDL".
    context = MigrationContext.configure(conn, opts={"transactional_ddl": True})
    revisions = context.get_current_heads()
    return ",".join(revisions) if revisions else None


# Tables of parley's first revision, kept by every later one: a database at a revision
# (whether this code knows it or not) without any of them is another application's (with
# its own Alembic history), not a newer parley's. ("messages" is left out: other
# applications have one.)
_PARLEY_TABLES = frozenset({"conversations", "request_log", "responses"})
# Table names a refusal lists at most.
_NAMED = 5


def refuse_foreign(conn: Connection, revision: str | None) -> None:
    """Refuse a database that is not parley's: tables but no revision (an empty or
    missing ``alembic_version``), or a revision (known here or not) and none of parley's
    tables.
    An empty database, and one a newer parley migrated, pass (``refuse_unknown``)."""
    tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
    if revision is None and tables:
        found = f"tables ({_names(tables)}) but no parley schema revision"
    elif revision is not None and not _PARLEY_TABLES & set(tables):
        # Even a revision parley has ("0003": other histories number theirs too) is not
        # parley's without parley's tables: upgrading would run parley's migrations on it.
        held = f"tables ({_names(tables)}), none of them parley's" if tables else "no tables"
        whose = "which is not parley's" if not _known(revision) else "as parley numbers one"
        found = f"revision {revision}, {whose}, and {held}"
    else:
        return
    raise ConfigError(
        f"the database has {found}: it is not a parley database (another application's?), "
        "refusing to use it; point DATABASE_URL at a parley database or an empty one"
    )


def _names(tables: list[str]) -> str:
    more = len(tables) - _NAMED
    return ", ".join(tables[:_NAMED]) + (f" and {more} more" if more > 0 else "")


def _known(revision: str) -> bool:
    scripts = script()
    for rev in revision.split(","):
        try:
            if scripts.get_revision(rev) is None:
                return False
        except (CommandError, RevisionError):
            return False
    return True


def refuse_unknown(revision: str | None) -> None:
    """Refuse a database migrated by a newer parley: its revision is not ours."""
    if revision is None:
        return
    scripts = script()
    for rev in revision.split(","):
        try:
            found = scripts.get_revision(rev)
        except (CommandError, RevisionError):
            found = None
        if found is None:
            raise ConfigError(
                f"database schema is at revision {rev}, which this version of parley does "
                "not know (a newer parley migrated it): refusing to use it; run that newer "
                "parley, or restore a backup taken before it"
            )


def pending(direction: str, target: str, revision: str | None) -> str | None:
    """The revision ``target`` resolves to from ``revision`` (``"base"`` for none), or
    None when there is nothing to run."""
    try:
        if direction == "upgrade":
            steps = list(script().iterate_revisions(target, revision))
            return steps[0].revision if steps else None
        if revision is None:
            return None
        steps = list(script().iterate_revisions(revision, target))
    except (CommandError, RevisionError) as exc:
        raise ConfigError(f"cannot {direction} to {target}: {exc}") from exc
    if not steps:
        return None
    down = steps[-1].down_revision
    return down if isinstance(down, str) else "base"
