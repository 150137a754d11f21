"""Test harness: a real parley server in a thread (or a subprocess) and a config writer.

``ParleyServer`` runs ``create_app(settings)`` on a real socket with its own event loop in
a background thread, so the official ``openai`` SDK and plain HTTP clients talk to it over
loopback exactly as they would in production.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from aiohttp import web

from parley.server.app import create_app
from parley.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent


class ParleyServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ParleyServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(60)
        return self

    async def _start(self) -> None:
        self.app = create_app(self.settings)
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ParleyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(
    directory: Path,
    providers: Sequence[Mapping[str, Any]],
    aliases: Mapping[str, Sequence[str]] | None = None,
    extra: str = "",
) -> Path:
    """Write a parley.toml; values are rendered as TOML by hand (tests only)."""
    lines: list[str] = []
    for provider in providers:
        lines.append("[[providers]]")
        for key, value in provider.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {_toml(value)}")
        for key, value in provider.items():
            if isinstance(value, dict):
                lines.append(f"[providers.{key}]")
                lines.extend(f"{k} = {_toml(v)}" for k, v in value.items())
    if aliases:
        lines.append("[aliases]")
        lines.extend(f"{name} = {_toml(list(targets))}" for name, targets in aliases.items())
    path = directory / "parley.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def settings_for(tmp_path: Path, database_url: str, **env: str) -> Settings:
    base = {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        # No embedder unless a test asks for one (loading the model costs seconds).
        "PARLEY_SEARCH_EMBEDDER": "none",
    }
    base.update(env)
    return load_settings(env=base, cwd=tmp_path)


def rows(database_url: str, query: str, **params: Any) -> list[dict[str, Any]]:
    """Read rows straight from the database the server wrote (tests only)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def as_datetime(value: Any) -> datetime:
    """A timestamp column read back through raw SQL (SQLite gives text)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


@contextmanager
def serve_subprocess(
    tmp_path: Path, env: Mapping[str, str], port: int, log_name: str = "server.log"
) -> Iterator[subprocess.Popen[bytes]]:
    """``parley serve`` as a real process (for kill -9 and CLI tests)."""
    log = open(tmp_path / log_name, "ab")  # noqa: SIM115 - closed below
    full_env = {**os.environ, **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "parley", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError((tmp_path / log_name).read_text())
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not start")
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def leave_after_first_chunk(
    server: ParleyServer, content: str, headers: Mapping[str, str] | None = None
) -> None:
    """Stream ``up/slow-stream`` through ``server`` and hang up after its first chunk."""
    with httpx.stream(
        "POST",
        f"{server.base_url}/chat/completions",
        json={
            "model": "up/slow-stream",
            "stream": True,
            "messages": [{"role": "user", "content": content}],
        },
        headers=headers,
        timeout=10,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
