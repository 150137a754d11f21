"""An answer still streaming when the shutdown's drain is over is recorded as cut off by
the shutdown, not as a client disconnect.

A chat API answer whose client has stopped reading is caught writing to it when the grace
ends, not waiting on its upstream, so the drain cannot interrupt it; aiohttp cancels it 5 s
later. That cancellation was recorded as ``cancelled`` / ``client_disconnected``: the
request log blamed a client that was still connected. The upstream here streams large
deltas without end and the client reads none of them, so the answer is blocked in a
write; after SIGTERM the grace (1 s) and aiohttp's 5 s pass, and the row read after the
stop says ``interrupted`` / ``server_shutdown``.

SQLite only: what is tested is the server's stop, not the database.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.harness import free_port, rows, serve_subprocess
from tests.server.crash_support import DripOpenAI, server_env

pytestmark = pytest.mark.slow


def test_an_answer_cancelled_after_the_drain_is_recorded_as_cut_off_by_the_shutdown(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
    with DripOpenAI() as upstream:
        env = server_env(tmp_path, database_url, upstream.base_url, PARLEY_SHUTDOWN_GRACE="1")
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as process:
            made = httpx.post(
                f"http://127.0.0.1:{port}/api/conversations",
                json={"default_model": "up/endless"},
                timeout=10,
            )
            assert made.status_code == 201, made.text
            body = orjson.dumps({"content": "go on", "stream": True})
            with socket.socket() as client:
                # A client that reads nothing: parley's writes to it soon block.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.connect(("127.0.0.1", port))
                client.sendall(
                    f"POST /api/conversations/{made.json()['id']}/messages HTTP/1.1\r\n"
                    f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                deadline = time.monotonic() + 30
                while not upstream.received:
                    assert time.monotonic() < deadline, "the upstream was never asked"
                    time.sleep(0.02)
                time.sleep(1.0)  # the socket buffers fill up
                process.send_signal(signal.SIGTERM)
                returncode = process.wait(30)

    log = (tmp_path / "server.log").read_text()
    assert returncode == 0, log
    assert "Traceback" not in log, log
    (row,) = rows(
        database_url,
        "SELECT error_type, finish_reason FROM request_log WHERE model_requested = :m",
        m="up/endless",
    )
    assert row == {"error_type": "interrupted", "finish_reason": "server_shutdown"}, log
