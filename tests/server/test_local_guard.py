"""Local mode (no master key) answers programs on this machine, never a web page of
another site: a foreign Origin or a non-loopback Host (DNS rebinding) gets a 403 before
anything reaches an upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from parley.errors import PermissionDenied
from parley.server.local_guard import local_guard
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, settings_for, write_config

BODY = {"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _start(tmp_path: Path, upstream: FakeOpenAI, **env: str) -> ParleyServer:
    write_config(tmp_path, [{"name": "up", "kind": "openai", "base_url": upstream.base_url}])
    return ParleyServer(settings_for(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", **env))


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Host": "rebound.evil.example:8000"},
        {"Origin": "http://127.0.0.1.evil.example"},
    ],
)
def test_browser_requests_from_elsewhere_are_refused(
    tmp_path: Path, upstream: FakeOpenAI, headers: dict[str, str]
) -> None:
    with _start(tmp_path, upstream) as server:
        # text/plain: the kind of cross-site POST a browser sends without a preflight.
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            content=httpx.Request("POST", "http://x", json=BODY).content,
            headers={"Content-Type": "text/plain", **headers},
            timeout=10,
        )
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert upstream.received == []


def test_local_programs_and_local_pages_are_served(tmp_path: Path, upstream: FakeOpenAI) -> None:
    with _start(tmp_path, upstream) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        with client:
            reply = client.chat.completions.create(**BODY)  # type: ignore[call-overload]
        assert reply.choices[0].message.content == "echo: hi"
        for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://[::1]:5173"):
            response = httpx.post(
                f"{server.base_url}/chat/completions",
                json=BODY,
                headers={"Origin": origin},
                timeout=10,
            )
            assert response.status_code == 200, origin
        response = httpx.get(f"{server.base_url}/models", headers={"Host": "localhost:8000"})
        assert response.status_code == 200


def test_with_a_master_key_credentials_decide(tmp_path: Path, upstream: FakeOpenAI) -> None:
    with _start(tmp_path, upstream, PARLEY_MASTER_KEY="mk-0123456789abcdef") as server:
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json=BODY,
            headers={
                "Origin": "https://app.example",
                "Authorization": "Bearer mk-0123456789abcdef",
            },
            timeout=10,
        )
        assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        # A reverse proxy on this machine put in front of local mode: its Host is often
        # the upstream's own 127.0.0.1, but it names the real client.
        {"X-Forwarded-For": "203.0.113.7"},
        {"X-Forwarded-For": "127.0.0.1, 203.0.113.7"},
        {"X-Real-IP": "198.51.100.2"},
        {"Forwarded": 'for="[2001:db8::1]:443";proto=https'},
        {"Forwarded": "for=unknown"},
    ],
)
def test_requests_relayed_for_another_machine_are_refused(
    tmp_path: Path, upstream: FakeOpenAI, headers: dict[str, str]
) -> None:
    with _start(tmp_path, upstream) as server:
        response = httpx.post(
            f"{server.base_url}/chat/completions", json=BODY, headers=headers, timeout=10
        )
        assert response.status_code == 403, response.text
        assert "relayed" in response.json()["error"]["message"]
        assert upstream.received == []


def test_loopback_relays_and_mapped_loopback_addresses_are_served(
    tmp_path: Path, upstream: FakeOpenAI
) -> None:
    with _start(tmp_path, upstream) as server:
        for headers in (
            {"X-Forwarded-For": "127.0.0.1, ::1"},
            {"X-Forwarded-For": "::ffff:127.0.0.1"},
            {"Forwarded": 'for="[::1]:5000"'},
            {"Host": f"[::ffff:127.0.0.1]:{server.port}"},
        ):
            response = httpx.post(
                f"{server.base_url}/chat/completions", json=BODY, headers=headers, timeout=10
            )
            assert response.status_code == 200, (headers, response.text)


@pytest.mark.parametrize(
    ("peer", "refused"),
    [("192.0.2.10", True), ("::ffff:192.0.2.10", True), ("::ffff:127.0.0.1", False)],
)
async def test_a_peer_that_is_not_on_this_machine_is_refused(peer: str, refused: bool) -> None:
    # parley serve listens on loopback only; this covers an app started some other way.
    request = make_mocked_request("GET", "/v1/models", {"Host": "127.0.0.1"}).clone(remote=peer)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="served")

    if refused:
        with pytest.raises(PermissionDenied):
            await local_guard(request, handler)
    else:
        response = await local_guard(request, handler)
        assert response.status == 200
