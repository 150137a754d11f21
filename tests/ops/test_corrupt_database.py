"""Startup on a corrupt or foreign SQLite file: a clear refusal, and the file untouched.

Each case damages a real parley database the way it happens in the field, then starts
parley on it three ways (``prepare_on_start`` as the server calls it, ``parley db
upgrade``, and a real ``parley serve`` process) and checks that each refuses with a
message naming the problem, and that the file's bytes are the same and no ``-wal`` /
``-shm`` appeared beside it (SQLite creates both on open).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from parley.cli.db import db
from parley.errors import ConfigError
from parley.ops import migrate
from parley.ops.dbfile import check_sqlite_file, parse_header
from parley.ops.presence import marker_path, previous_run_unclean
from parley.settings import Settings
from tests.harness import REPO, free_port, rows, settings_for

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sidecars(database: Path) -> list[str]:
    return sorted(
        p.name for p in database.parent.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))
    )


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'parley.db'}",
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    env = env_for(tmp_path)
    return settings_for(tmp_path, env.pop("DATABASE_URL"), **env)


@pytest.fixture
def database(settings: Settings) -> Path:
    """A parley database at head with rows in it, cleanly closed (no -wal left)."""
    migrate.upgrade(settings)
    path = Path(settings.data_dir) / "parley.db"
    seed_sql = (
        "INSERT INTO conversations (public_id, created_at, updated_at, source) VALUES "
        + ", ".join(f"('{i:032x}', '2026-01-01', '2026-01-01', 'api')" for i in range(1, 400))
    )
    _sqlite(path, seed_sql)
    assert sidecars(path) == []
    assert path.stat().st_size > 8 * 4096  # several pages, so truncation can cut mid-file
    return path


def _sqlite(path: Path, *statements: str) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def truncate_mid_file(path: Path) -> None:
    size = path.stat().st_size
    # Whole pages (half of them, whatever their count): only the header's page count tells.
    os.truncate(path, size // 4096 // 2 * 4096)


def truncate_mid_page(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


def truncate_inside_header(path: Path) -> None:
    os.truncate(path, 60)


def zero_header(path: Path) -> None:
    with path.open("r+b") as file:
        file.write(bytes(100))


def text_file(path: Path) -> None:
    path.write_text("DATABASE_URL=postgresql://example/parley\n" * 50)


def png_file(path: Path) -> None:
    path.write_bytes(PNG)


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def bad_page_size(path: Path) -> None:
    with path.open("r+b") as file:
        file.seek(16)
        file.write((3000).to_bytes(2, "big"))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-mid-file": (truncate_mid_file, r"is truncated: its header records \d+ pages"),
    "truncated-mid-page": (truncate_mid_page, r"is truncated: \d+ bytes is not a whole number"),
    "truncated-header": (truncate_inside_header, r"is truncated: 60 bytes, shorter than"),
    "zeroed-header": (zero_header, r"is damaged: its header is all zero bytes"),
    "text": (text_file, r"is not an SQLite database"),
    "png": (png_file, r"is not an SQLite database"),
    "empty": (empty_file, r"is empty \(0 bytes\)"),
    "bad-page-size": (bad_page_size, r"has a damaged SQLite header"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_start_and_db_upgrade_refuse_a_damaged_file_and_leave_it_alone(
    case: str, database: Path, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    damage, message = DAMAGE[case]
    damage(database)
    before = digest(database)

    with pytest.raises(ConfigError, match=message) as refused:
        migrate.prepare_on_start(settings)
    assert str(database) in refused.value.message
    with pytest.raises(ConfigError, match=message):
        migrate.upgrade(settings)
    for command in ("current", "check"):
        with pytest.raises(ConfigError, match=message):
            getattr(migrate, command)(settings)

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(db, ["upgrade"], env=env_for(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: the database file {database} ")

    assert digest(database) == before
    assert sidecars(database) == []


def test_a_healthy_file_passes_and_a_new_install_starts(database: Path, tmp_path: Path) -> None:
    check_sqlite_file(database)
    header = parse_header(database.read_bytes()[:100])
    assert header is not None and header.wal and header.page_count is not None
    assert header.page_count * header.page_size == database.stat().st_size
    check_sqlite_file(tmp_path / "nowhere.db")  # missing: a new install may create it


def crash_with_committed_wal(settings: Settings, tmp_path: Path) -> None:
    """A server that commits rows into the write-ahead log and is killed before any
    checkpoint: its presence marker stays, and the rows live only in ``-wal``."""
    script = textwrap.dedent(
        """
        import os, sqlite3, sys
        from pathlib import Path
        from parley.ops.presence import ServerPresence
        from parley.settings import load_settings

        settings = load_settings(env={"PARLEY_DATA_DIR": sys.argv[1]}, cwd=Path(sys.argv[2]))
        ServerPresence(settings).__enter__()
        conn = sqlite3.connect(sys.argv[1] + "/parley.db", isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(
            "INSERT INTO conversations (public_id, created_at, updated_at, source) "
            "VALUES ('%032x', '2026-02-02', '2026-02-02', 'crash')" % 7777
        )
        os._exit(0)
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, str(settings.data_dir), str(tmp_path)],
        check=True,
        cwd=REPO,
        timeout=60,
    )


def test_a_crash_with_its_log_in_place_recovers_every_committed_row(
    database: Path, settings: Settings, tmp_path: Path
) -> None:
    crash_with_committed_wal(settings, tmp_path)
    assert previous_run_unclean(settings)
    assert (database.parent / "parley.db-wal").stat().st_size > 0
    assert migrate.prepare_on_start(settings, previous_run_unclean=True) == migrate.heads()[0]
    url = f"sqlite:///{database}"
    assert rows(url, "SELECT source FROM conversations WHERE source = 'crash'") == [
        {"source": "crash"}
    ]


def test_a_hot_log_deleted_after_a_crash_is_refused(
    database: Path, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_with_committed_wal(settings, tmp_path)
    (database.parent / "parley.db-wal").unlink()
    before = digest(database)
    shm = (database.parent / "parley.db-shm").read_bytes()

    message = r"did not stop cleanly and the database's write-ahead log .*parley.db-wal is missing"
    with pytest.raises(ConfigError, match=message) as refused:
        migrate.prepare_on_start(settings, previous_run_unclean=True)
    assert str(marker_path(database)) in refused.value.message
    # `parley db upgrade` finds the crash marker on its own.
    with pytest.raises(ConfigError, match=message):
        migrate.upgrade(settings)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(db, ["upgrade"], env=env_for(tmp_path))
    assert result.exit_code == 1
    assert "write-ahead log" in result.stderr and result.stderr.count("\n") == 1

    assert digest(database) == before
    assert sidecars(database) == ["parley.db-shm"]
    assert (database.parent / "parley.db-shm").read_bytes() == shm
    # Told the log held nothing (the marker removed), the same file opens as usual.
    marker_path(database).unlink()
    assert migrate.prepare_on_start(settings) == migrate.heads()[0]


def test_a_log_folded_in_by_a_clean_open_after_a_crash_is_not_refused(
    database: Path, settings: Settings, tmp_path: Path
) -> None:
    crash_with_committed_wal(settings, tmp_path)
    # Someone inspects the database after the crash: their clean close checkpoints the
    # log into the file and removes -wal and -shm. Nothing was lost.
    url = f"sqlite:///{database}"
    assert rows(url, "SELECT source FROM conversations WHERE source = 'crash'")
    assert sidecars(database) == []
    assert migrate.prepare_on_start(settings, previous_run_unclean=True) == migrate.heads()[0]
    assert rows(url, "SELECT source FROM conversations WHERE source = 'crash'")


def test_a_database_missing_beside_its_log_is_not_recreated(
    database: Path, settings: Settings, tmp_path: Path
) -> None:
    crash_with_committed_wal(settings, tmp_path)
    database.rename(database.with_name("moved.db"))
    with pytest.raises(ConfigError, match=r"is missing but its log .*parley.db-wal is still"):
        migrate.prepare_on_start(settings, previous_run_unclean=True)
    assert not database.exists()


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("zeroed-header", "is damaged: its header is all zero bytes"),
        ("truncated-mid-file", "is truncated"),
        ("text", "is not an SQLite database"),
    ],
)
def test_a_real_server_refuses_to_start_on_a_damaged_file(
    case: str, says: str, database: Path, tmp_path: Path
) -> None:
    DAMAGE[case][0](database)
    before = digest(database)
    process = subprocess.run(
        [sys.executable, "-m", "parley", "serve", "--port", str(free_port())],
        cwd=tmp_path,
        env={**os.environ, **env_for(tmp_path)},
        capture_output=True,
        timeout=60,
    )
    assert process.returncode != 0
    stderr = process.stderr.decode()
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"parley: the database file {database} {says}")
    assert digest(database) == before
    assert sidecars(database) == []
