"""Authentication end to end: users, API keys, web sessions and the master key.

A real parley with ``PARLEY_MASTER_KEY`` set runs in front of the fake OpenAI upstream, on
SQLite and PostgreSQL. Users are made over HTTP with the master key (the documented
first-run path), then every channel (``Authorization: Bearer``, ``x-api-key``, the session
cookie with its CSRF token, the master key) is driven through the official SDKs or plain
HTTP, and the store is read back to check who each request row and message belongs to.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import sqlalchemy as sa
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from parley.server.auth import set_session_cookie
from parley.server.login_throttle import MAX_FAILURES
from parley.store.schema import api_keys, metadata, rate_windows, web_sessions
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config

MASTER = "parley-master-test-key"
PASSWORD = "correct horse battery"
CHAT = {"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY = {**CHAT, "max_tokens": 5}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _start(tmp_path: Path, database_url: str, upstream: FakeOpenAI, **env: str) -> ParleyServer:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["gpt-4o-mini"],
            }
        ],
    )
    return ParleyServer(settings_for(tmp_path, database_url, **env)).start()


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    running = _start(tmp_path, database_url, upstream, PARLEY_MASTER_KEY=MASTER)
    try:
        yield running
    finally:
        running.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_user(
    server: ParleyServer, username: str, password: str = PASSWORD, role: str = "user"
) -> dict[str, Any]:
    """A user made over HTTP with the master key."""
    reply = httpx.post(
        f"{server.root}/api/admin/users",
        json={
            "email": f"{username.upper()}@Example.org",
            "username": username,
            "password": password,
            "role": role,
        },
        headers=bearer(MASTER),
        timeout=10,
    )
    assert reply.status_code == 201, reply.text
    user: dict[str, Any] = reply.json()
    return user


class Browser:
    """A logged-in web client: the session cookie in its jar, the CSRF token at hand."""

    def __init__(self, server: ParleyServer, login: str, password: str = PASSWORD) -> None:
        self.http = httpx.Client(base_url=server.root, timeout=10)
        reply = self.http.post("/api/auth/login", json={"login": login, "password": password})
        assert reply.status_code == 200, reply.text
        self.login_reply = reply
        self.csrf: str = reply.json()["csrf_token"]

    def write(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf, **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def new_key(self, name: str = "laptop", **extra: Any) -> dict[str, Any]:
        reply = self.write("POST", "/api/keys", json={"name": name, **extra})
        assert reply.status_code == 201, reply.text
        key: dict[str, Any] = reply.json()
        return key

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def alice(server: ParleyServer) -> Iterator[Browser]:
    make_user(server, "alice")
    browser = Browser(server, "alice@example.org")
    try:
        yield browser
    finally:
        browser.close()


def internal_ids(database_url: str, username: str) -> tuple[int, dict[str, int]]:
    """The user's integer id and its keys' integer ids by prefix (never exposed by the API)."""
    [user] = rows(database_url, "SELECT id FROM users WHERE username = :u", u=username)
    keys = rows(database_url, "SELECT id, prefix FROM api_keys WHERE user_id = :u", u=user["id"])
    return user["id"], {k["prefix"]: k["id"] for k in keys}


def set_expiry(database_url: str, table: sa.Table, moment: datetime) -> None:
    """Move every row's expiry of ``table`` (SQLAlchemy formats the time per dialect)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(table).values(expires_at=moment))
    finally:
        engine.dispose()


def owners(database_url: str, table: str) -> list[tuple[int | None, int | None]]:
    found = rows(database_url, f"SELECT user_id, api_key_id FROM {table} ORDER BY id")
    return [(r["user_id"], r["api_key_id"]) for r in found]


# -- every channel -------------------------------------------------------------------------


def test_every_channel_on_chat_completions_records_its_owner(
    server: ParleyServer, alice: Browser, database_url: str
) -> None:
    key = alice.new_key()
    assert key["key"].startswith("pk-") and len(key["key"]) >= 43
    assert key["prefix"] == key["key"][:12]
    user_id, key_ids = internal_ids(database_url, "alice")
    key_id = key_ids[key["prefix"]]

    sdk = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    reply = sdk.chat.completions.create(model="up/gpt-4o-mini", messages=[CHAT["messages"][0]])
    assert reply.choices[0].message.content == "echo: hi"
    embedded = sdk.embeddings.create(model="up/text-embedding-3-small", input="hi")
    assert embedded.data
    by_header = httpx.post(
        f"{server.base_url}/chat/completions", json=CHAT, headers={"x-api-key": key["key"]}
    )
    assert by_header.status_code == 200, by_header.text
    # The cookie channel: a POST is a write, so it needs the CSRF token.
    refused = alice.http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 403
    assert refused.json()["error"]["message"].startswith("a write with a session cookie")
    by_cookie = alice.write("POST", "/v1/chat/completions", json=CHAT)
    assert by_cookie.status_code == 200, by_cookie.text
    master = openai.OpenAI(base_url=server.base_url, api_key=MASTER, max_retries=0)
    assert master.chat.completions.create(**CHAT).choices[0].message.content == "echo: hi"

    assert owners(database_url, "request_log") == [
        (user_id, key_id),  # Bearer key, chat
        (user_id, key_id),  # Bearer key, embeddings
        (user_id, key_id),  # x-api-key
        (user_id, None),  # session cookie
        (None, None),  # master key
    ]
    stored = owners(database_url, "messages")
    # Each conversation: the user's message and the answer, both with the request's owner.
    assert stored == [(user_id, key_id)] * 4 + [(user_id, None)] * 2 + [(None, None)] * 2


def test_every_channel_on_anthropic_messages(
    server: ParleyServer, alice: Browser, database_url: str
) -> None:
    key = alice.new_key()["key"]
    user_id, key_ids = internal_ids(database_url, "alice")
    [key_id] = key_ids.values()
    for client in (
        anthropic.Anthropic(base_url=server.root, api_key=key, max_retries=0),
        anthropic.Anthropic(base_url=server.root, auth_token=key, max_retries=0),
        anthropic.Anthropic(base_url=server.root, api_key=MASTER, max_retries=0),
    ):
        with client:
            answer = client.messages.create(**ANTHROPIC_BODY)  # type: ignore[call-overload]
        assert answer.content[0].text == "echo: hi"
    refused = alice.http.post("/v1/messages", json=ANTHROPIC_BODY)
    # Anthropic's error shape on the Anthropic front door.
    assert refused.status_code == 403 and refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "permission_error"
    by_cookie = alice.write("POST", "/v1/messages", json=ANTHROPIC_BODY)
    assert by_cookie.status_code == 200 and by_cookie.json()["content"][0]["text"] == "echo: hi"

    assert owners(database_url, "request_log") == [
        (user_id, key_id),
        (user_id, key_id),
        (None, None),
        (user_id, None),
    ]


def test_every_channel_on_api_me(server: ParleyServer, alice: Browser, database_url: str) -> None:
    key = alice.new_key()["key"]
    seen = {
        "bearer": httpx.get(f"{server.root}/api/me", headers=bearer(key)),
        "x-api-key": httpx.get(f"{server.root}/api/me", headers={"x-api-key": key}),
        "cookie": alice.http.get("/api/me"),
        "master": httpx.get(f"{server.root}/api/me", headers=bearer(MASTER)),
    }
    assert {name: r.status_code for name, r in seen.items()} == dict.fromkeys(seen, 200)
    assert seen["bearer"].json()["via"] == seen["x-api-key"].json()["via"] == "api_key"
    assert seen["cookie"].json()["via"] == "session"
    for name in ("bearer", "x-api-key", "cookie"):
        user = seen[name].json()["user"]
        assert (user["username"], user["email"], user["role"]) == (
            "alice",
            "alice@example.org",
            "user",
        )
        assert "password_hash" not in user
    assert seen["master"].json() == {"user": None, "role": "admin", "via": "master"}

    anonymous = httpx.get(f"{server.root}/api/me")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{server.root}/api/me", headers=bearer("pk-" + "x" * 43))
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    # A bad key is refused even alongside a good cookie: no fallback between channels.
    mixed = alice.http.get("/api/me", headers=bearer("nope"))
    assert mixed.status_code == 401

    # Writes with the cookie need the CSRF token; with a key they do not.
    assert alice.http.patch("/api/me", json={"full_name": "A"}).status_code == 403
    wrong_token = alice.http.patch(
        "/api/me", json={"full_name": "A"}, headers={"X-CSRF-Token": "not-it"}
    )
    assert wrong_token.status_code == 403
    assert wrong_token.json()["error"]["code"] == "csrf_token_invalid"  # as documented
    changed = alice.write(
        "PATCH", "/api/me", json={"full_name": "Alice A.", "preferences": {"x": 1}}
    )
    assert changed.status_code == 200
    assert changed.json()["user"]["full_name"] == "Alice A."
    by_key = httpx.patch(f"{server.root}/api/me", json={"full_name": "Al"}, headers=bearer(key))
    assert by_key.status_code == 200 and by_key.json()["user"]["preferences"] == {"x": 1}
    assert httpx.get(f"{server.root}/healthz").status_code == 200

    # Use is recorded off the hot path.
    wait_for(lambda: rows(database_url, "SELECT last_used_at FROM api_keys")[0]["last_used_at"])
    wait_for(lambda: rows(database_url, "SELECT last_active_at FROM users")[0]["last_active_at"])
    assert alice.http.get("/api/keys").json()["data"][0]["last_used_at"] is not None


# -- revocation, expiry, disabled users ----------------------------------------------------


def test_revoked_key_is_refused_on_the_very_next_request(
    server: ParleyServer, alice: Browser
) -> None:
    key = alice.new_key()
    sdk = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    assert sdk.chat.completions.create(**CHAT).choices[0].message.content == "echo: hi"
    revoked = alice.write("DELETE", f"/api/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert "key" not in revoked.json()
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(**CHAT)
    with (
        anthropic.Anthropic(base_url=server.root, api_key=key["key"], max_retries=0) as client,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        client.messages.create(**ANTHROPIC_BODY)  # type: ignore[call-overload]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "authentication_error"
    listed = alice.http.get("/api/keys").json()["data"]
    assert [(k["id"], k["status"]) for k in listed] == [(key["id"], "revoked")]


def test_expired_key_and_expired_session_are_refused(
    server: ParleyServer, alice: Browser, database_url: str
) -> None:
    key = alice.new_key(expires_in_days=1)
    assert key["expires_at"] is not None
    assert httpx.get(f"{server.root}/api/me", headers=bearer(key["key"])).status_code == 200
    set_expiry(database_url, api_keys, datetime.now(UTC) - timedelta(seconds=1))
    expired = httpx.get(f"{server.root}/api/me", headers=bearer(key["key"]))
    assert expired.status_code == 401
    assert alice.http.get("/api/keys").json()["data"][0]["status"] == "expired"
    past = alice.write("POST", "/api/keys", json={"name": "x", "expires_at": "2001-01-01T00:00Z"})
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at"
    both = alice.write(
        "POST", "/api/keys", json={"name": "x", "expires_at": "2999-01-01", "expires_in_days": 1}
    )
    assert both.status_code == 400

    set_expiry(database_url, web_sessions, datetime.now(UTC) - timedelta(seconds=1))
    stale = alice.http.get("/api/me")
    assert stale.status_code == 401
    assert "session has expired" in stale.json()["error"]["message"]


def test_a_key_expiry_more_than_ten_years_ahead_is_a_400(
    server: ParleyServer, alice: Browser, database_url: str
) -> None:
    now = datetime.now(UTC)
    for fields, param in (
        ({"expires_at": "9999-12-31T23:59:59Z"}, "expires_at"),
        # Before: accepted as is, or a 500 where it could not be converted to UTC.
        ({"expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),
        ({"expires_at": (now + timedelta(days=3651)).isoformat()}, "expires_at"),
        ({"expires_in_days": 3651}, "expires_in_days"),
    ):
        reply = alice.write("POST", "/api/keys", json={"name": "far", **fields})
        assert reply.status_code == 400, (fields, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert "at most 3650" in error["message"]
    # Too soon to outlive the request: refused under the field that was sent.
    for days in (1e-9, 0.0006):
        reply = alice.write("POST", "/api/keys", json={"name": "soon", "expires_in_days": days})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "expires_in_days"
    assert rows(database_url, "SELECT id FROM api_keys") == []
    near = alice.new_key(expires_at=(now + timedelta(days=3649)).isoformat())
    assert datetime.fromisoformat(near["expires_at"]) - now > timedelta(days=3648)


def test_disabled_user_loses_keys_and_sessions(server: ParleyServer, alice: Browser) -> None:
    key = alice.new_key()["key"]
    user_id = alice.http.get("/api/me").json()["user"]["id"]
    disabled = httpx.patch(
        f"{server.root}/api/admin/users/{user_id}",
        json={"is_active": False},
        headers=bearer(MASTER),
    )
    assert disabled.status_code == 200 and disabled.json()["is_active"] is False
    assert httpx.get(f"{server.root}/api/me", headers=bearer(key)).status_code == 401
    assert alice.http.get("/api/me").status_code == 401
    relogin = httpx.post(
        f"{server.root}/api/auth/login", json={"login": "alice", "password": PASSWORD}
    )
    assert relogin.status_code == 401

    enabled = httpx.patch(
        f"{server.root}/api/admin/users/{user_id}", json={"is_active": True}, headers=bearer(MASTER)
    )
    assert enabled.status_code == 200
    # Keys work again; the sessions were ended, not suspended.
    assert httpx.get(f"{server.root}/api/me", headers=bearer(key)).status_code == 200
    assert alice.http.get("/api/me").status_code == 401


# -- sessions ------------------------------------------------------------------------------


def test_login_cookie_logout(server: ParleyServer, alice: Browser) -> None:
    cookie = alice.login_reply.headers["set-cookie"]
    assert cookie.startswith("parley_session=")
    for attribute in ("HttpOnly", "Path=/", "SameSite=Lax"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http on loopback
    body = alice.login_reply.json()
    assert body["user"]["username"] == "alice" and body["expires_at"]

    state = alice.http.get("/api/auth/session").json()
    assert state["csrf_token"] == alice.csrf and state["via"] == "session"
    assert state["user"]["username"] == "alice"

    token = alice.http.cookies["parley_session"]
    assert alice.http.post("/api/auth/logout").status_code == 403  # a write: needs CSRF
    assert alice.write("POST", "/api/auth/logout").status_code == 204
    # The old cookie is dead even if a client keeps sending it.
    stale = httpx.get(f"{server.root}/api/me", cookies={"parley_session": token})
    assert stale.status_code == 401


def test_a_key_is_answered_for_its_own_user_whatever_cookie_comes_with_it(
    server: ParleyServer, alice: Browser
) -> None:
    make_user(server, "bob")
    bob = Browser(server, "bob@example.org")
    try:
        bob_key = bob.new_key()["key"]
    finally:
        bob.close()
    # Alice's browser (her cookie in the jar) calls with Bob's key: Bob is the caller.
    with_key = {"Authorization": f"Bearer {bob_key}"}
    me = alice.http.get("/api/me", headers=with_key).json()
    assert (me["user"]["username"], me["via"]) == ("bob", "api_key")
    state = alice.http.get("/api/auth/session", headers=with_key).json()
    assert (state["user"]["username"], state["via"]) == ("bob", "api_key")
    assert state["csrf_token"] is None and state["expires_at"] is None
    # Her own session is still described to her.
    mine = alice.http.get("/api/auth/session").json()
    assert (mine["user"]["username"], mine["csrf_token"]) == ("alice", alice.csrf)


def test_logging_in_again_ends_the_session_the_cookie_named(
    server: ParleyServer, alice: Browser
) -> None:
    first = alice.http.cookies["parley_session"]
    # A failed login changes nothing.
    wrong = alice.http.post("/api/auth/login", json={"login": "alice", "password": "wrong!"})
    assert wrong.status_code == 401
    assert httpx.get(f"{server.root}/api/me", cookies={"parley_session": first}).status_code == 200
    again = alice.http.post("/api/auth/login", json={"login": "alice", "password": PASSWORD})
    assert again.status_code == 200
    assert alice.http.cookies["parley_session"] != first
    assert alice.http.get("/api/me").status_code == 200
    stale = httpx.get(f"{server.root}/api/me", cookies={"parley_session": first})
    assert stale.status_code == 401


def test_login_failures_look_the_same(server: ParleyServer, alice: Browser) -> None:
    url = f"{server.root}/api/auth/login"
    wrong_password = httpx.post(url, json={"login": "alice", "password": "wrong password"})
    unknown_user = httpx.post(url, json={"login": "nobody@example.org", "password": PASSWORD})
    assert wrong_password.status_code == unknown_user.status_code == 401
    assert wrong_password.content == unknown_user.content
    assert "set-cookie" not in wrong_password.headers
    form = httpx.post(url, data={"login": "alice", "password": PASSWORD})
    assert form.status_code == 400  # not JSON: no login from a cross-site form
    by_username = httpx.post(url, json={"login": "alice", "password": PASSWORD})
    by_email = httpx.post(url, json={"login": "ALICE@example.ORG", "password": PASSWORD})
    assert by_username.status_code == by_email.status_code == 200


def test_a_name_that_keeps_failing_is_refused_for_a_while(
    server: ParleyServer, alice: Browser, database_url: str
) -> None:
    url = f"{server.root}/api/auth/login"
    # A burst: of any number of concurrent guesses, at most MAX_FAILURES are checked.
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda n: httpx.post(url, json={"login": " Alice ", "password": f"guess {n}"}),
                range(MAX_FAILURES + 6),
            )
        )
    assert sorted(a.status_code for a in answers) == [401] * MAX_FAILURES + [429] * 6
    refused = next(a for a in answers if a.status_code == 429)
    assert 60 <= int(refused.headers["Retry-After"]) <= 16 * 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # The right password is refused too, unchecked, however the name is written.
    right = httpx.post(url, json={"login": "ALICE", "password": PASSWORD})
    assert right.status_code == 429 and "set-cookie" not in right.headers
    # Other names are not affected, known or not.
    assert httpx.post(url, json={"login": "nobody", "password": "x"}).status_code == 401
    # The counter's key names no login, and refused attempts are not counted.
    counted = rows(database_url, "SELECT subject, requests FROM rate_windows")
    assert all("alice" not in r["subject"] and "nobody" not in r["subject"] for r in counted)
    assert sum(r["requests"] for r in counted) == MAX_FAILURES + 1

    def move_counts_back(minutes: int) -> None:
        engine = sa.create_engine(database_url)
        with engine.begin() as conn:
            found = [dict(r._mapping) for r in conn.execute(sa.select(rate_windows))]
            conn.execute(sa.delete(rate_windows))
            for row in found:
                row["window_start"] -= timedelta(minutes=minutes)
            conn.execute(sa.insert(rate_windows), found)
        engine.dispose()

    # Fourteen minutes on, the failures leave the window in a minute or two, and retrying
    # meanwhile does not push that back.
    move_counts_back(14)
    for _ in range(5):
        retried = httpx.post(url, json={"login": "alice", "password": PASSWORD})
        assert retried.status_code == 429 and 1 <= int(retried.headers["Retry-After"]) <= 120
    assert sum(r["requests"] for r in rows(database_url, "SELECT requests FROM rate_windows")) == (
        MAX_FAILURES + 1
    )
    # A quiet window later (the counts moved back 16 minutes), the name logs in, and
    # that success forgets its failures.
    move_counts_back(16)
    for _ in range(MAX_FAILURES - 1):
        httpx.post(url, json={"login": "alice", "password": "wrong"})
    assert httpx.post(url, json={"login": "alice", "password": PASSWORD}).status_code == 200
    for _ in range(MAX_FAILURES - 1):
        assert httpx.post(url, json={"login": "alice", "password": "wrong"}).status_code == 401


def test_password_change_needs_the_current_one_and_ends_other_sessions(
    server: ParleyServer, alice: Browser
) -> None:
    other = Browser(server, "alice")
    try:
        missing = alice.write("PATCH", "/api/me", json={"password": "a new password"})
        assert missing.status_code == 400
        wrong = alice.write(
            "PATCH", "/api/me", json={"password": "a new password", "current_password": "nope"}
        )
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "current_password"
        short = alice.write(
            "PATCH", "/api/me", json={"password": "short", "current_password": PASSWORD}
        )
        assert short.status_code == 400 and short.json()["error"]["param"] == "password"
        changed = alice.write(
            "PATCH", "/api/me", json={"password": "a new password", "current_password": PASSWORD}
        )
        assert changed.status_code == 200
        assert alice.http.get("/api/me").status_code == 200  # this session stays
        assert other.http.get("/api/me").status_code == 401  # the others end
        url = f"{server.root}/api/auth/login"
        assert httpx.post(url, json={"login": "alice", "password": PASSWORD}).status_code == 401
        fresh = httpx.post(url, json={"login": "alice", "password": "a new password"})
        assert fresh.status_code == 200
    finally:
        other.close()


# -- who sees what -------------------------------------------------------------------------


def test_a_user_cannot_see_or_revoke_another_users_key(
    server: ParleyServer, alice: Browser
) -> None:
    key = alice.new_key("alice's")
    make_user(server, "bob")
    bob = Browser(server, "bob")
    try:
        bob_key = bob.new_key("bob's")
        assert [k["name"] for k in bob.http.get("/api/keys").json()["data"]] == ["bob's"]
        theirs = bob.write("DELETE", f"/api/keys/{key['id']}")
        missing = bob.write("DELETE", f"/api/keys/{uuid.uuid4()}")
        malformed = bob.write("DELETE", "/api/keys/not-a-uuid")
        assert theirs.status_code == missing.status_code == malformed.status_code == 404
        assert theirs.json() == missing.json()
        by_key = httpx.delete(f"{server.root}/api/keys/{key['id']}", headers=bearer(bob_key["key"]))
        assert by_key.status_code == 404
        # Alice's key still works.
        assert httpx.get(f"{server.root}/api/me", headers=bearer(key["key"])).status_code == 200

        # Admins (the master key here) see everybody's keys, never the keys themselves.
        everything = httpx.get(f"{server.root}/api/admin/keys", headers=bearer(MASTER)).json()
        assert sorted(k["user"]["username"] for k in everything["data"]) == ["alice", "bob"]
        only_bob = httpx.get(
            f"{server.root}/api/admin/keys", params={"user": "bob"}, headers=bearer(MASTER)
        ).json()
        assert [k["name"] for k in only_bob["data"]] == ["bob's"]
        assert key["key"] not in str(everything) and bob_key["key"] not in str(everything)
        revoked = httpx.delete(f"{server.root}/api/keys/{key['id']}", headers=bearer(MASTER))
        assert revoked.status_code == 200
    finally:
        bob.close()


ADMIN_ROUTES = (
    ("GET", "/api/admin/users"),
    ("POST", "/api/admin/users"),
    ("GET", "/api/admin/users/{id}"),
    ("PATCH", "/api/admin/users/{id}"),
    ("GET", "/api/admin/keys"),
)


def test_admin_routes_are_404_for_users_and_open_to_admins(
    server: ParleyServer, alice: Browser
) -> None:
    key = alice.new_key()["key"]
    me = alice.http.get("/api/me").json()["user"]
    body = {"role": "admin"}
    for method, template in ADMIN_ROUTES:
        path = template.format(id=me["id"])
        by_key = httpx.request(method, f"{server.root}{path}", json=body, headers=bearer(key))
        by_cookie = alice.write(method, path, json=body)
        unknown = httpx.request(method, f"{server.root}/api/admin/nothing", headers=bearer(key))
        assert by_key.status_code == by_cookie.status_code == 404, (method, path)
        assert by_key.json()["error"]["message"] == f"no such endpoint: {method} {path}"
        assert unknown.status_code == 404
    assert alice.http.get("/api/me").json()["user"]["role"] == "user"

    # Promoted by the master key, alice can administer.
    promoted = httpx.patch(
        f"{server.root}/api/admin/users/{me['id']}", json=body, headers=bearer(MASTER)
    )
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
    made = alice.write(
        "POST",
        "/api/admin/users",
        json={"email": "dave@example.org", "username": "dave", "password": "dave's password"},
    )
    assert made.status_code == 201 and made.json()["role"] == "user"
    page = httpx.get(
        f"{server.root}/api/admin/users", params={"limit": 1}, headers=bearer(key)
    ).json()
    assert [u["username"] for u in page["data"]] == ["alice"] and page["has_more"] is True
    rest = httpx.get(
        f"{server.root}/api/admin/users",
        params={"limit": 5, "after": page["data"][0]["id"]},
        headers=bearer(key),
    ).json()
    assert [u["username"] for u in rest["data"]] == ["dave"] and rest["has_more"] is False
    taken = alice.write(
        "POST",
        "/api/admin/users",
        json={"email": "DAVE@example.org", "username": "dave2", "password": "long enough"},
    )
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "email"
    bad = alice.write(
        "POST",
        "/api/admin/users",
        json={"email": "nope", "username": "x", "password": "long enough", "extra": 1},
    )
    assert bad.status_code == 400 and "unknown field" in bad.json()["error"]["message"]


# -- secrets never leak --------------------------------------------------------------------


def test_canary_password_and_key_never_leak(
    server: ParleyServer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary_password = "canary-password-7f3a9c"
    make_user(server, "erin", password=canary_password)
    erin = Browser(server, "erin", password=canary_password)
    bodies: list[str] = [erin.login_reply.text]
    try:
        created = erin.new_key("canary")
        canary_key = created["key"]
        for reply in (
            erin.http.get("/api/keys"),
            erin.http.get("/api/me"),
            erin.http.get("/api/auth/session"),
            httpx.get(f"{server.root}/api/me", headers=bearer(canary_key)),
            httpx.get(f"{server.root}/api/admin/keys", headers=bearer(MASTER)),
            httpx.get(f"{server.root}/api/admin/users", headers=bearer(MASTER)),
            httpx.post(
                f"{server.base_url}/chat/completions", json=CHAT, headers=bearer(canary_key)
            ),
            # Failures: the wrong key is the canary with a changed tail, the wrong password
            # carries the canary in it.
            httpx.get(f"{server.root}/api/me", headers=bearer(canary_key[:-2] + "zz")),
            httpx.post(
                f"{server.root}/api/auth/login",
                json={"login": "erin", "password": canary_password + "x"},
            ),
            erin.write("PATCH", "/api/me", json={"password": canary_password}),
            erin.write(
                "PATCH",
                "/api/me",
                json={"password": "short", "current_password": canary_password},
            ),
            erin.write("DELETE", f"/api/keys/{created['id']}"),
            httpx.get(f"{server.root}/api/me", headers=bearer(canary_key)),
        ):
            bodies.append(reply.text + str(reply.headers))
    finally:
        erin.close()
    dump = dump_tables(database_url)
    everything = "\n".join(bodies) + dump + caplog.text
    assert canary_password not in everything
    assert canary_key not in everything
    assert canary_key[:12] in dump  # the display prefix is kept, and only it


def dump_tables(database_url: str) -> str:
    """Every row of every table, as text."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return "\n".join(
                repr(row)
                for table in metadata.sorted_tables
                for row in conn.execute(table.select())
            )
    finally:
        engine.dispose()


# -- local mode ----------------------------------------------------------------------------


def test_local_mode_needs_no_credentials_and_sessions_follow_settings(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    server = _start(tmp_path, database_url, upstream, PARLEY_SESSION_HOURS="0.5")
    try:
        me = httpx.get(f"{server.root}/api/me")
        assert me.status_code == 200
        assert me.json() == {"user": None, "role": "admin", "via": "local"}
        made = httpx.post(
            f"{server.root}/api/admin/users",
            json={"email": "f@example.org", "username": "frank", "password": "frank's password"},
        )
        assert made.status_code == 201
        reply = httpx.post(f"{server.base_url}/chat/completions", json=CHAT)
        assert reply.status_code == 200
        # Logging in works in local mode too (the web UI needs no special case), and the
        # session lasts PARLEY_SESSION_HOURS.
        browser = Browser(server, "frank", "frank's password")
        expires = datetime.fromisoformat(browser.login_reply.json()["expires_at"])
        assert timedelta(minutes=29) < expires - datetime.now(UTC) <= timedelta(minutes=30)
        assert "Max-Age=17" in browser.login_reply.headers["set-cookie"]  # 1799 or 1800 s
        assert browser.http.get("/api/auth/session").json()["csrf_token"] == browser.csrf
        browser.close()
    finally:
        server.stop()
    assert owners(database_url, "request_log") == [(None, None)]


def test_session_cookie_is_secure_over_https() -> None:
    request = make_mocked_request("POST", "/api/auth/login").clone(scheme="https")
    response = web.Response()
    set_session_cookie(request, response, "token", datetime.now(UTC) + timedelta(hours=1))
    cookie = response.cookies["parley_session"]
    assert cookie["secure"] is True and cookie["httponly"] is True
    assert cookie["samesite"] == "Lax" and cookie["path"] == "/"
