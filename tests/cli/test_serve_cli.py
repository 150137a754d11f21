"""``parley serve`` refuses unsafe exposure and starts on its embedded defaults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import free_port, serve_subprocess


def run_serve(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``parley serve *args`` in ``tmp_path`` until it exits (it is expected to refuse)."""
    return subprocess.run(
        [sys.executable, "-m", "parley", "serve", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_refuses_a_public_address_without_a_master_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PARLEY_MASTER_KEY"}
    env["PARLEY_DATA_DIR"] = str(tmp_path / "data")
    result = run_serve(tmp_path, env, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 1
    assert "PARLEY_MASTER_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_refuses_a_short_master_key_without_echoing_it(tmp_path: Path) -> None:
    env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    env["PARLEY_MASTER_KEY"] = "short-canary-15"
    result = run_serve(tmp_path, env, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 1
    assert "PARLEY_MASTER_KEY must be at least 16 characters" in result.stderr
    assert "canary" not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_starts_on_embedded_defaults_in_a_fresh_directory(tmp_path: Path) -> None:
    # No config file, no DATABASE_URL: SQLite in ./data under the working directory.
    env = {"PARLEY_DATA_DIR": "", "DATABASE_URL": ""}
    with serve_subprocess(tmp_path, env, free_port()) as process:
        assert process.poll() is None
        port = int(process.args[-1])  # type: ignore[index]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models == {"object": "list", "data": []}
    assert (tmp_path / "data" / "parley.db").is_file()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "parley.toml").write_text('[[providers]]\nname = "x"\nkind = "nope"\n')
    env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    result = run_serve(tmp_path, env, "--port", str(free_port()))
    assert result.returncode == 1
    assert "kind must be one of" in result.stderr and "Traceback" not in result.stderr


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": ""}
        result = run_serve(tmp_path, env, "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    # The store it opened is left clean: no marker of an unclean stop for the next start.
    assert not (tmp_path / "data" / "parley.db.running").exists()


@pytest.mark.parametrize(
    ("setting", "value", "complaint"),
    [
        ("DATABASE_URL", "sqlite:///:memory:", "in memory keeps nothing"),
        ("DATABASE_URL", "postgresql://nobody:pw-canary@127.0.0.1:1/x", "cannot connect"),
        ("PARLEY_DATA_DIR", "/dev/null/data", "cannot use the database's directory"),
        ("PARLEY_LOG_LEVEL", "verbose", "log_level must be one of"),
    ],
)
def test_unusable_settings_are_one_line_at_start(
    tmp_path: Path, setting: str, value: str, complaint: str
) -> None:
    """Each was a traceback (or, in memory, a server failing every request)."""
    env = {**os.environ, "PARLEY_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": ""}
    env[setting] = value
    result = run_serve(tmp_path, env, "--port", str(free_port()))
    assert result.returncode == 1, result.stderr
    assert complaint in result.stderr and "Traceback" not in result.stderr
    assert "canary" not in result.stderr
