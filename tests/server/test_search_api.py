"""``GET /api/search`` over HTTP with real users and API keys, on SQLite and PostgreSQL:
own history only, admins on request, snippets, deletes, bad input as OpenAI error JSON."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, settings_for, write_config
from tests.server.test_auth import MASTER, Browser, bearer, make_user

CANARY = "canary-b41d-phrase"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": upstream.base_url, "models": ["m"]}],
    )
    running = ParleyServer(settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER)).start()
    try:
        yield running
    finally:
        running.stop()


def key_of(server: ParleyServer, username: str) -> str:
    make_user(server, username)
    browser = Browser(server, username)
    try:
        key: str = browser.new_key()["key"]
        return key
    finally:
        browser.close()


def search(server: ParleyServer, key: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{server.root}/api/search", params=params, headers=bearer(key), timeout=10)


def hits(server: ParleyServer, key: str, **params: Any) -> list[dict[str, Any]]:
    reply = search(server, key, **params)
    assert reply.status_code == 200, reply.text
    found: list[dict[str, Any]] = reply.json()["data"]
    return found


def test_search_is_scoped_to_the_callers_own_history(server: ParleyServer) -> None:
    alice, bob = key_of(server, "alice"), key_of(server, "bob")
    made = httpx.post(
        f"{server.root}/api/conversations",
        json={"default_model": "up/m", "title": f"plans {CANARY}"},
        headers=bearer(alice),
        timeout=10,
    )
    assert made.status_code == 201, made.text
    conv = made.json()["id"]
    sent = httpx.post(
        f"{server.root}/api/conversations/{conv}/messages",
        json={"content": f"remember the {CANARY} <b>please</b>", "stream": False},
        headers=bearer(alice),
        timeout=10,
    )
    assert sent.status_code == 200, sent.text
    message = sent.json()["user_message"]["id"]

    found = hits(server, alice, q=CANARY)
    # The fake upstream's answer repeats the question: both messages match, and the title.
    assert ("message", message) in {(h["type"], h["message_id"]) for h in found}
    assert ("title", None) in {(h["type"], h["message_id"]) for h in found}
    assert all(h["conversation_id"] == conv for h in found)
    [in_message] = [h for h in found if h["message_id"] == message]
    assert in_message["role"] == "user"
    assert in_message["conversation_title"] == f"plans {CANARY}"
    # Matched words marked; the user's own markup escaped (SQLite) or left out (PostgreSQL's
    # headline drops tags), never passed through.
    snippet = in_message["snippet"]
    assert "<mark>canary</mark>" in snippet
    assert "<" not in snippet.replace("<mark>", "").replace("</mark>", "")
    assert hits(server, alice, q=CANARY, conversation=conv, limit=1)[0]["conversation_id"] == conv

    # Bob: nothing of Alice's, however he asks.
    assert hits(server, bob, q=CANARY) == []
    assert hits(server, bob, q=CANARY, conversation=conv) == []
    refused = search(server, bob, q=CANARY, scope="all")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "scope"
    # The master key (an admin) searches its own history by default, everyone's on request.
    assert hits(server, MASTER, q=CANARY) == []
    assert len(hits(server, MASTER, q=CANARY, scope="all")) == len(found)

    deleted = httpx.delete(
        f"{server.root}/api/conversations/{conv}", headers=bearer(alice), timeout=10
    )
    assert deleted.status_code == 204
    assert hits(server, alice, q=CANARY) == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"q": ""}, "q"),
        ({}, "q"),
        ({"q": "   "}, "q"),
        ({"q": "x" * 5000}, "q"),
        ({"q": "word", "mode": "fuzzy"}, "mode"),
        ({"q": "word", "limit": "0"}, "limit"),
        ({"q": "word", "limit": "many"}, "limit"),
        # What Python's int() would read, and no client means.
        ({"q": "word", "limit": " 5"}, "limit"),
        ({"q": "word", "limit": "+5"}, "limit"),
        ({"q": "word", "limit": "1_0"}, "limit"),
        ({"q": "word", "limit": "\u0665"}, "limit"),
        ({"q": "word", "conversation": "not-an-id"}, "conversation"),
    ],
)
def test_bad_input_is_a_400_in_openai_error_json(
    server: ParleyServer, params: dict[str, str], param: str
) -> None:
    reply = search(server, MASTER, **params)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_without_an_embedder_semantic_is_503_and_hybrid_says_keyword(
    server: ParleyServer,
) -> None:
    reply = search(server, MASTER, q="word", mode="semantic")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == "search_unavailable" and "no embedder" in error["message"]
    hybrid = search(server, MASTER, q="word")
    assert hybrid.status_code == 200
    assert hybrid.json()["mode"] == "keyword" and "keyword results only" in hybrid.json()["notice"]


def test_a_100_kb_query_is_refused(server: ParleyServer) -> None:
    # Longer than any HTTP client sends in a URL (httpx refuses), so over a raw socket:
    # the HTTP server refuses a request line over 32 KB before parley parses the query.
    line = f"GET /api/search?q={'x' * 100_000} HTTP/1.1\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall((line + f"Host: 127.0.0.1\r\nAuthorization: Bearer {MASTER}\r\n\r\n").encode())
        status = sock.recv(64).split(b"\r\n")[0]
    assert status.split()[1] == b"400", status


def test_the_longest_query_allowed_gets_a_json_answer_in_any_script(
    server: ParleyServer,
) -> None:
    # 1,000 characters (the limit) of 4-byte UTF-8: 12 KB once percent-encoded, over the
    # HTTP server's default request line (a plain-text 400 before parley saw it).
    assert hits(server, MASTER, q="\U00020000" * 1000) == []
    over = search(server, MASTER, q="漢" * 1001)
    assert over.status_code == 400 and over.json()["error"]["param"] == "q"


def test_syntax_characters_are_text(server: ParleyServer) -> None:
    for query in ['"unclosed', "a* OR b", "NEAR(x y)", "x AND -y", "'; DROP TABLE messages; --"]:
        assert hits(server, MASTER, q=query) == []
