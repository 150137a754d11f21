"""Graceful shutdown: SIGTERM stops accepting, lets open answers finish within the grace
period, records the rest as interrupted (their clients get an error, never a clean end),
commits everything, empties the write-ahead log and exits 0."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, free_port, rows, serve_subprocess, settings_for
from tests.server.crash_support import (
    DripOpenAI,
    backup_env,
    integrity,
    refuses_connections,
    server_env,
    wal_size,
)

GRACE = 6.0


class Client(threading.Thread):
    """One chat request in a thread, keeping every line (or the body) it got."""

    def __init__(
        self,
        url: str,
        model: str,
        stream: bool,
        path: str = "/v1/chat/completions",
        body: dict[str, Any] | None = None,
    ):
        super().__init__(daemon=True)
        self.url = url + path
        self.request_body = body
        self.model = model
        self.stream = stream
        self.anthropic = path == "/v1/messages"
        self.status: int | None = None
        self.lines: list[str] = []
        self.body: Any = None
        self.error: Exception | None = None
        self.first = threading.Event()
        self.done_at = 0.0

    def run(self) -> None:
        body: dict[str, Any] = self.request_body or {
            "model": self.model,
            "stream": self.stream,
            "messages": [{"role": "user", "content": f"question for {self.model}"}],
        }
        if self.anthropic:
            body["max_tokens"] = 100
        try:
            with httpx.Client(timeout=60) as http:
                if self.stream:
                    with http.stream("POST", self.url, json=body) as response:
                        self.status = response.status_code
                        for line in response.iter_lines():
                            if line:
                                self.lines.append(line)
                                self.first.set()
                else:
                    response = http.post(self.url, json=body)
                    self.status = response.status_code
                    self.body = response.json()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.done_at = time.monotonic()
            self.first.set()

    @property
    def last_data(self) -> Any:
        data = [line.removeprefix("data: ") for line in self.lines if line.startswith("data: ")]
        return data[-1] if data[-1] == "[DONE]" else orjson.loads(data[-1])


@pytest.mark.slow
def test_sigterm_with_50_open_streams(tmp_path: Path, database_url: str) -> None:
    with DripOpenAI() as upstream:
        env = server_env(
            tmp_path, database_url, upstream.base_url, PARLEY_SHUTDOWN_GRACE=str(GRACE)
        )
        port = free_port()
        root = f"http://127.0.0.1:{port}"
        with serve_subprocess(tmp_path, env, port) as process:
            # 20 answers that take 3 s (they finish within the grace), 25 streams and 5
            # plain requests whose upstream never finishes (interrupted at its end).
            finishing = [Client(root, f"up/drip-30-100-f{i}", True) for i in range(20)]
            stalled = [Client(root, f"up/stall-s{i}", True) for i in range(25)]
            waiting = [Client(root, f"up/stall-n{i}", False) for i in range(5)]
            clients = finishing + stalled + waiting
            for client in clients:
                client.start()
            deadline = time.monotonic() + 30
            while len(upstream.received) < len(clients) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(upstream.received) == len(clients)
            for client in finishing + stalled:
                assert client.first.wait(30)
            assert all(c.done_at == 0.0 for c in stalled), "a stalled stream ended early"

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # Nothing new is accepted while the open streams carry on.
            refused_at = None
            while time.monotonic() - signalled < GRACE - 1:
                if refuses_connections(port):
                    refused_at = time.monotonic()
                    break
                time.sleep(0.05)
            returncode = process.wait(GRACE + 30)
            took = time.monotonic() - signalled
            for client in clients:
                client.join(30)
        log = (tmp_path / "server.log").read_text()

    assert returncode == 0, log
    assert refused_at is not None, "new connections were still accepted during the grace"
    assert all(c.done_at == 0.0 or c.done_at > refused_at for c in stalled)
    # Exit within the grace period, plus the moment interrupted answers get to end.
    assert took < GRACE + 4, f"exit took {took:.1f}s"

    # Answers in flight finished during the grace, each acknowledged with [DONE].
    for client in finishing:
        assert client.error is None and client.status == 200, client.error
        assert client.last_data == "[DONE]", client.lines[-3:]
    assert any(c.done_at > signalled for c in finishing), "no answer was still open at SIGTERM"
    # The others were held for the grace, then ended with an error event or a 503.
    for client in stalled:
        assert client.status == 200 and client.error is None, client.error
        assert "data: [DONE]" not in client.lines
        assert client.last_data["error"]["code"] == "server_shutting_down", client.lines[-2:]
        assert client.done_at - signalled > GRACE - 1
    for client in waiting:
        assert client.status == 503, client.body
        assert client.body["error"]["code"] == "server_shutting_down"

    # Every one of them is recorded: complete, or interrupted by the shutdown.
    logged = {
        r["model_requested"].removeprefix("up/"): r
        for r in rows(
            database_url,
            "SELECT model_requested, success, finish_reason, error_type, error_message "
            "FROM request_log",
        )
    }
    assert len(logged) == 50
    for client in finishing:
        row = logged[client.model.removeprefix("up/")]
        assert bool(row["success"]) and row["finish_reason"] == "stop", row
    for client in stalled + waiting:
        row = logged[client.model.removeprefix("up/")]
        assert not row["success"], row
        assert (row["error_type"], row["finish_reason"]) == ("interrupted", "server_shutdown")
        assert "shut down" in row["error_message"]
    answers = {r["content"] for r in rows(database_url, "SELECT content FROM messages")}
    assert all(f"echo: question for {c.model}" in answers for c in finishing)

    if database_url.startswith("sqlite"):
        # Checkpointed and closed: the database file alone holds everything.
        assert not wal_size(database_url), "the write-ahead log was left behind"
        assert not (tmp_path / "data" / "parley.db.running").exists(), "not marked clean"
        assert integrity(database_url) == "ok"


@pytest.mark.slow
def test_sigterm_when_idle_exits_at_once_and_leaves_no_log(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
    with DripOpenAI() as upstream:
        env = server_env(tmp_path, database_url, upstream.base_url, PARLEY_SHUTDOWN_GRACE="30")
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as process:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "up/quick", "messages": [{"role": "user", "content": "hi"}]},
                timeout=30,
            )
            assert response.status_code == 200
            assert wal_size(database_url), "the test needs a write-ahead log to begin with"
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(30)
            took = time.monotonic() - signalled
    assert returncode == 0
    # Nothing was open: the 30 s grace is not waited for.
    assert took < 5, f"exit took {took:.1f}s"
    assert wal_size(database_url) is None
    assert not (tmp_path / "data" / "parley.db.running").exists()
    assert rows(database_url, "SELECT count(*) AS n FROM request_log")[0]["n"] == 1


def _stopped_while_answering(
    tmp_path: Path,
    database_url: str,
    open_client: Callable[[ParleyServer], Client],
    *,
    first_line: bool,
    upstream_kind: Callable[[], DripOpenAI | FakeOpenAI] = DripOpenAI,
) -> Client:
    """Run ``open_client``'s request against a server (grace 0.5 s) whose upstream stalls,
    and stop the server once the upstream has the request (and, with ``first_line``, the
    client its first line); return the client once it is done."""
    with upstream_kind() as upstream:
        server_env(tmp_path, database_url, upstream.base_url)
        settings = settings_for(
            tmp_path, database_url, PARLEY_SHUTDOWN_GRACE="0.5", **backup_env(tmp_path)
        )
        server = ParleyServer(settings).start()
        try:
            client = open_client(server)
            client.start()
            deadline = time.monotonic() + 30
            while not upstream.received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert upstream.received, "the request never reached the upstream"
            assert not first_line or client.first.wait(30)
        finally:
            stopping = time.monotonic()
            server.stop()
            took = time.monotonic() - stopping
        client.join(30)
    assert took < 4, f"stop took {took:.1f}s"
    return client


def test_an_anthropic_stream_cut_by_the_shutdown_ends_in_an_error_event(
    tmp_path: Path, database_url: str
) -> None:
    client = _stopped_while_answering(
        tmp_path,
        database_url,
        lambda server: Client(server.root, "up/stall-a", True, path="/v1/messages"),
        first_line=True,
    )
    assert client.lines[-2:] == [
        "event: error",
        'data: {"type":"error","error":{"type":"api_error","message":'
        '"the server shut down before the answer was complete"}}',
    ]
    assert not any("message_stop" in line for line in client.lines)
    (row,) = rows(
        database_url, "SELECT error_type, finish_reason, client_protocol FROM request_log"
    )
    assert row == {
        "error_type": "interrupted",
        "finish_reason": "server_shutdown",
        "client_protocol": "anthropic",
    }


def test_an_embeddings_request_cut_by_the_shutdown_is_a_recorded_503(
    tmp_path: Path, database_url: str
) -> None:
    body = {"model": "up/stall-first-byte", "input": "x"}
    client = _stopped_while_answering(
        tmp_path,
        database_url,
        lambda server: Client(server.root, "", False, path="/v1/embeddings", body=body),
        first_line=False,
        upstream_kind=FakeOpenAI,
    )
    assert client.status == 503
    assert client.body["error"]["code"] == "server_shutting_down"
    (row,) = rows(database_url, "SELECT endpoint, error_type, finish_reason FROM request_log")
    assert row == {
        "endpoint": "embeddings",
        "error_type": "interrupted",
        "finish_reason": "server_shutdown",
    }


def test_a_client_that_leaves_is_still_recorded_as_cancelled(
    tmp_path: Path, database_url: str
) -> None:
    # The shutdown's marking must not swallow the ordinary case.
    with DripOpenAI() as upstream:
        server_env(tmp_path, database_url, upstream.base_url)
        settings = settings_for(tmp_path, database_url, **backup_env(tmp_path))
        with ParleyServer(settings) as server:
            question = [{"role": "user", "content": "x"}]
            body = {"model": "up/stall-c", "stream": True, "messages": question}
            with (
                httpx.Client(timeout=30) as http,
                http.stream("POST", f"{server.root}/v1/chat/completions", json=body) as r,
            ):
                next(r.iter_lines())

            def recorded() -> list[dict[str, Any]]:
                return rows(database_url, "SELECT error_type, finish_reason FROM request_log")

            deadline = time.monotonic() + 10
            while not recorded() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert recorded() == [
                {"error_type": "cancelled", "finish_reason": "client_disconnected"}
            ]


@pytest.mark.parametrize("stream", [True, False])
def test_a_chat_answer_cut_by_the_shutdown_ends_in_an_error(
    tmp_path: Path, database_url: str, stream: bool
) -> None:
    def open_client(server: ParleyServer) -> Client:
        created = httpx.post(
            f"{server.root}/api/conversations", json={"default_model": "up/stall-chat"}
        )
        return Client(
            server.root,
            "up/stall-chat",
            stream,
            path=f"/api/conversations/{created.json()['id']}/messages",
            body={"content": "a question", "stream": stream},
        )

    client = _stopped_while_answering(tmp_path, database_url, open_client, first_line=False)
    if stream:
        assert client.status == 200 and client.lines[0] == "event: message"
        assert client.lines[-2] == "event: error", client.lines
        assert orjson.loads(client.lines[-1].removeprefix("data: ")) == {
            "message": "the server shut down before the answer was complete",
            "type": "interrupted",
            "status": 503,
        }
        assert "event: done" not in client.lines
    else:
        assert client.status == 503, client.body
        assert client.body["error"]["code"] == "server_shutting_down"
        assert client.body["user_message"]["content"] == "a question"
    (row,) = rows(database_url, "SELECT error_type, finish_reason, endpoint FROM request_log")
    assert row == {
        "error_type": "interrupted",
        "finish_reason": "server_shutdown",
        "endpoint": "chat",
    }
