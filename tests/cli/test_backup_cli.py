"""``parley backup`` / ``backup list|verify|prune`` / ``parley restore`` through click,
against a real database, with the settings read from the environment as the server does."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from parley.cli.backup import backup, restore_command
from parley.ops import migrate
from parley.ops.presence import ServerPresence
from tests.ops.backup_support import CANARY, backup_settings, contents, record, seed


@click.group()
def cli() -> None:
    """Stands for ``parley`` (cli/main.py) with the two commands registered."""


cli.add_command(backup)
cli.add_command(restore_command)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


HEAD = migrate.heads()[0]


def env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
        "PARLEY_BACKUP_KEY": "",
        **extra,
    }


def run(tmp_path: Path, database_url: str, *args: str, **extra: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env(tmp_path, database_url, **extra))


def counted(output: str) -> dict[str, str]:
    """The indented "name  N rows|files" lines of a command's output."""
    pairs = (line.split(maxsplit=1) for line in output.splitlines() if line.startswith("  "))
    return {name: value for name, value in pairs}


def test_back_up_list_verify_restore_and_prune(tmp_path: Path, database_url: str) -> None:
    settings = backup_settings(tmp_path, database_url)
    seed(settings, count=4)
    before = contents(settings)

    made = run(tmp_path, database_url, "backup")
    assert made.exit_code == 0, made.output
    lines = made.output.splitlines()
    archive = lines[0].split(" (")[0]
    assert archive.startswith(str(tmp_path / "backups" / "parley-")) and Path(archive).is_file()
    shown = counted(made.output)
    assert shown["request_log"] == "4 rows" and shown["messages"] == "12 rows"
    assert shown["blobs"] == "2 files" and shown["vectors"] == "1 files"

    listed = run(tmp_path, database_url, "backup", "list")
    assert listed.exit_code == 0 and archive in listed.output
    kind = "sqlite" if settings.is_sqlite else "postgresql"
    assert f"{kind}  revision {HEAD}  parley 0.1.0" in listed.output

    checked = run(tmp_path, database_url, "backup", "verify", archive)
    assert checked.exit_code == 0
    assert checked.output.startswith(f"ok: {archive} ({kind}, schema revision {HEAD}, ")

    record(settings, 100, 3)
    refused = run(tmp_path, database_url, "restore", archive)  # no terminal, no --yes
    assert refused.exit_code == 1 and "pass --yes" in refused.stderr
    assert contents(settings) != before

    restored = run(tmp_path, database_url, "restore", archive, "--yes")
    assert restored.exit_code == 0, restored.output
    assert restored.output.startswith(f"restored {archive} ({kind})\n")
    assert "safety backup of the previous state: " in restored.output
    assert counted(restored.output) == shown
    assert contents(settings) == before

    pruned = run(tmp_path, database_url, "backup", "prune", "--keep", "1")
    assert pruned.exit_code == 0
    assert pruned.output.splitlines() == [f"deleted {archive}", "1 deleted, newest 1 kept"]
    assert len(run(tmp_path, database_url, "backup", "list").output.splitlines()) == 1


def test_errors_are_one_line_without_a_traceback(tmp_path: Path, database_url: str) -> None:
    settings = backup_settings(tmp_path, database_url)
    seed(settings, count=1)
    junk = tmp_path / "parley-20260101T000000.000Z.tar.gz"
    junk.write_bytes(b"not an archive at all")

    for args in (("backup", "verify", str(junk)), ("restore", str(junk), "--yes")):
        result = run(tmp_path, database_url, *args)
        assert result.exit_code == 1, args
        assert result.stderr.startswith(f"error: {junk.name} is not a readable parley backup")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    (tmp_path / "elsewhere").mkdir(mode=0o500)
    unwritable = tmp_path / "elsewhere" / "file"
    unwritable.write_text("")
    result = run(tmp_path, database_url, "backup", "--to", str(unwritable / "sub"))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: cannot write the backup into {unwritable / 'sub'}: ")
    assert run(tmp_path, database_url, "backup", "prune", "--keep", "0").exit_code == 2

    made = run(tmp_path, database_url, "backup").output.split(" (")[0]
    with ServerPresence(settings):
        result = run(tmp_path, database_url, "restore", made, "--yes")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: a parley server (or another parley command) is using")
    assert result.stderr.rstrip().endswith("stop it first") and result.stderr.count("\n") == 1


def test_the_backup_key_never_shows(tmp_path: Path, database_url: str) -> None:
    settings = backup_settings(tmp_path, database_url, PARLEY_BACKUP_KEY=CANARY)
    seed(settings, count=2)
    outputs = []
    made = run(tmp_path, database_url, "backup", PARLEY_BACKUP_KEY=CANARY)
    assert made.exit_code == 0 and ".tar.gz.enc (" in made.output and ", encrypted)" in made.output
    archive = made.output.split(" (")[0]
    outputs.append(made.output)
    for args in (("backup", "list"), ("backup", "verify", archive), ("restore", archive, "--yes")):
        result = run(tmp_path, database_url, *args, PARLEY_BACKUP_KEY=CANARY)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    wrong = run(tmp_path, database_url, "backup", "verify", archive, PARLEY_BACKUP_KEY="nope")
    assert wrong.exit_code == 1 and "different key" in wrong.stderr
    outputs.append(wrong.output)
    assert "encrypted" in outputs[1]
    assert all(CANARY not in text for text in outputs)
    for path in (tmp_path / "backups").iterdir():
        assert CANARY.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    "args",
    [("backup",), ("backup", "list"), ("backup", "verify"), ("backup", "prune"), ("restore",)],
)
def test_every_command_explains_itself(args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0
    usage, _, rest = result.output.partition("\n\n")
    assert usage.startswith("Usage:") and len(rest.split("Options:")[0].strip()) > 40


def test_an_unreachable_database_is_one_line_and_never_shows_the_password(
    tmp_path: Path,
) -> None:
    url = f"postgresql+psycopg://parley:{CANARY}@127.0.0.1:1/parley"
    archive = tmp_path / "parley-20260101T000000.000Z.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    for args in (("backup",), ("restore", str(archive), "--yes")):
        result = run(tmp_path, url, *args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "127.0.0.1" in result.stderr and CANARY not in result.output
