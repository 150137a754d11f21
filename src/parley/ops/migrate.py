"""Schema migrations: the one runner behind ``parley db`` and server start.

Invariants:
- Alembic only (``ops.revisions`` builds its configuration: no ``alembic.ini``);
- nothing opens a SQLite file before ``ops.dbfile`` has looked at its bytes: a corrupt or
  foreign file, or one whose hot write-ahead log has gone, is refused untouched;
- every upgrade or downgrade is one transaction, DDL included, opened here and handed to
  Alembic, which revisions may not end (``_sealed``); an upgrade that reaches head is
  compared with the models (``ops.drift``) before it commits, and any difference rolls
  the whole upgrade back;
- the transaction first takes the database's migration lock (SQLite's write lock via
  ``BEGIN IMMEDIATE``, retried for as long as another process migrates; a PostgreSQL
  advisory lock), and the revision is read under it, so processes starting together
  agree through the database: one backs up and migrates, the others wait and find head;
- a downgrade that drops tables or columns holding data (rows, non-null values) is
  refused with a list of them, before any backup, unless the caller passes
  ``discard_data``: ``ops.data_loss`` finds them by rehearsing the downgrade in a
  savepoint of the same transaction and rolling it back;
- a database that holds a parley schema is backed up (``ops.backup.create_backup``,
  verified, with its fallback location) under the lock before any revision runs. When no
  backup can be made, ``production`` refuses to migrate and ``development`` warns and
  goes on, except for a downgrade that discards data: that needs the backup in any
  environment. An empty database needs no backup;
- on failure the transaction rolls back, and a fresh connection confirms the revision is
  the one found; the error says what failed, that state, and where the backup is. The
  backup is never restored behind the operator's back (see ``_failed``);
- a database at a revision this code does not know (a newer parley migrated it) is
  refused, never downgraded implicitly; one holding tables but no revision is not
  parley's and is refused, never migrated into.

``prepare_on_start`` is server start: it creates an empty database at head, migrates one
behind head as above, and refuses drift, newer and foreign databases. ``require_head`` is
every other command that uses the schema: it refuses the same databases, and an empty one
or one behind head too, without writing anything. ``require_known`` is for the commands
that work at any revision this code knows (retention, ``parley db check``): it refuses
empty, foreign and newer databases.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import DatabaseError, OperationalError

from parley.errors import BackupError, ConfigError, DataWouldBeLost, ParleyError, StopRequested
from parley.ops import presence
from parley.ops.backup import create_backup
from parley.ops.data_loss import Loss, rehearse
from parley.ops.dbfile import check_database_file, refuse_foreign_file
from parley.ops.drift import drift
from parley.ops.revisions import (
    alembic_config,
    current_on,
    heads,
    history,
    pending,
    refuse_foreign,
    refuse_unknown,
    script_location,
    single_head,
)
from parley.settings import Settings
from parley.store.engine import (
    MigrationLockBusy,
    cannot_connect,
    create_engine,
    driver_message,
    migration_transaction,
    sqlite_path,
)

log = logging.getLogger(__name__)

__all__ = [
    "MigrationReport",
    "alembic_config",
    "check",
    "current",
    "downgrade",
    "heads",
    "history",
    "prepare_on_start",
    "refuse_not_parleys",
    "refuse_unknown",
    "require_head",
    "require_known",
    "script_location",
    "upgrade",
]

# How long a process waits for another one's migration (backup included), trying again
# every tenth of a second (SQLite's BEGIN IMMEDIATE first waits its busy timeout).
LOCK_WAIT_SECONDS = 3600.0
_SQLITE_BUSY = 5


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What one ``upgrade`` / ``downgrade`` / start did: revisions (None: base), the
    backup taken first (None: nothing to migrate, an empty database, or development
    without a backup location) and what a downgrade discarded (``discard_data``)."""

    before: str | None
    after: str | None
    backup: Path | None = None
    discarded: tuple[Loss, ...] = ()

    @property
    def migrated(self) -> bool:
        return self.before != self.after


def current(settings: Settings) -> str | None:
    """The database's revision, or None for an empty database; one that is not parley's
    (tables but no revision, or another application's revision) is a ``ConfigError``."""
    with _connection(settings) as conn:
        revision = current_on(conn)
        refuse_foreign(conn, revision)
        return revision


def refuse_not_parleys(settings: Settings) -> None:
    """Refuse a database that is not parley's (``revisions.refuse_foreign``), reading
    only: for ``parley restore``, which replaces the database and must not replace another
    application's. A SQLite file that is missing, or that SQLite cannot read (a restore is
    how a damaged one is replaced), passes; so does an empty database."""
    path = sqlite_path(settings)
    if path is not None:
        if path.is_file():
            refuse_foreign_file(path)
        return
    with _connection(settings) as conn:
        refuse_foreign(conn, current_on(conn))


def check(settings: Settings) -> list[str]:
    """Every difference between the database's schema and the models (empty: none).

    A database with no parley schema revision is refused (``ConfigError``): compared with
    the models, an empty one would list every table as missing; so is one at a revision
    this parley does not know, whose differences would be the newer parley's changes.
    """
    with _connection(settings) as conn:
        require_known(conn)
        return drift(conn)


def require_head(settings: Settings) -> str:
    """The database's revision, when it is at the schema head and matches the models;
    otherwise a ``ConfigError`` that says what to run. Reads only, never migrates: for the
    commands that use the schema but may not change it (all but server start, ``parley
    db`` and ``parley restore``), which may run beside a server on the same database.
    """
    with _connection(settings) as conn:
        revision = require_known(conn)
        if revision not in heads():
            raise ConfigError(
                f"the database is at {revision}, not at the schema head: "
                "run `parley db upgrade` first"
            )
        _refuse_drift(conn)
        return revision


def require_known(conn: Connection) -> str:
    """The revision of the database on ``conn``, when it has one this parley knows;
    otherwise a ``ConfigError`` that says what to run. For the commands that work at any
    known revision (``parley retention``, ``parley db check``)."""
    revision = _require_revision(conn)
    refuse_unknown(revision)
    return revision


def _require_revision(conn: Connection) -> str:
    revision = current_on(conn)
    refuse_foreign(conn, revision)
    if revision is None:
        raise ConfigError("the database has no parley schema yet: run `parley db upgrade` first")
    return revision


def upgrade(
    settings: Settings, revision: str = "head", *, previous_run_unclean: bool | None = None
) -> MigrationReport:
    """Migrate up to ``revision``, safely (see the module docstring).

    ``previous_run_unclean`` (default: read from ``ops.presence``) says the last server
    crashed, which makes a missing write-ahead log a reason to refuse.
    """
    return _migrate(settings, "upgrade", revision, previous_run_unclean)


def downgrade(
    settings: Settings,
    revision: str,
    *,
    discard_data: bool = False,
    previous_run_unclean: bool | None = None,
) -> MigrationReport:
    """Migrate down to ``revision`` (``base`` drops every table parley created), after a
    backup, like ``upgrade``.

    A downgrade that would drop tables or columns holding data is refused
    (``DataWouldBeLost``, listing them with their counts) and changes nothing, unless
    ``discard_data``; then it needs a verified backup even in development, and the report
    lists what went.
    """
    return _migrate(settings, "downgrade", revision, previous_run_unclean, discard_data)


def prepare_on_start(
    settings: Settings,
    previous_run_unclean: bool = False,
    stop: threading.Event | None = None,
) -> str:
    """Bring the database to head and check it matches the models; return the revision.

    ``previous_run_unclean``: the previous server did not stop cleanly
    (``ServerPresence.previous_run_unclean``). ``stop``: set when the server is asked to
    stop while it starts; waiting for another process's migration lock then ends with
    ``StopRequested`` (a migration under way is never broken off: it commits or rolls
    back as one transaction).
    """
    head = single_head()
    _migrate(settings, "upgrade", head, previous_run_unclean, stop=stop)
    return head


@dataclass(slots=True)
class _Attempt:
    """What a migration in progress has done so far, for the failure path."""

    before: str | None = None
    target: str | None = None
    backup: Path | None = None
    running: bool = False


def _migrate(
    settings: Settings,
    direction: str,
    target: str,
    previous_run_unclean: bool | None,
    discard_data: bool = False,
    stop: threading.Event | None = None,
) -> MigrationReport:
    if previous_run_unclean is None:
        previous_run_unclean = presence.previous_run_unclean(settings)
    check_database_file(settings, previous_run_unclean=previous_run_unclean)
    attempt = _Attempt()
    try:
        with _migrating(settings, stop) as conn:
            attempt.before = current_on(conn)
            refuse_foreign(conn, attempt.before)
            refuse_unknown(attempt.before)
            to = pending(direction, target, attempt.before)
            if to is None:
                if attempt.before in heads():
                    _refuse_drift(conn)
                return MigrationReport(attempt.before, attempt.before)
            attempt.target = to
            run = getattr(command, direction)
            discarded: tuple[Loss, ...] = ()
            if direction == "downgrade":
                log.info("rehearsing the downgrade to %s to see what it drops", to)
                attempt.running = True  # a failing rehearsal is a failed downgrade
                discarded = rehearse(conn, lambda: _alembic(run, settings, conn, target))
                attempt.running = False
                if discarded and not discard_data:
                    raise DataWouldBeLost(
                        f"refusing to downgrade from {_name(attempt.before)} to {to}: it "
                        "drops these tables and columns, and their data with them (pass "
                        "--discard-data to discard it, after a verified backup)",
                        [str(loss) for loss in discarded],
                    )
            if attempt.before is not None:
                attempt.backup = _backup_first(settings, attempt.before, bool(discarded))
            log.info("migrating the database from %s to %s", _name(attempt.before), to)
            for loss in discarded:
                log.warning("downgrading discards %s", loss)
            attempt.running = True
            _alembic(run, settings, conn, target)
            after = current_on(conn)
            if after in heads():
                _refuse_drift(conn)
    except Exception as exc:
        if not attempt.running:
            if isinstance(exc, ParleyError):
                raise
            raise _as_config_error(exc) from exc
        raise _failed(settings, direction, attempt, exc) from exc
    log.info("database migrated to %s", _name(after))
    return MigrationReport(attempt.before, after, attempt.backup, discarded)


def _backup_first(settings: Settings, revision: str, discarding: bool) -> Path | None:
    """A verified backup of the database, or None in development when none can be made
    (unless ``discarding`` data: then the backup is its only copy)."""
    try:
        archive = create_backup(settings, reason=f"before migrating from {revision}").path
    except BackupError as exc:
        writable = (
            f"Make the backup directory {settings.backup.dir} or the fallback "
            f"{settings.backup.fallback_dir} writable (PARLEY_BACKUP_DIR, "
            "PARLEY_BACKUP_FALLBACK_DIR)"
        )
        if discarding:
            raise ConfigError(
                f"refusing to discard data by downgrading the database (at {revision}) "
                f"without a verified backup: {exc.message}. {writable}"
            ) from exc
        if settings.environment != "development":
            raise ConfigError(
                f"refusing to migrate the database (at {revision}) without a verified "
                f"backup: {exc.message}. {writable}, or set PARLEY_ENV=development to "
                "migrate without a backup"
            ) from exc
        log.warning("migrating without a backup (PARLEY_ENV=development): %s", exc.message)
        return None
    log.info("backed up the database before migrating: %s", archive)
    return archive


def _failed(settings: Settings, direction: str, attempt: _Attempt, exc: Exception) -> ConfigError:
    """The refusal after a failed migration, saying what state it left the database in.

    The migration ran in one transaction that revisions cannot end (``_sealed``), so the
    database is as it was unless the commit itself went through while reporting an
    error. A fresh connection tells which; the backup is never restored automatically
    (see the operations guide: a starting server cannot take the database exclusively,
    and other processes may have written since the backup).
    """
    what = f"{direction} from {_name(attempt.before)} to {_name(attempt.target)} failed: "
    what += _as_config_error(exc).message
    backup = attempt.backup
    kept = f"; the backup taken before migrating is {backup}" if backup else ""
    try:
        now = current(settings)
    except Exception as err:  # reported below: the state is unknown
        state = f"its revision cannot be read ({_as_config_error(err).message})"
    else:
        if now == attempt.before:
            return ConfigError(
                f"{what}. It was rolled back: the database is unchanged, still at "
                f"{_name(attempt.before)}{kept}"
            )
        state = f"it is at {_name(now)}"
    restore = (
        f"restore the backup taken before migrating with `parley restore {backup}`"
        if backup
        else "restore a backup with `parley restore ARCHIVE`"
    )
    return ConfigError(
        f"{what}. The database may have been left changed ({state}, it was at "
        f"{_name(attempt.before)}): check it with `parley db check`, or stop every parley "
        f"process and {restore}"
    )


def _as_config_error(exc: Exception) -> ParleyError:
    if isinstance(exc, ParleyError):
        return exc
    if isinstance(exc, DatabaseError):
        return ConfigError(f"database error: {driver_message(exc)}")
    return ConfigError(f"{type(exc).__name__}: {exc}")


def _name(revision: str | None) -> str:
    return revision or "base"


def _alembic(run: Callable[..., Any], settings: Settings, conn: Connection, *args: str) -> None:
    try:
        with _sealed(conn):
            run(alembic_config(settings, conn), *args)
    except ParleyError:
        raise
    except (CommandError, RevisionError) as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        raise ConfigError(f"{type(exc).__name__}: {exc}") from exc


_ENDS_TRANSACTION = re.compile(r"\s*(COMMIT|END|ROLLBACK(?!\s+TO\b))\b", re.IGNORECASE)


@contextmanager
def _sealed(conn: Connection) -> Iterator[None]:
    """Refuse, while revisions run, anything that would end the migration transaction.

    A revision that committed part of its work would make "a failure leaves the database
    as it was" false; so COMMIT / END / ROLLBACK statements and SQLAlchemy-level commits
    and rollbacks on the migration connection raise instead (savepoints stay allowed).
    """

    def on_execute(_conn: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        if _ENDS_TRANSACTION.match(statement):
            raise ConfigError(
                f"a migration ran {statement.strip().split()[0].upper()}: revisions must "
                "not end the migration transaction"
            )

    def on_end(_conn: Connection) -> None:
        raise ConfigError(
            "a migration called commit() or rollback(): revisions must not end the "
            "migration transaction"
        )

    hooks: list[tuple[str, Callable[..., None]]] = [
        ("before_cursor_execute", on_execute),
        ("commit", on_end),
        ("rollback", on_end),
    ]
    for name, hook in hooks:
        event.listen(conn, name, hook)
    try:
        yield
    finally:
        for name, hook in hooks:
            event.remove(conn, name, hook)


def _refuse_drift(conn: Connection) -> None:
    found = drift(conn)
    if found:
        raise ConfigError("database schema does not match parley's models: " + "; ".join(found))


@contextmanager
def _connection(settings: Settings) -> Iterator[Connection]:
    check_database_file(settings)
    engine = create_engine(settings)
    try:
        with _connect(settings, engine) as conn:
            yield conn
    finally:
        engine.dispose()


@contextmanager
def _migrating(settings: Settings, stop: threading.Event | None = None) -> Iterator[Connection]:
    """One transaction holding the migration lock; commits only if the body returns."""
    engine = create_engine(settings)
    try:
        _connect(settings, engine).close()  # an unreachable database: one clear error
        with _locked(engine, stop) as conn:
            yield conn
    finally:
        engine.dispose()


@contextmanager
def _locked(engine: Engine, stop: threading.Event | None = None) -> Iterator[Connection]:
    """``migration_transaction``, waiting as long as another process holds the lock (or
    until ``stop`` is set: ``StopRequested``)."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    waiting = False
    while True:
        stack = ExitStack()
        try:
            conn = stack.enter_context(migration_transaction(engine, wait=False))
        except (OperationalError, MigrationLockBusy) as exc:
            if isinstance(exc, OperationalError) and not _busy(exc):
                raise
            if time.monotonic() > deadline:
                # SQLite serialises migrations with its write lock, PostgreSQL with ours.
                lock = "migration lock" if isinstance(exc, MigrationLockBusy) else "write lock"
                raise ConfigError(
                    f"another connection has held the database's {lock} for over "
                    f"{LOCK_WAIT_SECONDS:g} s (another process migrating, or a long "
                    "write): try again once it has finished"
                ) from exc
            if not waiting:
                log.info("waiting for another process to finish migrating the database")
                waiting = True
            # A tenth of a second, or less when the server is asked to stop meanwhile.
            if (stop or threading.Event()).wait(0.1):
                raise StopRequested("stopped while waiting for the migration lock") from None
            continue
        with stack:
            yield conn
        return


def _busy(exc: OperationalError) -> bool:
    """SQLite's "database is locked": another connection holds the write lock."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_BUSY


def _connect(settings: Settings, engine: Engine) -> Connection:
    try:
        return engine.connect()
    except DatabaseError as exc:
        raise cannot_connect(exc, sqlite_path(settings)) from exc
