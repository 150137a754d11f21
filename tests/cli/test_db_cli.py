"""``parley db`` end to end through click, against a real database."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from parley.cli.main import cli
from parley.ops import migrate

COMMANDS = ("upgrade", "downgrade", "current", "history", "check")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


HEAD = migrate.heads()[0]
NO_SCHEMA = "error: the database has no parley schema yet: run `parley db upgrade` first\n"


def run(tmp_path: Path, database_url: str, *args: str) -> Result:
    env = {
        "DATABASE_URL": database_url,
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
    }
    return CliRunner().invoke(cli, ["db", *args], env=env)


def test_upgrade_current_history_check_downgrade(tmp_path: Path, database_url: str) -> None:
    result = run(tmp_path, database_url, "current")
    assert (result.exit_code, result.output) == (0, "none\n")

    result = run(tmp_path, database_url, "upgrade")
    assert (result.exit_code, result.output) == (0, f"database at {HEAD}\n")

    result = run(tmp_path, database_url, "current")
    assert (result.exit_code, result.output) == (0, f"{HEAD} (head)\n")

    result = run(tmp_path, database_url, "history")
    assert result.exit_code == 0
    assert result.output.startswith(f"0011 -> {HEAD} (head): A generated title knows the")
    assert "0010 -> 0011: An answer keeps the notice it" in result.output
    assert "0009 -> 0010: The chain-key index holds only" in result.output
    assert "0006 -> 0007: The request log says when its tokens" in result.output
    assert "0004 -> 0005: The search outbox" in result.output
    assert "0003 -> 0004: Full-text search" in result.output
    assert "0002 -> 0003: Rollups of the request log" in result.output
    assert "0001 -> 0002: Users, API keys" in result.output
    assert "base -> 0001: Initial schema" in result.output

    result = run(tmp_path, database_url, "check")
    assert (result.exit_code, result.output) == (0, "no drift: the database matches the models\n")

    result = run(tmp_path, database_url, "downgrade", "base")
    assert result.exit_code == 0
    backup_line, at = result.output.splitlines()
    assert backup_line.startswith(f"backup taken before migrating: {tmp_path / 'backups'}/parley-")
    assert at == "database at base"

    result = run(tmp_path, database_url, "check")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == NO_SCHEMA


def test_check_without_a_schema_is_one_line(tmp_path: Path, database_url: str) -> None:
    assert run(tmp_path, database_url, "current").output == "none\n"
    result = run(tmp_path, database_url, "check")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", NO_SCHEMA)
    assert run(tmp_path, database_url, "current").output == "none\n"


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = run(tmp_path, "mysql://nobody@localhost/parley", "upgrade")
    assert result.exit_code == 1
    assert result.stderr == "error: unsupported database 'mysql': use sqlite:/// or postgresql://\n"
    assert "Traceback" not in result.output


def test_downgrade_needs_a_revision(tmp_path: Path) -> None:
    result = run(tmp_path, "sqlite:///unused.db", "downgrade")
    assert result.exit_code == 2
    assert "Missing argument 'REVISION'" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented(command: str) -> None:
    result = CliRunner().invoke(cli, ["db", command, "--help"])
    assert result.exit_code == 0
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 20, f"`parley db {command}` has no help text"
