"""Restores on a real SQLite file and a real PostgreSQL database: identical contents, a
safety backup first, refusals that leave the current data untouched."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.errors import BackupError, ConfigError
from parley.ops import migrate
from parley.ops.backup import create_backup, list_backups, verify_backup
from parley.ops.presence import ServerPresence
from parley.ops.restore import restore_backup
from parley.settings import Settings
from parley.store.engine import create_engine, sqlite_path
from tests.conftest import _postgres_database
from tests.ops.backup_support import (
    CANARY,
    backup_settings,
    contents,
    counts,
    data_files,
    flip_byte,
    record,
    seed,
)

HEAD = migrate.heads()[0]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return backup_settings(tmp_path, database_url)


def change_everything(settings: Settings) -> None:
    """Move the current state away from the backup's: rows, a new table, blobs, vectors."""
    record(settings, 1000, 7)
    engine = create_engine(settings)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM responses WHERE id < 8")
        conn.exec_driver_sql("CREATE TABLE stray (id INTEGER PRIMARY KEY)")
    engine.dispose()
    shutil.rmtree(settings.data_dir / "vectors")
    blob = next(p for p in settings.blob_dir.glob("??/*") if p.is_file())
    blob.unlink()
    (settings.blob_dir / "ff").mkdir()
    (settings.blob_dir / "ff" / ("ff" * 32)).write_bytes(b"added after the backup")


def execute(settings: Settings, sql: str) -> None:
    engine = create_engine(settings)
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def test_a_restore_reproduces_the_backed_up_state_exactly(settings: Settings) -> None:
    seed(settings)
    before, before_files = contents(settings), data_files(settings)
    info = create_backup(settings)
    change_everything(settings)
    changed = counts(settings)
    assert contents(settings) != before and data_files(settings) != before_files

    report = restore_backup(settings, info.path)

    assert contents(settings) == before  # every table, every row, the stray table gone
    assert data_files(settings) == before_files
    assert report.tables == {t: len(r) for t, r in before.items()}
    assert report.blobs == len(before_files["blobs"]) and report.vectors == 1
    assert report.schema_revision == HEAD and report.migrated_to is None
    # The state it replaced was backed up first, and that backup holds it.
    assert report.safety_backup is not None and report.safety_backup.parent == settings.backup.dir
    safety = verify_backup(report.safety_backup, settings)
    assert {t: v["rows"] for t, v in safety["database"]["tables"].items()} == changed
    assert (
        "reason"
        in next(b for b in list_backups(settings) if b.path == report.safety_backup).manifest
    )
    assert report.kept_aside == []
    assert migrate.check(settings) == []


def test_an_encrypted_archive_restores_only_with_its_key(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = backup_settings(tmp_path, database_url, PARLEY_BACKUP_KEY=CANARY)
    seed(settings)
    before = contents(settings)
    info = create_backup(settings)
    record(settings, 500, 3)
    after = contents(settings)

    wrong = backup_settings(tmp_path, database_url, PARLEY_BACKUP_KEY="not the key")
    with pytest.raises(BackupError, match="encrypted with a different key"):
        restore_backup(wrong, info.path)
    assert contents(settings) == after
    assert [b.path for b in list_backups(settings)] == [info.path]  # no safety backup yet

    report = restore_backup(settings, info.path)
    assert contents(settings) == before
    assert report.safety_backup is not None and report.safety_backup.name.endswith(".enc")
    assert "restored" in caplog.text and CANARY not in caplog.text
    for path in settings.backup.dir.iterdir():
        assert CANARY.encode() not in path.read_bytes()


def test_a_damaged_archive_is_refused_and_the_current_data_left_alone(
    settings: Settings,
) -> None:
    seed(settings)
    info = create_backup(settings)
    record(settings, 500, 3)
    current, current_files = contents(settings), data_files(settings)
    flip_byte(info.path)

    with pytest.raises(BackupError, match="damaged"):
        restore_backup(settings, info.path)
    assert contents(settings) == current and data_files(settings) == current_files
    assert [b.path for b in list_backups(settings)] == [info.path]
    assert not list(settings.data_dir.glob(".parley-tmp-*"))  # staging cleaned up


def test_a_restore_is_refused_while_a_server_holds_the_database(settings: Settings) -> None:
    seed(settings, count=3)
    info = create_backup(settings)
    record(settings, 500, 2)
    current = contents(settings)
    with ServerPresence(settings), pytest.raises(ConfigError, match="stop it first"):
        restore_backup(settings, info.path)
    assert contents(settings) == current
    assert len(list_backups(settings)) == 1


def test_an_older_schema_is_migrated_after_the_restore(settings: Settings) -> None:
    migrate.upgrade(settings, "0001")
    engine = create_engine(settings)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO request_log (public_id, chain_id, attempt, created_at, success, "
                "endpoint, client_protocol, provider, model, model_requested, is_streaming, "
                "message_count) VALUES (:public_id, :chain_id, 1, :at, :yes, 'chat', "
                "'openai', 'up', 'm', 'm', :no, 1)"
            ),
            {
                "public_id": uuid.uuid4().hex,
                "chain_id": uuid.uuid4().hex,
                "at": datetime.now(UTC),
                "yes": True,
                "no": False,
            },
        )
    engine.dispose()
    old = create_backup(settings)
    assert old.manifest["schema_revision"] == "0001"
    migrate.upgrade(settings)
    record(settings, 0, 2)

    report = restore_backup(settings, old.path)
    assert report.schema_revision == "0001" and report.migrated_to == HEAD
    assert migrate.current(settings) == HEAD and migrate.check(settings) == []
    assert counts(settings)["request_log"] == 1


def test_an_archive_from_a_newer_parley_is_refused(settings: Settings) -> None:
    seed(settings, count=2)
    execute(settings, "UPDATE alembic_version SET version_num = '9999_future'")
    future = create_backup(settings)
    execute(settings, f"UPDATE alembic_version SET version_num = '{HEAD}'")
    current = contents(settings)
    with pytest.raises(BackupError, match="9999_future, which this version of parley does not"):
        restore_backup(settings, future.path)
    assert contents(settings) == current


def test_an_archive_of_the_other_database_kind_is_refused(tmp_path: Path) -> None:
    lite = backup_settings(tmp_path / "lite", f"sqlite:///{tmp_path / 'lite' / 'parley.db'}")
    with contextmanager(_postgres_database)() as url:
        pg = backup_settings(tmp_path / "pg", url)
        seed(lite, count=1)
        seed(pg, count=1)
        lite_archive, pg_archive = create_backup(lite).path, create_backup(pg).path
        lite_before, pg_before = contents(lite), contents(pg)
        with pytest.raises(BackupError, match="holds a sqlite database and parley is configured"):
            restore_backup(pg, lite_archive)
        with pytest.raises(BackupError, match=r"holds a postgresql database .* `parley export`"):
            restore_backup(lite, pg_archive)
        assert contents(lite) == lite_before and contents(pg) == pg_before


def test_a_pg_restore_that_dies_midway_leaves_the_database_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_restore dies after its first complete statements (killed, out of memory...):
    psql must not commit the emptied schema it was given so far."""
    real = shutil.which("pg_restore")
    assert real is not None
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "pg_restore"
    fake.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do [ "$a" = --list ] && exec {real} "$@"; done\n'
        f"{real} \"$@\" | awk '/^CREATE TABLE/ {{ exit }} {{ print }}'\n"
        "echo 'pg_restore: error: could not read input file: Input/output error' >&2\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    with contextmanager(_postgres_database)() as url:
        settings = backup_settings(tmp_path / "pg", url)
        seed(settings, count=3)
        archive = create_backup(settings).path
        record(settings, 500, 2)
        before = contents(settings)
        monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
        with pytest.raises(BackupError, match="pg_restore failed, the database was left as"):
            restore_backup(settings, archive)
        assert contents(settings) == before


def test_stale_wal_and_shm_files_are_removed_before_the_swap(tmp_path: Path) -> None:
    settings = backup_settings(tmp_path, f"sqlite:///{tmp_path / 'data' / 'parley.db'}")
    seed(settings)
    expected = contents(settings)
    info = create_backup(settings)
    database = sqlite_path(settings)
    assert database is not None
    # A hot write-ahead log of other transactions, left by a crashed process.
    wal = database.with_name("parley.db-wal")
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("DELETE FROM responses")
    conn.execute("UPDATE messages SET content = 'overwritten by the stale log'")
    conn.commit()
    stale_wal = wal.read_bytes()
    conn.close()
    assert stale_wal
    wal.write_bytes(stale_wal)
    database.with_name("parley.db-shm").write_bytes(b"\x00" * 32768)

    report = restore_backup(settings, info.path, safety_backup=False)

    assert contents(settings) == expected  # the old log was not replayed onto the restore
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as conn2:
        assert conn2.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    engine.dispose()
    # Without a safety backup nothing replaced is deleted: it is kept aside.
    aside = {p.name.split(".pre-restore-")[0] for p in report.kept_aside}
    assert {"parley.db", "parley.db-wal", "parley.db-shm"} <= aside
    old = next(p for p in report.kept_aside if p.name.startswith("parley.db.pre-restore-"))
    assert old.read_bytes()[:16] == b"SQLite format 3\x00"


def test_with_a_safety_backup_the_stale_log_is_replaced_not_kept(settings: Settings) -> None:
    seed(settings, count=5)
    info = create_backup(settings)
    record(settings, 100, 5)
    report = restore_backup(settings, info.path)
    assert report.safety_backup is not None and report.kept_aside == []
    leftovers = [p.name for p in settings.data_dir.iterdir() if "pre-restore" in p.name]
    assert leftovers == []
    assert counts(settings)["request_log"] == 5
