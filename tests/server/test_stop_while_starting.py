"""SIGTERM or SIGINT while ``parley serve`` starts: the startup ends cleanly where it is.

aiohttp's ``GracefulExit``, raised out of the event loop, cancelled the startup wherever it
was. A migration waiting for the database's write lock went on in its thread after the
process had "stopped" (it held the process for up to an hour, the migration lock's
wait); a writer being started was never stopped and the run was left marked as running.

Two steps are made slow from the outside: the migration, by holding the SQLite write lock
in the test (as another process migrating would), and the store writer's child process
(``PARLEY_WRITER=process``), signalled as soon as the child exists, while it starts. Each
time the exit is prompt and clean: status 0, no traceback, the run marked clean (no
``parley.db.running``), the write-ahead log checkpointed away, no half-applied migration
and no writer child left.

The same wait on PostgreSQL, where the test holds the migration's advisory lock: the
wait was one blocking ``pg_advisory_xact_lock`` that no stop could end.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.store.engine import _PG_MIGRATION_LOCK
from tests.conftest import _postgres_database
from tests.harness import free_port, rows
from tests.server.crash_support import integrity, server_env, wal_size

pytestmark = pytest.mark.slow


@contextmanager
def starting(tmp_path: Path, env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``parley serve`` as a process, not waited for: it is stopped while it starts."""
    with open(tmp_path / "server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "parley", "serve", "--port", str(port)],
            cwd=tmp_path,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def wait_until(check: object, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_while_the_migration_waits_for_the_lock_ends_the_start_cleanly(
    tmp_path: Path, number: signal.Signals
) -> None:
    database = tmp_path / "data" / "parley.db"
    database.parent.mkdir(mode=0o700)
    database_url = f"sqlite:///{database}"
    # Another process holding the write lock (a migration of its own, a long write).
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN IMMEDIATE")
    try:
        env = server_env(tmp_path, database_url, "http://127.0.0.1:9/v1", PARLEY_LOG_LEVEL="INFO")
        log_file = tmp_path / "server.log"
        with starting(tmp_path, env, free_port()) as process:
            wait_until(
                lambda: "waiting for another process to finish migrating" in log_file.read_text(),
                "the migration never waited for the lock",
            )
            signalled = time.monotonic()
            process.send_signal(number)
            try:
                returncode = process.wait(20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 20 s after {number.name}:\n{log_file.read_text()}")
            took = time.monotonic() - signalled
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    log = log_file.read_text()
    assert returncode == 0, log
    assert "Traceback" not in log and "Error" not in log, log
    assert "stopped while starting" in log, log
    # One busy timeout (5 s) at most: the lock's wait looks at the stop between tries.
    assert took < 10, f"the stop took {took:.1f}s"
    assert not (tmp_path / "data" / "parley.db.running").exists(), "not marked clean"
    # Nothing of the migration was applied; the next start migrates from scratch.
    assert integrity(database_url) == "ok"
    assert rows(database_url, "SELECT name FROM sqlite_master") == []


def test_a_signal_while_waiting_for_postgresqls_migration_lock_ends_the_start_cleanly(
    tmp_path: Path,
) -> None:
    with contextmanager(_postgres_database)() as database_url:
        holder = sa.create_engine(database_url, poolclass=sa.NullPool)
        try:
            # Another process migrating: it holds the lock until its transaction ends.
            with holder.connect() as conn, conn.begin():
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
                env = server_env(
                    tmp_path, database_url, "http://127.0.0.1:9/v1", PARLEY_LOG_LEVEL="INFO"
                )
                log_file = tmp_path / "server.log"
                with starting(tmp_path, env, free_port()) as process:
                    wait_until(
                        lambda: (
                            "waiting for another process to finish migrating"
                            in log_file.read_text()
                        ),
                        "the migration never waited for the lock",
                    )
                    signalled = time.monotonic()
                    process.send_signal(signal.SIGTERM)
                    try:
                        returncode = process.wait(20)
                    except subprocess.TimeoutExpired:
                        pytest.fail(f"still running 20 s after SIGTERM:\n{log_file.read_text()}")
                    took = time.monotonic() - signalled
            log = log_file.read_text()
            assert returncode == 0, log
            assert "Traceback" not in log and "Error" not in log, log
            assert "stopped while starting" in log, log
            assert took < 5, f"the stop took {took:.1f}s"
            # Nothing of the migration was applied.
            tables = rows(
                database_url,
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
            )
            assert tables == []
        finally:
            holder.dispose()


def test_a_signal_while_the_writer_process_starts_stops_and_reaps_it(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
    env = server_env(tmp_path, database_url, "http://127.0.0.1:9/v1", PARLEY_WRITER="process")
    with starting(tmp_path, env, free_port()) as process:
        wait_until(lambda: _writer_child(process.pid) is not None, "no writer process started")
        child = _writer_child(process.pid)
        assert child is not None
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(30)

    log = (tmp_path / "server.log").read_text()
    assert returncode == 0, log
    assert "Traceback" not in log and "Error" not in log, log
    # The writer's child was stopped (and waited for) before the server exited.
    assert not _alive(child), "the writer process outlived the server"
    assert not (tmp_path / "data" / "parley.db.running").exists(), "not marked clean"
    assert wal_size(database_url) is None, "the store was not closed"
    assert integrity(database_url) == "ok"


def _writer_child(pid: int) -> int | None:
    """The pid of ``pid``'s store writer child process, if it has one yet."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"parley.store.writer_child" in cmdline:
                return int(child)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
