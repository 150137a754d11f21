"""The SQLite database holds every conversation and the encrypted provider keys: only its
owner may read it, and SQLite gives its -wal and -shm files the database file's mode."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from parley.ops.migrate import upgrade
from parley.settings import Settings, load_settings
from parley.store.engine import create_engine


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    # The default on most systems, under which SQLite makes files 0644.
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def sqlite_settings(tmp_path: Path) -> Settings:
    database = tmp_path / "data" / "parley.db"
    env = {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{database}",
        "PARLEY_SEARCH_EMBEDDER": "none",
    }
    return load_settings(env=env, cwd=tmp_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_while_writing(settings: Settings, database: Path) -> dict[str, int]:
    """The modes of the database and its -wal and -shm files, while a connection is open."""
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO probe VALUES (1)")
            conn.commit()
            return {
                suffix: mode(database.with_name(database.name + suffix))
                for suffix in ("", "-wal", "-shm")
            }
    finally:
        engine.dispose()


def test_a_new_database_and_its_log_files_are_owner_only(tmp_path: Path) -> None:
    settings = sqlite_settings(tmp_path)
    database = tmp_path / "data" / "parley.db"
    upgrade(settings)  # what a first server start does
    assert mode(database) == 0o600
    assert mode(database.parent) == 0o700
    assert modes_while_writing(settings, database) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_an_existing_world_readable_database_is_made_owner_only_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_settings(tmp_path)
    database = tmp_path / "data" / "parley.db"
    database.parent.mkdir(mode=0o700)
    # A database made by an earlier parley (or by hand) under the umask: 0644, with its
    # -wal and -shm files (another connection has it open), 0644 as well.
    other = sqlite3.connect(database)
    try:
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("CREATE TABLE kept (x INTEGER)")
        other.commit()
        assert mode(database) == mode(database.with_name("parley.db-wal")) == 0o644
        with caplog.at_level(logging.WARNING, logger="parley.store.engine"):
            create_engine(settings).dispose()
        for suffix in ("", "-wal", "-shm"):
            assert mode(database.with_name(database.name + suffix)) == 0o600, suffix
    finally:
        other.close()
    assert "0644" in caplog.text and "0600" in caplog.text and str(database) in caplog.text
    assert modes_while_writing(settings, database) == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_an_owner_only_database_keeps_its_mode_and_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sqlite_settings(tmp_path)
    database = tmp_path / "data" / "parley.db"
    database.parent.mkdir(mode=0o700)
    sqlite3.connect(database).close()
    os.chmod(database, 0o400)  # narrower than parley would make it: left alone
    with caplog.at_level(logging.WARNING, logger="parley.store.engine"):
        create_engine(settings).dispose()
    assert mode(database) == 0o400
    assert caplog.text == ""
