"""Shared by the shutdown, crash and disk-full tests: a slow upstream, a load generator
that keeps the list of acknowledged exchanges, and checks of what the store kept.

``DripOpenAI`` is an OpenAI-compatible fake whose pace is chosen by the model name:
``drip-<chunks>-<ms>[-<tag>]`` streams the echo of the last user message in ``chunks``
pieces ``ms`` apart (non-streaming: answers after ``chunks * ms``); ``stall[-<tag>]``
sends two pieces and then nothing until the fake stops; ``endless[-<tag>]`` streams
64 KiB pieces until the fake stops or its client stops reading. Everything else answers
at once.
The tag only makes a request's model unique, so its request-log row can be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from aiohttp import web

from tests.fakes.runner import FakeServer
from tests.harness import rows, write_config


class _Drip:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Any] = []
        self.runner: web.AppRunner | None = None
        self.stopping: asyncio.Event | None = None

    async def start(self, host: str, port: int) -> int:
        self.stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        assert self.stopping is not None and self.runner is not None
        self.stopping.set()
        await self.runner.cleanup()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        assert self.stopping is not None
        body = orjson.loads(await request.read())
        with self.lock:
            self.received.append(body)
        model = str(body["model"])
        text = "echo: " + str(body["messages"][-1]["content"])
        parts = model.split("-")
        if parts[0] == "drip":
            pieces, delay = int(parts[1]), int(parts[2]) / 1000
        elif parts[0] == "stall":
            pieces, delay = 2, 0.0
        else:
            pieces, delay = 1, 0.0
        if not body.get("stream"):
            if parts[0] == "stall":
                await self.stopping.wait()
            await asyncio.sleep(pieces * delay)
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = {
                "id": "chatcmpl-drip",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [choice],
            }
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if parts[0] == "endless":
            frame = _frame(model, {"content": "x" * 65536}, None)
            with contextlib.suppress(ConnectionError, OSError):
                while not self.stopping.is_set():
                    await response.write(frame)
            return response
        size = -(-len(text) // pieces)
        for index in range(pieces):
            piece = text[index * size : (index + 1) * size]
            await response.write(_frame(model, {"content": piece}, None))
            if delay:
                await asyncio.sleep(delay)
        if parts[0] == "stall":
            await self.stopping.wait()
            return response
        await response.write(_frame(model, {}, "stop") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _frame(model: str, delta: dict[str, Any], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {
        "id": "chatcmpl-drip",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [choice],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class DripOpenAI(FakeServer[_Drip]):
    api_root = "/v1"

    def __init__(self) -> None:
        super().__init__(_Drip(), "127.0.0.1", 0)

    def __enter__(self) -> DripOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_env(
    tmp_path: Path, database_url: str, upstream_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a ``parley serve`` subprocess on ``database_url``, with one
    provider ``up`` at ``upstream_url`` (config written into ``tmp_path``)."""
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": upstream_url, "list_models": False}],
    )
    return {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "PARLEY_LOG_LEVEL": "WARNING",
        "PARLEY_SEARCH_EMBEDDER": "none",
        **backup_env(tmp_path),
        **extra,
    }


def backup_env(tmp_path: Path) -> dict[str, str]:
    """Backup directories under ``tmp_path``: never anywhere near the real home directory."""
    return {
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "backups-fallback"),
    }


@dataclass
class Load:
    """Client threads sending chat requests until stopped; ``acked`` lists the markers
    of every exchange a client saw acknowledged (a 200 body, or a stream's ``[DONE]``)."""

    port: int
    workers: int = 8
    model: str = "up/gpt-4o-mini"
    acked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _round: str = "r0"

    def start(self, tag: str) -> None:
        self._stop.clear()
        self._round = tag
        self._threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, worker: int) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        rng = random.Random(f"{self._round}-{worker}")
        with httpx.Client(timeout=15) as http:
            i = 0
            while not self._stop.is_set():
                marker = f"marker-{self._round}-{worker}-{i}"
                stream = rng.random() < 0.6
                body = {
                    "model": self.model,
                    "stream": stream,
                    "messages": [{"role": "user", "content": marker}],
                }
                try:
                    if stream:
                        with http.stream("POST", url, json=body) as response:
                            lines = list(response.iter_lines())
                        if response.status_code == 200 and "data: [DONE]" in lines:
                            self.acked.append(marker)
                    else:
                        response = http.post(url, json=body)
                        if response.status_code == 200:
                            self.acked.append(marker)
                        else:
                            self.errors.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError:
                    return  # the server is gone
                i += 1


def lost_exchanges(database_url: str, acked: list[str]) -> list[str]:
    """The acknowledged markers whose question or answer is missing from the store."""
    stored = {r["content"] for r in rows(database_url, "SELECT content FROM messages")}
    return [m for m in acked if m not in stored or f"echo: {m}" not in stored]


def integrity(database_url: str) -> str:
    """``PRAGMA integrity_check`` of a SQLite database ("ok" when sound)."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())
    finally:
        engine.dispose()


def refuses_connections(port: int) -> bool:
    """Whether a server on ``port`` refuses connections (its stop has begun)."""
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def wal_size(database_url: str) -> int | None:
    """The size of the SQLite database's ``-wal`` file, None when there is none."""
    path = Path(sa.make_url(database_url).database or "")
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else None


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail if the block takes longer than ``seconds``."""
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    assert took <= seconds, f"took {took:.1f}s, more than {seconds}s"


def kill_at_random(pid: int, rng: random.Random, low: float, high: float) -> float:
    """Sleep a random time in [low, high), then SIGKILL ``pid``; return the time slept."""
    pause = rng.uniform(low, high)
    time.sleep(pause)
    os.kill(pid, 9)
    return pause
