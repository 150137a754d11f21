"""What every answer tells browsers and caches, the session cookie behind a TLS proxy, and
credentials that are not even UTF-8: a real parley with a master key, on SQLite (none of
this depends on the database)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from parley.server.auth import set_session_cookie
from tests.harness import ParleyServer, settings_for

MASTER = "parley-master-hardening-key"
PASSWORD = "correct horse battery"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ParleyServer]:
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", PARLEY_MASTER_KEY=MASTER)
    with ParleyServer(settings) as running:
        made = httpx.post(
            f"{running.root}/api/admin/users",
            json={"email": "ada@example.org", "username": "ada", "password": PASSWORD},
            headers={"Authorization": f"Bearer {MASTER}"},
            timeout=10,
        )
        assert made.status_code == 201, made.text
        yield running


def _login(http: httpx.Client, **headers: str) -> httpx.Response:
    reply = http.post(
        "/api/auth/login", json={"login": "ada", "password": PASSWORD}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    return reply


def test_json_answers_are_never_sniffed_nor_cached(server: ParleyServer) -> None:
    with httpx.Client(base_url=server.root, timeout=10) as http:
        login = _login(http)  # holds the CSRF token
        csrf = login.json()["csrf_token"]
        key = http.post("/api/keys", json={"name": "laptop"}, headers={"X-CSRF-Token": csrf})
        assert key.status_code == 201 and key.json()["key"].startswith("pk-")  # shown once
        answers = [
            login,
            key,
            http.get("/api/auth/session"),
            http.get("/api/keys"),
            http.get("/v1/models"),
            httpx.get(f"{server.root}/api/me", timeout=10),  # the 401
            http.get("/api/no/such/route"),  # the 404
        ]
        upload = http.post(
            "/api/attachments",
            files={"file": ("notes.txt", b"private notes")},
            headers={"X-CSRF-Token": csrf},
        )
        assert upload.status_code == 201, upload.text
        content = http.get(f"/api/attachments/{upload.json()['id']}/content")
    assert [a.status_code for a in answers] == [200, 201, 200, 200, 200, 401, 404]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.request.url
        assert answer.headers["cache-control"] == "no-store", answer.request.url
    # A handler's own choice stands.
    assert content.headers["cache-control"] == "private, no-cache"
    assert content.headers["x-content-type-options"] == "nosniff"


def test_the_cookie_is_secure_when_a_tls_proxy_says_the_browser_used_https(
    server: ParleyServer,
) -> None:
    with httpx.Client(base_url=server.root, timeout=10) as http:
        plain = _login(http)
    with httpx.Client(base_url=server.root, timeout=10) as http:
        proxied = _login(http, **{"X-Forwarded-Proto": "https"})
    assert "secure" not in plain.headers["set-cookie"].lower()
    assert "; Secure" in proxied.headers["set-cookie"]
    # The browser sends it back (over https, to the proxy); logging out clears it alike.
    token = proxied.cookies["parley_session"]
    logout = httpx.post(
        f"{server.root}/api/auth/logout",
        headers={
            "Cookie": f"parley_session={token}",
            "X-CSRF-Token": proxied.json()["csrf_token"],
            "X-Forwarded-Proto": "https",
        },
        timeout=10,
    )
    assert logout.status_code == 204, logout.text
    assert "; Secure" in logout.headers["set-cookie"]


@pytest.mark.parametrize(
    ("headers", "secure"),
    [
        ({"Forwarded": "for=192.0.2.1;proto=https;host=chat.example"}, True),
        ({"Forwarded": 'proto="HTTPS"'}, True),
        ({"X-Forwarded-Proto": "https, http"}, True),
        ({"X-Forwarded-Proto": "http"}, False),
        ({"Forwarded": "for=192.0.2.1;proto=http"}, False),
    ],
)
def test_forwarded_proto_decides_secure(headers: dict[str, str], secure: bool) -> None:
    request = make_mocked_request("POST", "/api/auth/login", headers)
    response = web.Response()
    set_session_cookie(request, response, "token", datetime.now(UTC) + timedelta(hours=1))
    assert bool(response.cookies["parley_session"]["secure"]) is secure


@pytest.mark.parametrize(
    "headers",
    [
        {b"Authorization": b"Bearer \xff\xfe-not-utf8"},
        {b"x-api-key": b"pk-\xff" + b"a" * 50},
        {b"Cookie": b"parley_session=\xff\xfe"},
    ],
)
def test_credentials_that_are_not_utf8_are_a_401(
    server: ParleyServer, headers: dict[bytes, bytes]
) -> None:
    reply = httpx.get(f"{server.root}/api/me", headers=headers, timeout=10)
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_a_csrf_token_that_is_not_utf8_is_a_403(server: ParleyServer) -> None:
    with httpx.Client(base_url=server.root, timeout=10) as http:
        _login(http)
        reply = http.post("/api/keys", json={"name": "x"}, headers={b"X-CSRF-Token": b"\xff"})
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"]["code"] == "csrf_token_invalid"
