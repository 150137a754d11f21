"""Build the one SQLAlchemy ``Engine`` parley uses, for SQLite or PostgreSQL.

Invariants:
- every SQLite connection runs with ``journal_mode=WAL``, ``foreign_keys=ON``,
  ``busy_timeout=5000`` and ``synchronous`` as configured, set on connect, so no
  connection can ever skip them;
- SQLite transactions are SQLAlchemy's, not the ``sqlite3`` module's: the driver's own
  implicit BEGIN is disabled and the engine emits ``BEGIN`` itself (SQLAlchemy's
  documented pysqlite recipe). Without it ``sqlite3`` begins transactions only before
  INSERT/UPDATE/DELETE, so DDL runs in autocommit and a failed migration would leave a
  half-built schema behind;
- a transaction begins ``DEFERRED`` (readers never block the writer in WAL mode), unless
  the connection carries the execution option ``IMMEDIATE`` (see ``writer_connection``):
  the writer and migrations read and then write, and a deferred transaction that must
  upgrade its read lock after another process committed fails with ``SQLITE_BUSY``
  without waiting for the busy timeout. ``BEGIN IMMEDIATE`` takes the write lock up front
  and so waits (up to the busy timeout) instead of failing;
- schema changes run in ``migration_transaction``: one transaction, and on SQLite foreign
  keys off around it and checked before the commit (see there for why);
- PostgreSQL connections come from a ``QueuePool`` with ``pool_pre_ping``, so a restarted
  server costs a reconnect, not an error;
- ``checkpoint`` empties the SQLite write-ahead log at a clean shutdown; ``is_disk_full``
  recognises either database's "out of space" refusal (SQLite's ``SQLITE_FULL``,
  PostgreSQL's SQLSTATE 53100, ``ENOSPC``), so callers can answer 507 rather than 500.

The SQLite database holds every conversation and the encrypted provider keys, so only its
owner may read it: creating an engine makes a missing directory for it with mode 0700, and
takes group and other permissions away from an existing database file and its ``-wal``,
``-shm`` and ``-journal`` files (logged as a warning: a database made before parley did
this, or by hand, is 0644 under the usual umask). The first connection creates a missing
database file with mode 0600 before SQLite opens it; SQLite gives the ``-wal``, ``-shm``
and ``-journal`` files it makes later the database file's own mode. Nothing else touches
the file system, and nothing connects until first use.

A database that cannot be reached or opened (``cannot_connect``) and a database directory
the system refuses (``unusable_directory``) are a ``ConfigError`` of one line, in the
driver's or the system's words, worded here once for server start and every command.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from parley.errors import ConfigError
from parley.paths import reason
from parley.settings import Settings

log = logging.getLogger(__name__)

# Execution option asking for ``BEGIN IMMEDIATE`` on SQLite (ignored on PostgreSQL).
IMMEDIATE = "parley_begin_immediate"

BUSY_TIMEOUT_MS = 5000

AUTOCHECKPOINT_PAGES = 1000

WRITER_PRAGMAS = (
    "PRAGMA cache_size=-65536",
    f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}",
    "PRAGMA journal_size_limit=67108864",
)


def sqlite_path(settings: Settings) -> Path | None:
    """The SQLite database file named by ``settings``, or None (PostgreSQL, in-memory)."""
    if not settings.is_sqlite:
        return None
    database = make_url(settings.database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return path if path.is_absolute() else Path.cwd() / path


def driver_message(exc: Exception) -> str:
    """The driver's own message on one line (it names host and user, never a password;
    SQLAlchemy's text would add the statement, psycopg's spreads over several lines)."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())


def cannot_connect(exc: SQLAlchemyError, database: Path | None = None) -> ConfigError:
    """The one line for a database that cannot be reached or opened (``database``: the
    SQLite file), said the same by server start and every command."""
    if database is not None:
        return ConfigError(f"cannot open the database file {database}: {driver_message(exc)}")
    return ConfigError(f"cannot connect to the database: {driver_message(exc)}")


def unusable_directory(directory: Path, exc: OSError) -> ConfigError:
    """The one line for the database's directory when the system refuses it (a file where
    a directory must be, no permission...): server start, ``ops.presence`` and every
    command say it in these words, never with a traceback."""
    return ConfigError(f"cannot use the database's directory {directory}: {reason(exc, directory)}")


def create_engine(settings: Settings, **kwargs: Any) -> sqlalchemy.Engine:
    """The engine for ``settings.database_url``; extra ``kwargs`` go to SQLAlchemy."""
    url = make_url(settings.database_url)
    # Bound values are prompts and answers: they never belong in an exception or a log.
    kwargs.setdefault("hide_parameters", True)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(settings, **kwargs)
    if url.get_backend_name() == "postgresql":
        kwargs.setdefault("poolclass", QueuePool)
        kwargs.setdefault("pool_pre_ping", True)
        return sqlalchemy.create_engine(url, **kwargs)
    raise ConfigError(
        f"unsupported database {url.get_backend_name()!r}: use sqlite:/// or postgresql://"
    )


def writer_connection(engine: sqlalchemy.Engine) -> sqlalchemy.Connection:
    """A connection whose transactions take the SQLite write lock when they begin.

    On SQLite it also gets a 64 MiB page cache, so index pages stay hot from batch to
    batch, and SQLite's default auto-checkpoint of ~4 MiB of WAL (the commit that
    crosses it does the checkpoint). The exchange writer switches that off while its
    ``Checkpointer`` folds the log in from another thread; small, frequent checkpoints
    keep tail latency down either way (measured with ``bench/proxy_bench.py`` at
    concurrency 16: p99 36 ms at 1,000 pages against 95 ms at 10,000, same throughput).
    The settings stay with the pooled connection, which is harmless for a reader that
    gets it later.
    """
    conn = engine.connect().execution_options(**{IMMEDIATE: True})
    if conn.dialect.name == "sqlite":
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        # On the driver connection: through SQLAlchemy these would open a transaction.
        for pragma in WRITER_PRAGMAS:
            dbapi_connection.execute(pragma)
    return conn


def checkpoint(engine: sqlalchemy.Engine) -> bool:
    """Fold the SQLite write-ahead log into the database and truncate it to zero bytes.

    Run at a clean shutdown, after the writer stopped, so that the database file alone
    holds every commit. Returns whether the log is empty now: False when another
    connection (another server on the same file, a reader) kept part of it in use, which
    is logged. Always True on PostgreSQL, which has nothing of the kind to do.
    """
    if engine.dialect.name != "sqlite":
        return True
    with engine.connect() as conn:
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        # On the driver connection: the pragma may not run inside a transaction.
        busy, frames, done = dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if busy or (frames > 0 and done < frames):
        log.warning(
            "write-ahead log checkpoint incomplete (%s of %s pages): another connection "
            "is using the database",
            done,
            frames,
        )
        return False
    return True


class Checkpointer:
    """Folds the SQLite write-ahead log into the database from a thread of its own.

    The writer's connection runs with ``wal_autocheckpoint=0`` while this runs, so no
    group commit ever carries a checkpoint (and every request waiting on that commit
    with it): measured with ``bench/writer_bench.py``, the checkpoints a commit did cost
    one-exchange batches ~150 us each on average. ``committed()`` (called by the writer
    after each commit) wakes the thread; it runs a ``PASSIVE`` checkpoint at most every
    ``interval`` seconds, on a connection of its own. ``PASSIVE`` never blocks a writer
    or a reader, and the ``sqlite3`` module releases the GIL while SQLite works, so the
    copy and its fsync overlap the writer's next batches instead of delaying one.

    A checkpoint that fails (disk full, I/O error) is logged once per episode and
    retried at the next interval: the log only grows meanwhile, nothing is lost.

    The log restarts from its beginning (instead of growing) only when a write begins
    with every frame of it folded in, which a checkpoint on another thread never sees
    under steady load: the writer commits again before each one ends. Measured at
    concurrency 1, the log grew by ~40 MB a second without end, and every page lookup
    searched a longer log index. So once this thread reads a log of ``restart_frames``
    or more, ``committed`` folds in the last frames on the writer's own connection,
    between two batches, and the next batch starts the log over. That checkpoint copies
    the frames written while this thread's last one ran, then syncs: at 4,096 frames it
    cost one-exchange group commits ~13% of their rate (``writer_bench.py --clients 1``),
    at 16,384 (a log of 64 MiB at most, plus what one interval adds) nothing measurable.
    """

    def __init__(
        self, engine: sqlalchemy.Engine, interval: float = 0.25, restart_frames: int = 16384
    ) -> None:
        self._engine = engine
        self._interval = interval
        self._restart_frames = restart_frames
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Frames in the log at this thread's last checkpoint, set by this thread and
        # cleared by the writer once it acted on it (an int: safe to share).
        self._log_frames = 0
        self.checkpoints = 0
        self.restarts = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="parley-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, conn: sqlalchemy.Connection) -> None:
        """The writer committed on ``conn``: there is log to fold in; if the log is long,
        fold its last frames in on ``conn`` now (see the class)."""
        self._wake.set()
        if self._log_frames < self._restart_frames:
            return
        # Once per reading of this thread: a log held by a reader (or a failing disk)
        # must not cost every batch a checkpoint.
        self._log_frames = 0
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        try:
            busy, frames, done = dbapi_connection.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
        except Exception as exc:
            # This thread's own checkpoints log a failing disk; nothing is lost.
            log.debug("write-ahead log checkpoint on the writer's connection failed: %s", exc)
            return
        if not busy and done == frames:
            self.restarts += 1

    def stop(self) -> None:
        """End the thread after at most one more checkpoint."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        failing = False
        conn: Any = None
        try:
            while not self._stopping:
                self._wake.wait()
                if self._stopping:
                    return
                self._wake.clear()
                try:
                    if conn is None:
                        conn = self._engine.raw_connection()
                    busy, frames, _ = conn.driver_connection.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if not busy:  # busy (the writer checkpointing): no reading, -1
                        self._log_frames = frames
                    self.checkpoints += 1
                    if failing:
                        log.info("write-ahead log checkpoints succeed again")
                    failing = False
                except Exception as exc:
                    if not failing:
                        log.warning("write-ahead log checkpoint failed: %s", exc)
                    failing = True
                    if conn is not None:
                        conn.invalidate()
                        conn = None
                time.sleep(self._interval)
        finally:
            if conn is not None:
                conn.close()


_PG_DISK_FULL = "53100"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is the database refusing a write for lack of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _says_full(current):
            return True
        # SQLAlchemy keeps the driver's exception in ``orig``; others chain it.
        orig = getattr(current, "orig", None)
        current = (
            orig if isinstance(orig, BaseException) else current.__cause__ or current.__context__
        )
    return False


def _says_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    # psycopg's DiskFull, without importing the driver on SQLite-only installs.
    return getattr(exc, "sqlstate", None) == _PG_DISK_FULL


_PG_MIGRATION_LOCK = 0x7061726C6579  # "parley"


class MigrationLockBusy(Exception):
    """Another process holds PostgreSQL's migration lock (``migration_transaction`` with
    ``wait=False``): nothing was done, try again."""


@contextmanager
def migration_transaction(
    engine: sqlalchemy.Engine, *, wait: bool = True
) -> Iterator[sqlalchemy.Connection]:
    """One write transaction for a schema change; commits only if the body returns.

    On PostgreSQL, ``wait=False`` raises ``MigrationLockBusy`` instead of waiting for
    another process's migration (on SQLite, ``BEGIN IMMEDIATE`` waits only the busy
    timeout either way), so that a caller can look at other things between tries.

    SQLite changes a table by copying it to a new one and dropping the old, and with
    foreign keys on, that drop deletes (or cascades into) every referencing row. So, as
    SQLite's documentation prescribes, foreign keys are switched off outside the
    transaction (the pragma is ignored inside one), checked with ``foreign_key_check``
    before the commit, and switched back on afterwards.
    """
    with writer_connection(engine) as conn:
        dbapi_connection = conn.connection.dbapi_connection
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            assert dbapi_connection is not None
            dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if not sqlite:
                    # One migrator at a time across processes: the others wait here (on
                    # SQLite, BEGIN IMMEDIATE already serialises them).
                    lock = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
                    got = conn.exec_driver_sql(f"SELECT {lock}({_PG_MIGRATION_LOCK})").scalar()
                    if got is False:
                        raise MigrationLockBusy
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise ConfigError(
                            f"schema change broke {len(broken)} foreign key(s), first: "
                            f"{tuple(broken[0])}; rolled back"
                        )
        finally:
            if sqlite and dbapi_connection is not None:
                dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _sqlite_engine(settings: Settings, **kwargs: Any) -> sqlalchemy.Engine:
    synchronous = settings.sqlite_synchronous.upper()
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        # Interpolated into a PRAGMA below, so it must be one of SQLite's own words.
        raise ConfigError(f"sqlite_synchronous must be FULL or NORMAL, got {synchronous!r}")
    path = sqlite_path(settings)
    if path is not None:
        if not path.parent.exists():
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise unusable_directory(path.parent, exc) from None
        owner_only(path)
    engine = sqlalchemy.create_engine(settings.database_url, **kwargs)

    if path is not None:
        database = path

        @event.listens_for(engine, "do_connect")
        def _before_connect(*_args: Any) -> None:
            # Made here, not by SQLite (0644 under the usual umask), so that it and the
            # -wal and -shm files SQLite copies its mode to are never readable by others.
            create_owner_only(database)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from sqlite3 (see the module docstring); the pragmas below then
        # run outside any transaction, which journal_mode requires.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            provide_log2(dbapi_connection)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sqlalchemy.Connection) -> None:
        immediate = conn.get_execution_options().get(IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def provide_log2(dbapi_connection: Any) -> None:
    """Give the connection ``log2`` if its SQLite was built without its math functions
    (``SQLITE_ENABLE_MATH_FUNCTIONS``, on by default since 3.35 but not in every build):
    the metrics reports bin raw values with it (``store.edges.sql_bin``)."""
    if not _sqlite_has_log2():
        dbapi_connection.create_function("log2", 1, _log2, deterministic=True)


@functools.cache
def _sqlite_has_log2() -> bool:
    # One SQLite library per process: asked once, not on every connection.
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("SELECT log2(2.0)")
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()
    return True


def _log2(value: float | None) -> float | None:
    # As SQLite's own: NULL for NULL and for what has no logarithm.
    return math.log2(value) if value is not None and value > 0 else None


# Owner read and write: the database holds every conversation and the encrypted keys.
DATABASE_MODE = 0o600
SIDECARS = ("-wal", "-shm", "-journal")


def create_owner_only(database: Path) -> None:
    """Create ``database`` as an empty file with mode 0600 unless it exists (SQLite takes
    an empty file for an empty database); an existing file is never touched."""
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DATABASE_MODE)
    except OSError:
        # It exists; or it cannot be made, and SQLite's own open then fails with the
        # error its callers expect.
        return
    try:
        # The umask may have narrowed the mode (0400 would make it read-only): set it.
        os.fchmod(fd, DATABASE_MODE)
    finally:
        os.close(fd)


def owner_only(database: Path) -> None:
    """Take group and other permissions away from ``database`` and its -wal, -shm and
    -journal files, where they have any; logged, as it changes a file the user made."""
    for path in (database, *(database.with_name(database.name + s) for s in SIDECARS)):
        try:
            info = path.stat()
        except OSError:
            continue  # missing (most sidecars), or unreadable: SQLite will say so
        before = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode) or not before & 0o077:
            continue
        after = before & ~0o077
        try:
            os.chmod(path, after)
        except OSError as exc:
            log.warning(
                "%s may be read by other users (mode %04o) and could not be made owner-only: %s",
                path,
                before,
                exc,
            )
            continue
        log.warning(
            "%s could be read by other users (mode %04o): made it owner-only (mode %04o), "
            "as parley makes its database files",
            path,
            before,
            after,
        )
