"""A process writer's child that dies, through a real ``parley serve`` on SQLite and
PostgreSQL: what the clients of each recording mode get, and what the store keeps.

- ``async`` recording refuses with 503 before any upstream call, as durable mode does
  (it called the upstream and then answered 500 "the store writer is stopped");
- in ``journal`` mode, an exchange journaled when the child was already gone is
  acknowledged (200), ``/healthz`` counts it as kept, and the next start stores it once
  (the client got a 500 and the next start stored it anyway, as a success).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.harness import free_port, rows, serve_subprocess
from tests.server.crash_support import DripOpenAI, server_env


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").glob("*/children")
        for child in task.read_text().split()
    ]


def chat(port: int, content: str, model: str = "up/gpt-4o-mini") -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}]},
        timeout=30,
    )


def kill_child(pid: int) -> None:
    [child] = children(pid)
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while children(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def process_writer_env(
    tmp_path: Path, database_url: str, upstream: DripOpenAI, recording: str
) -> dict[str, str]:
    return server_env(
        tmp_path, database_url, upstream.base_url, PARLEY_WRITER="process",
        PARLEY_RECORDING=recording,
    )  # fmt: skip


def test_async_recording_refuses_before_the_upstream_when_the_writer_is_gone(
    tmp_path: Path, database_url: str
) -> None:
    with DripOpenAI() as upstream:
        env = process_writer_env(tmp_path, database_url, upstream, "async")
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as server:
            assert chat(port, "before").status_code == 200
            kill_child(server.pid)
            calls = len(upstream.received)
            refused = chat(port, "after")
            assert refused.status_code == 503, refused.text
            assert "writer" in refused.json()["error"]["message"]
            assert len(upstream.received) == calls


def test_a_journaled_exchange_whose_writer_died_is_acknowledged_and_stored_at_restart(
    tmp_path: Path, database_url: str
) -> None:
    with DripOpenAI() as upstream:
        env = process_writer_env(tmp_path, database_url, upstream, "journal")
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as server:
            assert chat(port, "warm").status_code == 200
            # The child dies while the upstream takes a second to answer.
            killer = threading.Timer(0.2, kill_child, (server.pid,))
            killer.start()
            answered = chat(port, "in flight", model="up/drip-5-200")
            killer.join()
            assert answered.status_code == 200, answered.text
            assert answered.json()["choices"][0]["message"]["content"] == "echo: in flight"
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
            assert health["journal"] == {"pending": 1, "kept": 1}
        with serve_subprocess(tmp_path, env, port, "server2.log"):
            stored = rows(
                database_url,
                "SELECT success, status_code FROM request_log WHERE model_requested = :m",
                m="up/drip-5-200",
            )
            assert [(bool(r["success"]), r["status_code"]) for r in stored] == [(True, 200)]
