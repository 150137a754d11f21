"""``parley maintenance`` and ``parley retention`` through click, on real databases."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner, Result

from parley.cli.maintenance import maintenance, retention
from parley.ops.migrate import upgrade
from parley.ops.presence import ServerPresence
from parley.settings import Settings
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from tests.ops.test_retention import exchange


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


def env_for(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data"), **extra}


def invoke(command: click.Command, env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(command, list(args), env=env)


def seeded(settings: Settings) -> None:
    """Five exchanges 90 days old and two from today (two request rows each)."""
    upgrade(settings)
    engine = create_engine(settings)
    now = datetime.now(UTC)
    old = [exchange(now - timedelta(days=90, minutes=n), n) for n in range(5)]
    with writer_connection(engine) as conn, conn.begin():
        write_batch(conn, [*old, exchange(now, 10), exchange(now, 11)])
    engine.dispose()


@pytest.mark.parametrize("command", [maintenance, retention])
def test_every_command_has_help(command: click.Command) -> None:
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0
    summary = (command.help or "").split("\n")[0]
    assert summary and summary in " ".join(result.output.split())
    assert all(f"--{option}" in result.output for option in ("json",))


def test_a_healthy_store_exits_zero(tmp_path: Path, settings: Settings, database_url: str) -> None:
    seeded(settings)
    env = env_for(tmp_path, database_url)
    result = invoke(maintenance, env)
    assert result.exit_code == 0, result.output
    assert "integrity:" in result.output and result.output.endswith("result: ok\n")
    result = invoke(maintenance, env, "--json")
    assert result.exit_code == 0
    report = orjson.loads(result.output)
    assert (report["ok"], report["mode"]) == (True, "offline")
    assert {c["name"] for c in report["checks"]} >= {"database", "foreign keys", "orphan blobs"}


def test_a_problem_exits_three_and_is_named(
    tmp_path: Path, settings: Settings, database_url: str
) -> None:
    seeded(settings)
    data = b"a blob whose row never committed"
    sha256 = hashlib.sha256(data).hexdigest()
    blob = settings.blob_dir / sha256[:2] / sha256
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    then = time.time() - 7200
    os.utime(blob, (then, then))
    env = env_for(tmp_path, database_url)

    result = invoke(maintenance, env, "--no-vacuum")
    assert result.exit_code == 3
    assert "PROBLEM  orphan blobs: 1 file(s) no attachment names" in result.output
    assert sha256 in result.output
    assert result.output.endswith("result: 1 integrity problem(s), 0 failed step(s)\n")
    result = invoke(maintenance, env, "--no-vacuum", "--json")
    assert result.exit_code == 3
    assert orjson.loads(result.output)["ok"] is False

    result = invoke(maintenance, env, "--no-vacuum", "--remove-orphan-blobs")
    assert result.exit_code == 0
    assert not blob.exists()


def test_offline_maintenance_is_refused_beside_a_server(
    tmp_path: Path, settings: Settings, database_url: str
) -> None:
    seeded(settings)
    env = env_for(tmp_path, database_url)
    with ServerPresence(settings):
        result = invoke(maintenance, env)
        assert result.exit_code == 1
        assert result.stderr.startswith("error: a parley server")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
        assert invoke(maintenance, env, "--no-vacuum").exit_code == 0


def test_retention_deletes_old_rows_and_says_so(
    tmp_path: Path, settings: Settings, database_url: str
) -> None:
    seeded(settings)
    env = env_for(tmp_path, database_url, PARLEY_RETENTION_REQUEST_LOG_DAYS="30")

    result = invoke(retention, env, "--dry-run")
    assert result.exit_code == 0
    assert result.output.startswith("request_log: 10 row(s) older than ")
    assert "would be deleted" in result.output
    assert "http_metrics: 0 row(s) older than" in result.output

    result = invoke(retention, env, "--json")
    assert result.exit_code == 0
    tables = {t["table"]: t for t in orjson.loads(result.output)["tables"]}
    assert (tables["request_log"]["status"], tables["request_log"]["deleted"]) == ("pruned", 10)

    result = invoke(retention, env)
    assert result.exit_code == 0
    assert result.output.startswith("request_log: 0 row(s) older than ")

    kept = invoke(retention, env_for(tmp_path, database_url), "--dry-run")
    assert kept.output.startswith("request_log: kept forever (days = 0)")


def test_errors_are_one_line(tmp_path: Path) -> None:
    env = env_for(tmp_path, f"sqlite:///{tmp_path / 'absent.db'}")
    for command in (maintenance, retention):
        result = invoke(command, env, "--json")
        assert result.exit_code == 1
        assert result.stderr == f"error: no database at {tmp_path / 'absent.db'}" + (
            "\n" if command is maintenance else ": nothing to prune\n"
        )
        assert "Traceback" not in result.output
