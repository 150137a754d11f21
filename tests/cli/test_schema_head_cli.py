"""Only ``parley serve`` and ``parley db upgrade`` migrate: every other command that uses the
schema refuses a database that is not at head, in one line, and leaves it as it was (no
migration, no backup), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from parley.cli.main import cli
from parley.ops import migrate
from parley.settings import Settings

# The revision just before head: a database a newer parley has not migrated yet.
BEHIND = migrate.history()[0][1]

READS: list[tuple[str, ...]] = [
    ("stats",),
    ("limits", "list"),
    ("search", "narwhal"),
    ("users", "list"),
    ("export",),
]
WRITES: list[tuple[str, ...]] = [
    ("limits", "set", "--user", "gail", "--rpm", "5"),
    ("limits", "clear", "--user", "gail"),
    ("users", "create", "--email", "n@example.org", "--username", "nina", "--password-stdin"),
    ("users", "set-role", "gail", "admin"),
    ("users", "disable", "gail"),
    ("users", "enable", "gail"),
    ("users", "reset-password", "gail", "--password-stdin"),
    ("users", "unlock", "gail"),
    ("import", "in.json"),
    ("reindex",),
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


def refusals(tmp_path: Path, settings: Settings, expected: str) -> list[str]:
    """Run every command; one line per command that did not refuse exactly as expected or
    changed the database's revision or took a backup."""
    env = {
        "DATABASE_URL": settings.database_url,
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
        "PARLEY_SEARCH_EMBEDDER": "none",
    }
    (tmp_path / "in.json").write_text('{"format": "parley", "version": 1, "conversations": []}')
    before = migrate.current(settings)
    wrong: list[str] = []
    for args in READS + WRITES:
        # reindex stops earlier without an embedder; the database is refused before one loads.
        embedder = {"PARLEY_SEARCH_EMBEDDER": "local"} if args == ("reindex",) else {}
        result = CliRunner().invoke(
            cli, list(args), env={**env, **embedder}, input="pw-long-enough\n"
        )
        now = migrate.current(settings)
        backups = [p.name for d in ("backups", "fallback") for p in (tmp_path / d).glob("*")]
        if (result.exit_code, result.stdout, result.stderr) != (1, "", expected):
            wrong.append(f"{' '.join(args)}: exit {result.exit_code}, {result.output!r}")
        if now != before or backups:
            wrong.append(f"{' '.join(args)}: migrated from {before} to {now}, backups {backups}")
            return wrong
    return wrong


def test_commands_refuse_a_database_behind_head_and_leave_it(
    tmp_path: Path, settings: Settings
) -> None:
    migrate.upgrade(settings, BEHIND)
    expected = (
        f"error: the database is at {BEHIND}, not at the schema head: "
        "run `parley db upgrade` first\n"
    )
    assert refusals(tmp_path, settings, expected) == []
    assert migrate.current(settings) == BEHIND


def test_commands_refuse_an_empty_database_and_leave_it(tmp_path: Path, settings: Settings) -> None:
    expected = "error: the database has no parley schema yet: run `parley db upgrade` first\n"
    assert refusals(tmp_path, settings, expected) == []
    assert migrate.current(settings) is None
