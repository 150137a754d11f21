"""Maintenance on SQLite and PostgreSQL: VACUUM gives space back, the report finds damage."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parley.errors import ConfigError
from parley.ops.maintenance import MaintenanceReport, run_maintenance
from parley.ops.migrate import check, upgrade
from parley.ops.presence import ServerPresence
from parley.ops.retention import run_retention
from parley.settings import Retention, Settings
from parley.store.attachments import insert_attachment
from parley.store.blobs import BlobStore
from parley.store.engine import create_engine, sqlite_path, writer_connection
from parley.store.exchanges import write_batch
from parley.store.schema import metadata, request_log
from tests.ops.test_retention import exchange

MakeSettings = Callable[..., Settings]
HOUR = 3600.0


def prepared(settings: Settings) -> sa.Engine:
    upgrade(settings)
    engine = create_engine(settings)
    with writer_connection(engine) as conn, conn.begin():
        write_batch(conn, [exchange(datetime.now(UTC), n) for n in range(3)])
    return engine


def attach(engine: sa.Engine, settings: Settings, data: bytes) -> str:
    """An uploaded file the way the files API stores one: blob first, then its row."""
    blobs = BlobStore(settings.blob_dir)
    with blobs.begin() as pending:
        pending.write(data)
        sha256 = pending.finish()
        with writer_connection(engine) as conn, conn.begin():
            insert_attachment(
                conn,
                user_id=None,
                conversation=None,
                filename="notes.txt",
                mime_type="text/plain",
                size=len(data),
                sha256=sha256,
            )
        pending.settle()
    return sha256


def plant_blob(settings: Settings, data: bytes, age: float) -> Path:
    """A blob file no row names, last written ``age`` seconds ago."""
    sha256 = hashlib.sha256(data).hexdigest()
    path = settings.blob_dir / sha256[:2] / sha256
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def checks(report: MaintenanceReport) -> dict[str, Any]:
    return {c.name: (c.ok, c.skipped) for c in report.checks}


def steps(report: MaintenanceReport) -> dict[str, str]:
    return {s.name: s.status for s in report.steps}


def test_a_healthy_store_passes_and_keeps_its_schema(settings: Settings) -> None:
    engine = prepared(settings)
    attach(engine, settings, b"hello")
    report = run_maintenance(settings)
    assert report.mode == "offline"
    assert report.problems == [] and report.failed_steps == []
    assert checks(report) == {
        "database": (True, not settings.is_sqlite),
        "foreign keys": (True, False),
        "messages without conversation": (True, False),
        "orphan blobs": (True, False),
        "missing blobs": (True, False),
        "vectors without rows": (True, True),
    }
    expected = {"vacuum": "done", "vector store": "skipped", "temporary uploads": "done"}
    if settings.is_sqlite:
        expected |= {"checkpoint": "done", "analyze": "done", "final checkpoint": "done"}
    assert steps(report) == expected
    assert check(settings) == []  # planner statistics are not schema drift
    assert report.to_dict()["ok"] is True
    engine.dispose()


def test_the_report_finds_injected_damage(settings: Settings) -> None:
    engine = prepared(settings)
    gone = attach(engine, settings, b"a file whose blob is lost")
    (settings.blob_dir / gone[:2] / gone).unlink()
    orphan = plant_blob(settings, b"left by a crash before its row", age=2 * HOUR)
    fresh = plant_blob(settings, b"an upload about to commit its row", age=1.0)
    # A conversation deleted with foreign keys off: its messages stay behind.
    with engine.connect() as conn:
        victim = conn.exec_driver_sql("SELECT min(id) FROM conversations").scalar_one()
    raw = engine.raw_connection()  # the driver's own: no transaction begun under it
    try:
        cursor = raw.cursor()
        if settings.is_sqlite:
            cursor.execute("PRAGMA foreign_keys=OFF")
        else:
            cursor.execute("SET session_replication_role = replica")  # skips FK triggers
        cursor.execute(f"DELETE FROM conversations WHERE id = {int(victim)}")
        raw.commit()
    finally:
        raw.close()

    report = run_maintenance(settings, vacuum=False)
    found = {c.name: c for c in report.problems}
    assert set(found) == {
        "foreign keys",
        "messages without conversation",
        "orphan blobs",
        "missing blobs",
    }
    assert found["messages without conversation"].detail == "2 message(s)"
    assert "messages.conversation_id -> conversations: 2" in found["foreign keys"].items
    assert found["orphan blobs"].items == (orphan.name,)  # the fresh upload is not named
    assert found["missing blobs"].items == (gone,)
    assert report.failed_steps == []

    # Asked to, maintenance removes the orphan (and only it).
    report = run_maintenance(settings, vacuum=False, remove_orphan_blobs=True)
    assert checks(report)["orphan blobs"] == (True, False)
    assert not orphan.exists() and fresh.exists()
    assert {c.name for c in report.problems} == {
        "foreign keys",
        "messages without conversation",
        "missing blobs",
    }
    engine.dispose()


def test_offline_maintenance_refuses_while_a_server_runs(settings: Settings) -> None:
    prepared(settings).dispose()
    with ServerPresence(settings):
        with pytest.raises(ConfigError, match="stop it first"):
            run_maintenance(settings)
        # What the server schedules for itself runs beside it.
        report = run_maintenance(settings, scheduled=True)
    assert report.mode == "online" and report.problems == [] and report.failed_steps == []
    if settings.is_sqlite:
        assert steps(report)["vacuum"] == "skipped"
        assert checks(report)["database"] == (True, False)
        assert report.checks[0].detail == "quick_check: ok"
    else:
        # Every table parley made, and alembic_version.
        assert [s.detail for s in report.steps if s.name == "vacuum"] == [
            f"VACUUM (ANALYZE) of {len(metadata.tables) + 1} tables"
        ]


def bloat(engine: sa.Engine, rows: int) -> None:
    """Old request-log rows carrying about 2 KB each."""
    started = datetime.now(UTC) - timedelta(days=400)
    base = {
        "attempt": 1,
        "created_at": started,
        "success": False,
        "endpoint": "chat",
        "client_protocol": "openai",
        "provider": "up",
        "model": "m",
        "model_requested": "m",
        "is_streaming": False,
        "message_count": 1,
        "error_message": "x" * 2000,
    }
    with writer_connection(engine) as conn, conn.begin():
        conn.execute(
            sa.insert(request_log),
            [base | {"public_id": uuid.uuid4(), "chain_id": uuid.uuid4()} for _ in range(rows)],
        )


@pytest.mark.parametrize("swap", [False, True], ids=["in-place", "vacuum-into"])
def test_vacuum_gives_space_back_after_a_large_delete(
    tmp_path: Path, make_settings: MakeSettings, swap: bool
) -> None:
    settings = make_settings(tmp_path, retention=Retention(request_log_days=30, batch_size=5000))
    engine = prepared(settings)
    bloat(engine, 6000)
    engine.dispose()
    deleted = run_retention(settings, pause=0, pause_ratio=0).deleted["request_log"]
    assert deleted == 6000
    database = sqlite_path(settings)
    assert database is not None
    before = database.stat().st_size
    mode = database.stat().st_mode & 0o777
    assert before > 12_000_000

    leftover = database.with_name(f".{database.name}.vacuum-0123456789ab")
    leftover.write_bytes(b"a copy a crashed run left before its rename")
    report = run_maintenance(settings, swap_threshold=0 if swap else 1 << 40)
    after = database.stat().st_size
    assert after < before // 10
    assert report.size_before is not None and report.size_after == after
    vacuum = next(s for s in report.steps if s.name == "vacuum")
    assert vacuum.status == "done"
    assert vacuum.detail.startswith("VACUUM INTO" if swap else "VACUUM in place")
    assert not leftover.exists()  # what a crashed swap left is cleared
    assert database.stat().st_mode & 0o777 == mode
    assert [p.name for p in database.parent.iterdir() if ".vacuum-" in p.name] == []
    # Every remaining row is there and the store still takes writes.
    engine = create_engine(settings)
    with engine.connect() as conn:
        counts = conn.exec_driver_sql(
            "SELECT (SELECT count(*) FROM request_log), (SELECT count(*) FROM messages), "
            "(SELECT count(*) FROM conversations)"
        ).one()
    assert tuple(counts) == (6, 6, 3)
    with writer_connection(engine) as conn, conn.begin():
        write_batch(conn, [exchange(datetime.now(UTC), 99)])
    engine.dispose()
    assert run_maintenance(settings, vacuum=False).problems == []


def test_the_swap_waits_for_other_connections_to_close(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    settings = make_settings(tmp_path)
    prepared(settings).dispose()
    database = sqlite_path(settings)
    assert database is not None
    other = sqlite3.connect(database)  # e.g. an operator's sqlite3 shell
    try:
        other.execute("SELECT count(*) FROM messages").fetchone()
        inode = database.stat().st_ino
        report = run_maintenance(settings, swap_threshold=0)
        vacuum = next(s for s in report.steps if s.name == "vacuum")
        assert vacuum.status == "failed"
        assert "has" in vacuum.detail and "open" in vacuum.detail
        assert database.stat().st_ino == inode  # not swapped under the open connection
        assert other.execute("SELECT count(*) FROM messages").fetchone() == (6,)
    finally:
        other.close()
    assert [p.name for p in database.parent.iterdir() if ".vacuum-" in p.name] == []


def test_a_damaged_database_is_reported_and_not_vacuumed(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    settings = make_settings(tmp_path)
    engine = prepared(settings)
    bloat(engine, 2000)
    with engine.connect() as conn:
        root = conn.exec_driver_sql(
            "SELECT rootpage FROM sqlite_master WHERE name = 'ix_request_log_created_at'"
        ).scalar_one()
        page_size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
    engine.dispose()  # checkpoints: every page is in the file now
    database = sqlite_path(settings)
    assert database is not None
    with open(database, "r+b") as handle:  # scribble over the index's root page
        handle.seek((root - 1) * page_size + 100)
        handle.write(os.urandom(page_size - 200))
    report = run_maintenance(settings)
    assert checks(report)["database"] == (False, False)
    assert report.checks[0].items  # SQLite's own words
    assert steps(report)["vacuum"] == "failed"


def test_no_database_is_a_config_error(tmp_path: Path, make_settings: MakeSettings) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(ConfigError, match="no database at"):
        run_maintenance(settings)
    assert not (tmp_path / "data" / "parley.db").exists()
