"""kill -9 (and SIGTERM) under load: every exchange a client saw acknowledged is stored."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, rows, serve_subprocess, write_config

pytestmark = pytest.mark.slow


def _load(port: int, worker: int, acked: list[str], stop: threading.Event) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx.Client(timeout=10) as http:
        i = 0
        while not stop.is_set():
            marker = f"marker-{worker}-{i}"
            stream = i % 2 == 1
            body = {
                "model": "up/gpt-4o-mini",
                "stream": stream,
                "messages": [{"role": "user", "content": marker}],
            }
            try:
                if stream:
                    with http.stream("POST", url, json=body) as response:
                        lines = list(response.iter_lines())
                    if response.status_code == 200 and "data: [DONE]" in lines:
                        acked.append(marker)
                else:
                    response = http.post(url, json=body)
                    if response.status_code == 200:
                        acked.append(marker)
            except httpx.HTTPError:
                return  # the server is gone
            i += 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_a_stop_under_load_loses_no_acknowledged_exchange(
    tmp_path: Path, database_url: str, sig: signal.Signals
) -> None:
    with FakeOpenAI() as upstream:
        write_config(
            tmp_path,
            [{"name": "up", "kind": "openai", "base_url": upstream.base_url}],
        )
        env = {
            "PARLEY_DATA_DIR": str(tmp_path / "data"),
            "DATABASE_URL": database_url,
            "PARLEY_LOG_LEVEL": "WARNING",
        }
        port = free_port()
        acked: list[str] = []
        stop = threading.Event()
        with serve_subprocess(tmp_path, env, port) as process:
            workers = [
                threading.Thread(target=_load, args=(port, w, acked, stop)) for w in range(8)
            ]
            for worker in workers:
                worker.start()
            # Under load, then stopped: at least 2 s, and until 60 answers were
            # acknowledged (a busy machine gets there later).
            started = time.monotonic()
            while time.monotonic() - started < 2.0 or (
                len(acked) < 60 and time.monotonic() - started < 30.0
            ):
                time.sleep(0.1)
            os.kill(process.pid, sig)
            returncode = process.wait(40)
            stop.set()
            for worker in workers:
                worker.join(20)

        assert len(acked) > 50, "the load did not get going"
        if sig == signal.SIGTERM:
            # A graceful stop: in-flight requests finish, the writer drains, exit 0.
            assert returncode == 0, (tmp_path / "server.log").read_text()
        stored = {r["content"] for r in rows(database_url, "SELECT content FROM messages")}
        lost = [m for m in acked if m not in stored or f"echo: {m}" not in stored]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged exchanges were lost"
        requests = rows(database_url, "SELECT count(*) AS n FROM request_log")[0]["n"]
        assert requests >= len(acked)

        if database_url.startswith("sqlite"):
            engine = sa.create_engine(database_url)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            engine.dispose()

        # The store opens cleanly again after the crash.
        with serve_subprocess(tmp_path, env, free_port(), "restart.log") as again:
            assert again.poll() is None
