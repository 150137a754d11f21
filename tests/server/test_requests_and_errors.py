"""Bad input, authentication, secrets, model listing and embeddings through a real server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes.openai_upstream import MODELS, FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config

CANARY = "sk-canary-7f3a9c1e5b2d4f60"
MASTER = "parley-master-test-key"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=CANARY) as fake:
        yield fake


def _config(tmp_path: Path, upstream: FakeOpenAI) -> None:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "api_key_env": "UP_KEY",
                "models": ["gpt-4o-mini", "text-embedding-3-small"],
            },
            {
                "name": "wrongkey",
                "kind": "openai",
                "base_url": upstream.base_url,
                "api_key": "sk-not-the-right-one",
            },
        ],
        aliases={"fast": ["up/gpt-4o-mini"]},
    )


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    _config(tmp_path, upstream)
    settings = settings_for(tmp_path, database_url, UP_KEY=CANARY, PARLEY_MAX_BODY_BYTES="20000")
    with ParleyServer(settings) as running:
        yield running


def post(server: ParleyServer, content: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/chat/completions",
        content=content,
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "'model'"),
        (b'{"model": "up/gpt-4o-mini"}', 400, "'messages'"),
        (b'{"model": "up/gpt-4o-mini", "messages": "hi"}', 400, "'messages'"),
        (
            b'{"model": "up/gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}',
            400,
            "role",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": 5}]}',
            400,
            "content",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "temperature": "hot", '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "temperature",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "max_tokens": -1, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "max_tokens": 2147483648, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "max_completion_tokens": 9223372036854775808, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "max_completion_tokens",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "seed": 100000000000000000000, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "'seed' holds the integer 100000000000000000000, outside the 64-bit range",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "metadata": {"n": [-9223372036854775809]}, '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "outside the 64-bit range",
        ),
        (
            b'{"model": "up/gpt-4o-mini", "stream": "yes", '
            b'"messages": [{"role": "user", "content": "x"}]}',
            400,
            "stream",
        ),
        (
            b'{"model": "nonexistent", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "does not exist",
        ),
        (
            b'{"model": "nope/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "unknown provider",
        ),
    ],
)
def test_bad_input_gets_openai_errors_and_stores_nothing(
    server: ParleyServer, database_url: str, body: bytes, status: int, fragment: str
) -> None:
    response = post(server, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text
    assert rows(database_url, "SELECT id FROM request_log") == []
    assert rows(database_url, "SELECT id FROM messages") == []


def test_integers_at_the_64_bit_edges_and_long_digit_strings_pass_unchanged(
    server: ParleyServer, upstream: FakeOpenAI
) -> None:
    """The re-read that catches integers orjson would turn into floats refuses nothing
    else: the edges of its range and 19 digits inside a string reach the upstream as sent."""
    body = (
        b'{"model": "up/gpt-4o-mini", "seed": 18446744073709551615, '
        b'"metadata": {"low": -9223372036854775808, "order": "1234567890123456789012"}, '
        b'"messages": [{"role": "user", "content": "x"}]}'
    )
    response = post(server, body)
    assert response.status_code == 200, response.text
    sent = upstream.received[-1][2]
    assert sent["seed"] == 2**64 - 1
    assert sent["metadata"] == {"low": -(2**63), "order": "1234567890123456789012"}


def test_body_over_the_limit_is_413(server: ParleyServer, database_url: str) -> None:
    big = '{"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "%s"}]}' % (
        "x" * 30000
    )
    response = post(server, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert rows(database_url, "SELECT id FROM messages") == []


def test_unknown_endpoint_is_an_openai_404(server: ParleyServer) -> None:
    response = httpx.get(f"{server.base_url}/nothing-here", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("no such endpoint")


def test_models_lists_configured_upstream_listed_models_and_aliases(
    server: ParleyServer, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    models = openai.OpenAI(base_url=server.base_url, api_key="x").models.list().data
    # The provider whose key is refused cannot list its models: the listing still works.
    assert [m.id for m in models] == [
        "up/gpt-4o-mini",
        "up/text-embedding-3-small",
        *(f"up/{m}" for m in MODELS if m not in ("gpt-4o-mini", "text-embedding-3-small")),
        "fast",
    ]
    assert [r[0] for r in upstream.received].count("/v1/models") == 2  # up and wrongkey
    assert "could not list its models" in caplog.text and CANARY not in caplog.text
    # Shipped capabilities come along (parley's addition to OpenAI's model object).
    by_id = {m.id: m for m in models}
    assert by_id["up/gpt-4o-mini"].model_extra == {
        "capabilities": {"vision": True, "tools": True, "json_mode": True, "context_window": 128000}
    }


def test_embeddings_are_routed_and_recorded(server: ParleyServer, database_url: str) -> None:
    result = openai.OpenAI(base_url=server.base_url, api_key="x").embeddings.create(
        model="up/text-embedding-3-small", input=["hello world", "goodbye"]
    )
    assert len(result.data) == 2 and len(result.data[0].embedding) > 0
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert req["endpoint"] == "embeddings" and req["success"]
    assert req["prompt_tokens"] == result.usage.prompt_tokens
    assert rows(database_url, "SELECT id FROM messages") == []


def test_embeddings_from_a_provider_without_them_are_a_recorded_400(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    write_config(
        tmp_path,
        [{"name": "claude", "kind": "anthropic", "base_url": upstream.base_url}],
    )
    with ParleyServer(settings_for(tmp_path, database_url)) as server:
        response = httpx.post(
            f"{server.base_url}/embeddings",
            json={"model": "claude/any-model", "input": "hello"},
        )
    assert response.status_code == 400
    assert "no embeddings API" in response.json()["error"]["message"]
    [req] = rows(database_url, "SELECT * FROM request_log")
    # A closed attempt: its error and its time, not an empty failure.
    assert not req["success"] and req["error_type"] == "bad_request"
    assert "no embeddings API" in req["error_message"]
    assert req["response_time_ms"] is not None


def test_canary_key_never_leaks(
    server: ParleyServer,
    database_url: str,
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sdk = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    bodies = []
    sdk.chat.completions.create(model="up/gpt-4o-mini", messages=[{"role": "user", "content": "a"}])
    for model in ("up/fail-401", "up/fail-500", "wrongkey/gpt-4o-mini", "up/malformed"):
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": model, "stream": True, "messages": [{"role": "user", "content": "a"}]},
            timeout=10,
        )
        bodies.append(response.text)
    # The key did reach the upstream, so the test would see it if it leaked.
    assert any(h.get("Authorization") == f"Bearer {CANARY}" for _, h, _ in upstream.received)
    stored = rows(database_url, "SELECT * FROM request_log") + rows(
        database_url, "SELECT * FROM messages"
    )
    everything = "\n".join(bodies) + repr(stored) + caplog.text
    assert CANARY not in everything
    assert len(stored) >= 5


def test_master_key_is_required_when_set(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    _config(tmp_path, upstream)
    settings = settings_for(tmp_path, database_url, UP_KEY=CANARY, PARLEY_MASTER_KEY=MASTER)
    with ParleyServer(settings) as server:
        body = {"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        missing = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=5)
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(
            f"{server.base_url}/chat/completions",
            json=body,
            headers={"Authorization": "Bearer nope"},
            timeout=5,
        )
        assert wrong.status_code == 401 and MASTER not in wrong.text
        ok = openai.OpenAI(base_url=server.base_url, api_key=MASTER).chat.completions.create(
            model="up/gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert ok.choices[0].message.content == "echo: x"
        assert httpx.get(f"{server.root}/healthz", timeout=5).status_code == 200
    assert len(rows(database_url, "SELECT id FROM request_log")) == 1
