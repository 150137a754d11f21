"""HTTP performance metrics end to end: what is stored, and what never is (secrets)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import (
    ParleyServer,
    leave_after_first_chunk,
    rows,
    settings_for,
    wait_for,
    write_config,
)
from tests.server.test_auth import MASTER, bearer, make_user

CANARY = "canary-5e1d0c9b7a3f"
JSON_TYPE = {"Content-Type": "application/json"}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _server(tmp_path: Path, database_url: str, upstream: FakeOpenAI, **env: str) -> ParleyServer:
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": upstream.base_url, "models": ["m"]}],
    )
    return ParleyServer(
        settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, **env)
    ).start()


def _stored(database_url: str, at_least: int, columns: str = "*") -> list[dict[str, Any]]:
    """The stored HTTP metric rows, once there are ``at_least`` of them (written off the
    request's path, so a moment after the answers)."""
    found: list[dict[str, Any]] = wait_for(
        lambda: (
            (got := rows(database_url, f"SELECT {columns} FROM http_metrics"))
            and len(got) >= at_least
            and got
        )
    )
    return found


def test_every_request_is_measured_by_route_template_and_secrets_never_stored(
    tmp_path: Path,
    database_url: str,
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = _server(tmp_path, database_url, upstream)
    try:
        user = make_user(server, "frank")
        root = server.root
        # In a body (a field named like a secret, and free text), a header, a query string.
        httpx.post(
            f"{root}/v1/chat/completions",
            json={
                "model": "up/m",
                "messages": [{"role": "user", "content": f"my key is sk-live-{CANARY}"}],
                "api_key": CANARY,
            },
            headers={**bearer(MASTER), "X-Parley-Tags": "batch,nightly", "X-Token": CANARY},
            params={"token": CANARY},
            timeout=10,
        )
        httpx.post(f"{root}/api/auth/login", json={"login": "frank", "password": CANARY})
        httpx.get(f"{root}/api/admin/users/{user['id']}", headers=bearer(CANARY))
        httpx.get(f"{root}/api/admin/users/{user['id']}?password={CANARY}", headers=bearer(MASTER))
        # JSON sent as a form (curl -d) or as text is read as JSON by the API, and is
        # redacted as JSON; malformed JSON by the names in its text.
        for name, content_type in (("gina", "application/x-www-form-urlencoded"), ("hank", "")):
            body = {"email": f"{name}@example.org", "username": name, "password": CANARY}
            created = httpx.post(
                f"{root}/api/admin/users",
                content=orjson.dumps(body),
                headers={**bearer(MASTER), "Content-Type": content_type or "text/plain"},
            )
            assert created.status_code == 201, created.text
        malformed = f'{{"login": "frank", "masterKey": "{CANARY}", "pwd": "{CANARY}",}}'
        httpx.post(f"{root}/api/auth/login", content=malformed, headers=JSON_TYPE)
        stored = _stored(database_url, 8)
    finally:
        server.stop()
    assert CANARY not in repr(stored)
    # The server's own log lines (the test's HTTP client logs the URLs it was given).
    server_log = [r.getMessage() for r in caplog.records if not r.name.startswith("http")]
    assert server_log and CANARY not in "\n".join(server_log)
    by_endpoint = {(r["endpoint"], r["method"], r["status_code"]) for r in stored}
    assert ("/v1/chat/completions", "POST", 200) in by_endpoint
    assert ("/api/admin/users/{id}", "GET", 401) in by_endpoint
    assert ("/api/admin/users/{id}", "GET", 200) in by_endpoint
    chat = next(r for r in stored if r["endpoint"] == "/v1/chat/completions")
    assert '"model":"up/m"' in chat["request_body"] and chat["tags"] == '["batch","nightly"]'
    assert chat["response_time_ms"] > 0 and chat["user_agent"].startswith("python-httpx")
    refused = next(r for r in stored if r["status_code"] == 401)
    assert refused["error_message"]
    assert {r["user_id"] for r in stored if r["endpoint"] == "/api/admin/users"} <= {None}


def test_a_header_that_is_not_utf8_is_stored_with_replacement_characters(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    server = _server(tmp_path, database_url, upstream)
    try:
        for agent in (b"caf\xe9-client/1.0", b"plain-client/1.0"):
            reply = httpx.get(
                f"{server.root}/api/me",
                headers={**bearer(MASTER), "User-Agent": agent, "X-Parley-Tags": b"t\xff"},
            )
            assert reply.status_code < 500
        stored = _stored(database_url, 2, "user_agent, tags")
    finally:
        server.stop()
    # Both rows of the batch are kept: the odd one did not fail its neighbour's.
    assert sorted(r["user_agent"] for r in stored) == ["caf\ufffd-client/1.0", "plain-client/1.0"]
    assert {r["tags"] for r in stored} == {'["t\ufffd"]'}
    assert "HTTP metric rows could not be recorded" not in caplog.text


# A provider key of no well-known shape (as Mistral's or a private gateway's are): only
# the database knows it is a secret.
STORED_KEY = "Q7v2Lx9RkP4tW8zNcanary3JmH"


def test_keys_known_only_to_the_database_and_the_key_file_are_never_stored(
    tmp_path: Path,
    database_url: str,
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    first = _server(tmp_path, database_url, upstream)
    try:
        created = httpx.post(
            f"{first.root}/api/admin/providers",
            json={"name": "house", "kind": "openai", "model": "m", "api_key": STORED_KEY},
            headers=bearer(MASTER),
            timeout=10,
        )
        assert created.status_code == 201, created.text
    finally:
        first.stop()
    # The vault's master secret, from the key file in the data directory (URL-safe base64:
    # its "=" is "%3D" once a form body is stored).
    master_secret = (tmp_path / "data" / "secret.key").read_text().strip()
    assert master_secret.endswith("=")
    # A restarted server: the key is in the database only, never sent to this process.
    server = _server(tmp_path, database_url, upstream)
    try:
        root = server.root
        for canary in (STORED_KEY, master_secret):
            # Pasted into a prompt, into the user agent and the tags of another request.
            reply = httpx.post(
                f"{root}/v1/chat/completions",
                json={
                    "model": "up/m",
                    "messages": [{"role": "user", "content": f"is {canary} ok?"}],
                },
                headers={
                    **bearer(MASTER),
                    "User-Agent": f"script/1.0 ({canary})",
                    "X-Parley-Tags": f"debug,{canary}",
                },
                timeout=10,
            )
            assert reply.status_code == 200, reply.text
            # In a form body (refused, and still measured).
            httpx.post(
                f"{root}/v1/chat/completions",
                data={"note": canary},
                headers=bearer(MASTER),
                timeout=10,
            )
        stored = wait_for(
            lambda: (
                (found := rows(database_url, "SELECT * FROM http_metrics"))
                and len([r for r in found if r["endpoint"] == "/v1/chat/completions"]) == 4
                and found
            )
        )
    finally:
        server.stop()
    # The admin request that set the key is stored too (its "api_key" field redacted).
    assert {r["endpoint"] for r in stored} == {"/api/admin/providers", "/v1/chat/completions"}
    assert all(r["request_body"] for r in stored)
    # The server's own log lines (the test's HTTP client logs what it sent).
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("http"))
    for canary in (STORED_KEY, master_secret, master_secret.rstrip("=")):
        assert canary not in repr(stored) and canary not in server_log


def test_sampling_zero_records_nothing_but_prometheus_still_counts(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    server = _server(tmp_path, database_url, upstream, PARLEY_HTTP_METRICS_SAMPLE="0")
    try:
        for _ in range(3):
            assert httpx.get(f"{server.root}/healthz").status_code == 200
        text = httpx.get(f"{server.root}/metrics", headers=bearer(MASTER)).text
    finally:
        server.stop()
    assert rows(database_url, "SELECT id FROM http_metrics") == []
    labels = 'endpoint="/healthz",method="GET",status="2xx"'
    assert f"parley_http_request_duration_seconds_count{{{labels}}} 3.0" in text


def test_a_client_that_hangs_up_is_a_499_not_a_server_error(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    server = _server(tmp_path, database_url, upstream)
    try:
        # One leaves a stream after its first chunk, one gives up on a stalled answer.
        leave_after_first_chunk(server, "hi", headers=bearer(MASTER))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.base_url}/chat/completions",
                json={
                    "model": "up/stall-first-byte",
                    "messages": [{"role": "user", "content": "x"}],
                },
                headers=bearer(MASTER),
                timeout=0.3,
            )
        stored = _stored(database_url, 2, "endpoint, status_code, error_message")
        report = httpx.get(
            f"{server.root}/api/metrics/http", params={"window": "1h"}, headers=bearer(MASTER)
        ).json()
        text = httpx.get(f"{server.root}/metrics", headers=bearer(MASTER)).text
    finally:
        server.stop()
    assert (
        stored
        == [
            {
                "endpoint": "/v1/chat/completions",
                "status_code": 499,
                "error_message": "the client closed the connection",
            }
        ]
        * 2
    )
    [chat] = [r for r in report["data"] if r["endpoint"] == "/v1/chat/completions"]
    assert chat["requests"] == 2 and chat["server_errors"] == 0
    labels = 'endpoint="/v1/chat/completions",method="POST",status="4xx"'
    assert f"parley_http_request_duration_seconds_count{{{labels}}} 2.0" in text
