"""DATABASE_URL pointed at another application's database, on a SQLite file and on
PostgreSQL: tables but no ``alembic_version``, an empty one, or one holding the other
application's own Alembic revision.

``parley db current`` printed "none" and exited 0 there (and called another Alembic
history's revision "a newer parley's"), and on SQLite every command, ``serve`` included,
switched the file to WAL mode and took its group and other permissions away before it
refused. Now each says in one line that it is not a parley database, exits 1, and leaves
the database as it was: its tables and rows, and a SQLite file's bytes, mode and
journal mode, with no file made beside it. ``parley restore`` replaced it, ``parley
backup`` archived it as a parley backup, and restoring such an archive put it in the place
of a parley database."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from parley.cli.main import cli
from parley.ops.backup import create_backup
from parley.ops.migrate import upgrade
from parley.settings import Settings, load_settings
from tests.cli.test_backup_cli import env

KINDS = {
    "no alembic_version": [],
    "empty alembic_version": ["CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"],
    "its own revision": [
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
        "INSERT INTO alembic_version VALUES ('ae1027a6acf')",
    ],
    # Numbered as parley numbers its own: `db upgrade` ran parley's 0004 onwards on it.
    "a revision parley has too": [
        "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
        "INSERT INTO alembic_version VALUES ('0003')",
    ],
}
COMMANDS = [
    ("db", "current"),
    ("db", "check"),
    ("db", "upgrade"),
    ("db", "downgrade", "base"),
    ("stats",),
    ("maintenance",),
    ("retention",),
    ("backup",),
]
REFUSAL = "it is not a parley database (another application's?), refusing to use it"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


def _env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return env(tmp_path, database_url, PARLEY_SEARCH_EMBEDDER="none")


def _foreign(database_url: str, kind: str) -> None:
    """Another application's database: an invoices table with a row, and ``kind``."""
    statements = [
        "CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount INTEGER)",
        "INSERT INTO invoices VALUES (1, 100)",
        *KINDS[kind],
    ]
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as db:  # rollback journal, as most applications
            for statement in statements:
                db.execute(statement)
        db.close()
        path.chmod(0o644)
        return
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


def _state(database_url: str) -> tuple[object, ...]:
    """Everything a refusal must leave as it was."""
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        return (
            path.read_bytes(),
            oct(path.stat().st_mode),
            sorted(p.name for p in path.parent.iterdir()),
        )
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        tables = sorted(sa.inspect(conn).get_table_names())
        contents = {
            table: sorted(map(tuple, conn.exec_driver_sql(f"SELECT * FROM {table}").all()))
            for table in tables
        }
    engine.dispose()
    return tables, contents


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_command_refuses_a_foreign_database_and_changes_nothing(
    tmp_path: Path, database_url: str, kind: str
) -> None:
    _foreign(database_url, kind)
    before = _state(database_url)
    env = _env(tmp_path, database_url)
    for args in COMMANDS:
        result = CliRunner().invoke(cli, list(args), env=env)
        assert isinstance(result.exception, SystemExit), (args, result.exc_info)
        assert (result.exit_code, result.stdout) == (1, ""), (args, result.output)
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("error: the database has "), (args, result.stderr)
        assert REFUSAL in result.stderr, (args, result.stderr)
        assert "invoices" in result.stderr, (args, result.stderr)
        assert _state(database_url) == before, args
    # The server itself, as a process: refused before it listens, nothing migrated.
    served = subprocess.run(
        [sys.executable, "-m", "parley", "serve", "--port", "0"],
        cwd=tmp_path,
        env={**os.environ, **env, "PARLEY_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert served.returncode == 1, served.stderr
    assert served.stderr.startswith("parley: the database has ") and REFUSAL in served.stderr
    assert _state(database_url) == before
    assert not (tmp_path / "backups").exists() and not (tmp_path / "fallback").exists()


def _archive_then_empty(settings: Settings) -> Path:
    """A backup of the database, then the database gone (SQLite) or emptied."""
    archive = create_backup(settings).path
    if settings.is_sqlite:
        for path in settings.data_dir.glob("parley.db*"):
            path.unlink()
    else:
        engine = sa.create_engine(settings.database_url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        engine.dispose()
    return archive


def _restore_refused(env: dict[str, str], archive: Path) -> str:
    """``parley restore``'s one line: exit 1, nothing on stdout, no safety backup."""
    result = CliRunner().invoke(cli, ["restore", str(archive), "--yes"], env=env)
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert (result.exit_code, result.stdout) == (1, ""), result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]
    return result.stderr


def test_restore_does_not_replace_a_foreign_database(tmp_path: Path, database_url: str) -> None:
    """A parley backup restored with DATABASE_URL pointed at another application's
    database used to replace it (on PostgreSQL: its ``public`` schema emptied)."""
    env = _env(tmp_path, database_url)
    settings = load_settings(env=env, cwd=tmp_path)
    upgrade(settings)
    archive = _archive_then_empty(settings)
    _foreign(database_url, "no alembic_version")
    before = _state(database_url)
    refused = _restore_refused(env, archive)
    assert refused.startswith("error: the database has tables (invoices) but no parley")
    assert REFUSAL in refused
    assert _state(database_url) == before


def test_restore_refuses_an_archive_of_a_foreign_database(
    tmp_path: Path, database_url: str
) -> None:
    """An archive an older ``parley backup`` made of another application's database."""
    env = _env(tmp_path, database_url)
    settings = load_settings(env=env, cwd=tmp_path)
    _foreign(database_url, "no alembic_version")
    archive = _archive_then_empty(settings)
    upgrade(settings)
    before = _state(database_url)
    assert _restore_refused(env, archive) == (
        f"error: {archive.name} holds tables (invoices) but no parley schema revision: it is "
        "not a backup of a parley database; refusing to restore it\n"
    )
    after = _state(database_url)
    if settings.is_sqlite:  # the restore's lock file is left beside the parley database
        after, before = after[:2], before[:2]
    assert after == before
