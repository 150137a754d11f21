"""Whether a parley server is using the database, and whether the last one ended cleanly.

Restores, and maintenance that swaps the database file, must never run under a live
server; servers must never start in the middle of either. Both sides agree through a lock
that lives with the database, never through process memory:

- SQLite: ``fcntl.flock`` on ``<database>.lock`` next to the database file. Servers hold it
  shared (several may serve one file); ``exclusive`` takes it exclusively, without
  waiting. The kernel drops a flock when its process dies, so a killed server never
  leaves a stale lock behind.
- PostgreSQL: the session advisory lock ``PRESENCE_LOCK``, held shared by each server on a
  connection of its own for its whole life; ``exclusive`` tries it exclusively. Two
  servers on one PostgreSQL both hold it.

On SQLite a server also leaves a marker file, ``<database>.running``, for as long as it
runs; the last server to stop cleanly removes it after its final checkpoint. A marker
found at start means the previous run did not end cleanly, so its write-ahead log may hold
committed transactions: ``previous_run_unclean`` tells the startup checks to refuse a
database whose ``-wal`` file has gone missing since.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import sqlalchemy
from sqlalchemy.pool import NullPool

from parley.errors import DatabaseInUse
from parley.settings import Settings
from parley.store.engine import cannot_connect, sqlite_path, unusable_directory

# pg_advisory_lock key: "parley-s" (distinct from the migration lock's key).
PRESENCE_LOCK = 0x7061726C65792D73


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def marker_path(database: Path) -> Path:
    return database.with_name(database.name + ".running")


class ServerPresence:
    """Held by a running server for its whole life (see the module docstring).

    ``previous_run_unclean`` is read on entry, before this server writes its own marker.
    Call ``mark_clean()`` once the writer is stopped and the log checkpointed; leaving
    without it (a crash) keeps the marker for the next start to see.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._database = sqlite_path(settings)
        self._fd: int | None = None
        self._engine: sqlalchemy.Engine | None = None
        self._conn: sqlalchemy.Connection | None = None
        self._clean = False
        self.previous_run_unclean = False

    def __enter__(self) -> ServerPresence:
        if self._database is not None:
            try:
                self._enter_sqlite(self._database)
            except OSError as exc:
                raise unusable_directory(self._database.parent, exc) from None
        elif not self._settings.is_sqlite:
            try:
                self._enter_postgres()
            except sqlalchemy.exc.DBAPIError as exc:
                self.__exit__(None, None, None)
                raise cannot_connect(exc) from None
        return self

    def mark_clean(self) -> None:
        self._clean = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None and self._database is not None:
            fd, self._fd = self._fd, None
            try:
                if self._clean:
                    # Only the last server out may say the log is empty: try to become
                    # the sole holder before removing the marker.
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        pass
                    else:
                        marker_path(self._database).unlink(missing_ok=True)
            finally:
                os.close(fd)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _enter_sqlite(self, database: Path) -> None:
        database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUse(
                f"{database} is being restored or maintained by another parley command "
                f"(it holds {lock_path(database)}): start the server once that finishes"
            ) from None
        self._fd = fd
        marker = marker_path(database)
        # A marker with no other server holding the lock was left by a run that crashed.
        try:
            others = _others_hold(fd)
        except BlockingIOError:
            self._fd = None
            os.close(fd)
            raise DatabaseInUse(
                f"{database} is being restored or maintained by another parley command "
                f"(it holds {lock_path(database)}): start the server once that finishes"
            ) from None
        self.previous_run_unclean = marker.exists() and not others
        marker.touch(mode=0o600, exist_ok=True)

    def _enter_postgres(self) -> None:
        self._engine = sqlalchemy.create_engine(
            self._settings.database_url, poolclass=NullPool, hide_parameters=True
        )
        self._conn = self._engine.connect()
        got = self._conn.exec_driver_sql(
            f"SELECT pg_try_advisory_lock_shared({PRESENCE_LOCK})"
        ).scalar()
        self._conn.commit()
        if not got:
            self.__exit__(None, None, None)
            raise DatabaseInUse(
                "the database is being restored or maintained by another parley command: "
                "start the server once that finishes"
            )


def _others_hold(fd: int) -> bool:
    """Whether another process holds the lock too (we hold it shared on ``fd``, and still
    do on return)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # A conversion that fails leaves no lock at all (Linux removes the shared lock
        # before it tries the exclusive one): take the shared one again. Another server
        # holds it shared, so no exclusive command can have taken it in between.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    # Alone: go back to shared so other servers may join.
    fcntl.flock(fd, fcntl.LOCK_SH)
    return False


def previous_run_unclean(settings: Settings) -> bool:
    """For commands run while no server is up: whether the last server crashed."""
    database = sqlite_path(settings)
    return database is not None and marker_path(database).exists() and not server_running(settings)


def server_running(settings: Settings) -> bool:
    """Whether a server (or another exclusive command) holds the database right now."""
    try:
        with exclusive(settings):
            return False
    except DatabaseInUse:
        return True


@contextmanager
def exclusive(settings: Settings) -> Iterator[None]:
    """Hold the database against servers (restore, offline maintenance); never waits.

    Raises ``DatabaseInUse`` when a server (or another such command) holds it, and
    ``ConfigError`` when the database's directory cannot be used or its server reached.
    """
    database = sqlite_path(settings)
    if database is not None:
        try:
            database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise unusable_directory(database.parent, exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DatabaseInUse(
                    f"a parley server (or another parley command) is using {database}: "
                    "stop it first"
                ) from None
            yield
        finally:
            os.close(fd)
        return
    if settings.is_sqlite:  # in-memory: nobody else can hold it
        yield
        return
    engine = sqlalchemy.create_engine(
        settings.database_url, poolclass=NullPool, hide_parameters=True
    )
    try:
        try:
            connection = engine.connect()
        except sqlalchemy.exc.DBAPIError as exc:
            raise cannot_connect(exc) from None
        with connection as conn:
            got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({PRESENCE_LOCK})").scalar()
            conn.commit()
            if not got:
                raise DatabaseInUse(
                    "a parley server (or another parley command) is using the database: "
                    "stop it first"
                )
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({PRESENCE_LOCK})")
                conn.commit()
    finally:
        engine.dispose()
