"""The chat API's conversations and messages over real HTTP: a real parley in front of the
fake OpenAI upstream, on a SQLite file and on PostgreSQL.

Callers are the local admin (local mode) or, through a test-only middleware that stands
in for API keys and sessions, users 1 and 2: ownership is decided by ``Identity`` alone,
whichever channel made it.
"""

from __future__ import annotations

import base64
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from aiohttp import web

from parley.chat.titles import clean_title
from parley.server.app import create_app
from parley.server.identity import IDENTITY_KEY, Identity
from parley.store.schema import conversations, messages
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config

Events = list[tuple[str, dict[str, Any]]]


@web.middleware
async def _test_user(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """``X-Test-User: <n>`` makes the caller user n (a plain user, not an admin)."""
    who = request.headers.get("X-Test-User")
    if who is not None:
        request[IDENTITY_KEY] = Identity(
            user_id=int(who), api_key_id=100 + int(who), role="user", via="api_key"
        )
    return await handler(request)


class Server(ParleyServer):
    """``ParleyServer`` with the test-only identity middleware innermost."""

    async def _start(self) -> None:
        app = create_app(self.settings)
        app.middlewares.append(_test_user)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _config(tmp_path: Path, upstream: FakeOpenAI) -> None:
    provider = {
        "kind": "openai",
        "base_url": upstream.base_url,
        "models": ["gpt-4o-mini"],
        "list_models": False,
        "timeouts": {"connect": 2.0, "first_byte": 2.0, "idle": 2.0, "total": 5.0},
    }
    write_config(
        tmp_path,
        [{"name": "up", **provider}, {"name": "alt", **provider, "models": []}],
        aliases={"fast": ["up/gpt-4o-mini"]},
        # Retries off: a failing model fails at once.
        extra="[retry]\nattempts = 1\n",
    )


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[Server]:
    _config(tmp_path, upstream)
    with Server(settings_for(tmp_path, database_url)) as running:
        yield running


class Api:
    """A caller of the chat API (``user`` None: the local admin)."""

    opened: list[httpx.Client] = []

    def __init__(self, server: ParleyServer, user: int | None = None, **headers: str) -> None:
        if user is not None:
            headers["X-Test-User"] = str(user)
        self.http = httpx.Client(base_url=f"{server.root}/api", headers=headers, timeout=10)
        Api.opened.append(self.http)

    def create(self, **body: Any) -> dict[str, Any]:
        body.setdefault("default_model", "up/gpt-4o-mini")
        response = self.http.post("/conversations", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def get(self, conversation_id: str) -> dict[str, Any]:
        response = self.http.get(f"/conversations/{conversation_id}")
        assert response.status_code == 200, response.text
        got: dict[str, Any] = response.json()
        return got

    def send(self, conversation_id: str, content: Any = "hello", **body: Any) -> Events:
        return self.stream(f"/conversations/{conversation_id}/messages", content=content, **body)

    def regenerate(self, conversation_id: str, message_id: str, **body: Any) -> Events:
        path = f"/conversations/{conversation_id}/messages/{message_id}/regenerate"
        return self.stream(path, **body)

    def stream(self, path: str, **body: Any) -> Events:
        """POST and read the SSE answer: (event, data) pairs."""
        events: Events = []
        with self.http.stream("POST", path, json=body) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    assert event is not None
                    events.append((event, orjson.loads(line.removeprefix("data: "))))
                    event = None
        return events


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while Api.opened:
        Api.opened.pop().close()


def text_of(events: Events) -> str:
    return "".join(data["text"] for event, data in events if event == "delta")


def last(events: Events, name: str) -> dict[str, Any]:
    found = [data for event, data in events if event == name]
    assert found, f"no {name} event in {events}"
    return found[-1]


def test_create_list_get_update_delete(server: Server, database_url: str) -> None:
    api = Api(server)
    created = api.create(title="  Trip   plans ", system_prompt="Be brief.")
    assert created["title"] == "Trip plans" and created["source"] == "chat"
    assert created["default_model"] == "up/gpt-4o-mini" and created["message_count"] == 0
    assert uuid.UUID(created["id"]) and created["last_message_at"] is None
    cid = created["id"]

    bad = api.http.post("/conversations", json={"default_model": "nope/model"})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    assert api.http.post("/conversations", json={}).status_code == 400
    assert (
        api.http.post("/conversations", json={"default_model": "fast", "x": 1}).status_code == 400
    )
    alias = api.create(default_model="fast")

    listed = api.http.get("/conversations").json()
    assert [c["id"] for c in listed["data"]] == [alias["id"], cid]
    assert listed["next_cursor"] is None

    patched = api.http.patch(
        f"/conversations/{cid}", json={"title": "Lyon", "pinned": True, "default_model": "fast"}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["title"], patched.json()["pinned"]) == ("Lyon", True)
    for body in ({"pinned": "yes"}, {"default_model": "nope/x"}, {"owner": 1}):
        assert api.http.patch(f"/conversations/{cid}", json=body).status_code == 400, body
    # Pinned first; archived ones only when asked for.
    assert [c["id"] for c in api.http.get("/conversations").json()["data"]] == [cid, alias["id"]]
    api.http.patch(f"/conversations/{alias['id']}", json={"archived": True})
    assert [c["id"] for c in api.http.get("/conversations").json()["data"]] == [cid]
    archived = api.http.get("/conversations", params={"archived": "true"}).json()["data"]
    assert [c["id"] for c in archived] == [alias["id"]]
    assert [c["id"] for c in api.http.get("/conversations?q=LYO").json()["data"]] == [cid]
    assert api.http.get("/conversations?limit=0").status_code == 400
    for spelled in ("+5", "1_0", "\u0665"):
        refused = api.http.get("/conversations", params={"limit": spelled})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "limit"

    got = api.get(cid)
    assert got["messages"] == [] and got["active_path"] == [] and got["active_leaf_id"] is None

    assert api.http.delete(f"/conversations/{cid}").status_code == 204
    assert api.http.get(f"/conversations/{cid}").status_code == 404
    assert api.http.delete(f"/conversations/{cid}").status_code == 404
    assert rows(database_url, "SELECT count(*) AS n FROM conversations")[0]["n"] == 1


def test_pages_have_no_duplicates_or_gaps_newest_activity_first(server: Server) -> None:
    api = Api(server)
    made = [api.create(title=f"c{i}")["id"] for i in range(11)]
    # Activity moves a conversation to the top.
    api.send(made[3], "bump")
    expected = [made[3], *reversed([c for c in made if c != made[3]])]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        page = api.http.get("/conversations", params=params).json()
        seen += [c["id"] for c in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    top = api.http.get("/conversations", params={"limit": 1}).json()["data"][0]
    assert top["message_count"] == 2 and top["last_message_at"] is not None
    assert api.http.get("/conversations", params={"cursor": "garbage"}).status_code == 400
    # Well-formed base64 JSON of the wrong shape, or a time out of range, is no cursor.
    for forged in (
        [True, "2020-01-01T00:00:00", 5],
        [True, "2020-01-01T00:00:00", [1]],
        [False, "0001-01-01T00:00:00+14:00", str(uuid.uuid4())],
    ):
        cursor = base64.urlsafe_b64encode(orjson.dumps(forged)).decode().rstrip("=")
        reply = api.http.get("/conversations", params={"cursor": cursor})
        assert reply.status_code == 400, (forged, reply.text)
        assert reply.json()["error"]["param"] == "cursor"


def test_streaming_chat_end_to_end(server: Server, database_url: str, upstream: FakeOpenAI) -> None:
    api = Api(server)
    cid = api.create(title="Story", system_prompt="Be brief.")["id"]
    events = api.send(cid, "tell me a story", temperature=0.5, max_tokens=50)

    names = [name for name, _ in events]
    assert names[0] == "message" and names[-1] == "done"
    user = last(events, "message")
    assert (user["role"], user["content"], user["parent_id"]) == ("user", "tell me a story", None)
    assert text_of(events) == "echo: tell me a story"
    done = last(events, "done")
    assert done["role"] == "assistant" and done["content"] == "echo: tell me a story"
    assert done["parent_id"] == user["id"] and done["model_used"] == "gpt-4o-mini"
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    assert done["payload"] == {"role": "assistant", "content": "echo: tell me a story"}

    # The upstream got the system prompt, then the branch.
    body = upstream.received[-1][2]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "tell me a story"},
    ]
    assert (body["temperature"], body["max_tokens"], body["stream"]) == (0.5, 50, True)

    got = api.get(cid)
    assert [m["id"] for m in got["messages"]] == [user["id"], done["id"]]
    assert got["messages"][1] == done
    assert got["active_path"] == [user["id"], done["id"]] and got["active_leaf_id"] == done["id"]
    assert got["message_count"] == 2

    # The answer links to its request row exactly as /v1 traffic does.
    [req] = rows(database_url, "SELECT * FROM request_log WHERE endpoint = 'chat'")
    assert req["success"] and req["client_protocol"] == "parley" and req["is_streaming"]
    assert (req["provider"], req["model"], req["model_requested"]) == (
        "up",
        "gpt-4o-mini",
        "up/gpt-4o-mini",
    )
    assert req["time_to_first_token_ms"] is not None and req["message_count"] == 2
    [conv] = rows(database_url, "SELECT id FROM conversations")
    assert req["conversation_id"] == conv["id"]
    [answer] = rows(database_url, "SELECT * FROM messages WHERE role = 'assistant'")
    [response] = rows(database_url, "SELECT * FROM responses")
    assert response["message_id"] == answer["id"] and response["request_id"] == req["id"]
    assert answer["request_id"] == req["id"]

    # Not streamed: one JSON body with both messages; content parts are accepted.
    plain = api.http.post(
        f"/conversations/{cid}/messages",
        json={"content": [{"type": "text", "text": "and then?"}], "stream": False},
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["user_message"]["parent_id"] == done["id"]
    assert plain.json()["assistant_message"]["content"] == "echo: and then?"
    assert upstream.received[-1][2]["messages"][-2:] == [
        {"role": "assistant", "content": "echo: tell me a story"},
        {"role": "user", "content": [{"type": "text", "text": "and then?"}]},
    ]
    for bad in ({"content": ""}, {"content": 3}, {"content": "x", "stream": "no"}, {}):
        response = api.http.post(f"/conversations/{cid}/messages", json=bad)
        assert response.status_code == 400, bad


def test_the_user_message_survives_a_failing_upstream(server: Server, database_url: str) -> None:
    api = Api(server)
    cid = api.create(default_model="up/fail-500")["id"]
    events = api.send(cid, "are you there?")
    assert [e for e, _ in events] == ["message", "error"]
    error = last(events, "error")
    assert error["type"] == "server_error" and error["status"] == 502 and error["message"]
    got = api.get(cid)
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "are you there?")]
    [req] = rows(database_url, "SELECT * FROM request_log")
    assert not req["success"] and req["status_code"] == 500 and req["conversation_id"]

    plain = api.http.post(
        f"/conversations/{cid}/messages", json={"content": "again?", "stream": False}
    )
    assert plain.status_code == 502
    assert plain.json()["error"]["type"] == "api_error"
    assert plain.json()["user_message"]["content"] == "again?"
    assert len(api.get(cid)["messages"]) == 2
    # Regenerating with a model that works answers the kept message.
    regenerated = api.regenerate(cid, plain.json()["user_message"]["id"], model="up/gpt-4o-mini")
    assert last(regenerated, "done")["content"] == "echo: again?"
    # That first answer asks the conversation's own model for a title: it fails, and
    # the attempt is recorded like any other.
    [title] = wait_for(
        lambda: rows(database_url, "SELECT * FROM request_log WHERE endpoint = 'title'")
    )
    assert not title["success"] and api.get(cid)["title"] is None


def test_per_message_model_override(server: Server, database_url: str) -> None:
    api = Api(server)
    cid = api.create()["id"]
    done = last(api.send(cid, "hi", model="alt/other-model"), "done")
    assert done["model_used"] == "other-model"
    req = rows(database_url, "SELECT * FROM request_log WHERE endpoint = 'chat'")[-1]
    assert (req["provider"], req["model"], req["model_requested"]) == (
        "alt",
        "other-model",
        "alt/other-model",
    )
    # The conversation keeps its default; an unknown override is refused before anything
    # is stored.
    assert api.get(cid)["default_model"] == "up/gpt-4o-mini"
    refused = api.http.post(f"/conversations/{cid}/messages", json={"content": "x", "model": "zz"})
    assert refused.status_code == 400
    assert len(api.get(cid)["messages"]) == 2
    # A default model that left the configuration is the request's fault, not a 404,
    # and refused before anything is stored, as an unknown override is.
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE conversations SET default_model = 'gone/model'"))
    finally:
        engine.dispose()
    gone = api.http.post(f"/conversations/{cid}/messages", json={"content": "still there?"})
    assert gone.status_code == 400 and "gone" in gone.json()["error"]["message"]
    assert len(api.get(cid)["messages"]) == 2


def test_edit_and_regenerate_make_branches(server: Server, upstream: FakeOpenAI) -> None:
    api = Api(server)
    cid = api.create(title="Branches")["id"]
    u1 = last(events := api.send(cid, "one"), "message")
    a1 = last(events, "done")
    u2 = last(events := api.send(cid, "two"), "message")
    a2 = last(events, "done")
    assert u2["parent_id"] == a1["id"]

    # Edit "two": a new user message under its parent is a new branch.
    edited = api.send(cid, "two, edited", parent_id=a1["id"])
    u2b, a2b = last(edited, "message"), last(edited, "done")
    assert u2b["parent_id"] == a1["id"]
    # Regenerate the edited answer: a sibling of it, with the same parent.
    regenerated = api.regenerate(cid, a2b["id"])
    assert last(regenerated, "message")["id"] == u2b["id"]
    a2c = last(regenerated, "done")
    assert a2c["parent_id"] == u2b["id"] and a2c["id"] != a2b["id"]
    # Only the selected branch went upstream.
    assert [m["content"] for m in upstream.received[-1][2]["messages"]] == [
        "one",
        "echo: one",
        "two, edited",
    ]

    got = api.get(cid)
    assert len(got["messages"]) == 7  # every branch kept
    assert got["active_path"] == [u1["id"], a1["id"], u2b["id"], a2c["id"]]
    siblings = [m["id"] for m in got["messages"] if m["parent_id"] == u2b["id"]]
    assert siblings == [a2b["id"], a2c["id"]]

    # Select the old branch; the next message continues it.
    selected = api.http.patch(f"/conversations/{cid}", json={"active_leaf_id": a2["id"]})
    assert selected.status_code == 200
    assert api.get(cid)["active_path"] == [u1["id"], a1["id"], u2["id"], a2["id"]]
    u3 = last(api.send(cid, "three"), "message")
    assert u3["parent_id"] == a2["id"]
    assert [m["content"] for m in upstream.received[-1][2]["messages"]] == [
        "one",
        "echo: one",
        "two",
        "echo: two",
        "three",
    ]
    # Unknown or foreign message ids are refused.
    other = api.create()["id"]
    other_message = last(api.send(other, "elsewhere"), "message")["id"]
    for bad in (str(uuid.uuid4()), other_message, "not-a-uuid"):
        response = api.http.patch(f"/conversations/{cid}", json={"active_leaf_id": bad})
        assert response.status_code == 400, bad
        sent = api.http.post(
            f"/conversations/{cid}/messages", json={"content": "x", "parent_id": bad}
        )
        assert sent.status_code == 400, bad
    assert (
        api.http.post(f"/conversations/{cid}/messages/{other_message}/regenerate").status_code
        == 400
    )
    # A new root: parent_id null.
    root = last(api.send(cid, "from scratch", parent_id=None), "message")
    assert root["parent_id"] is None


def test_title_is_made_after_the_first_exchange_unless_set(
    server: Server, database_url: str, upstream: FakeOpenAI
) -> None:
    api = Api(server)
    cid = api.create()["id"]
    api.send(cid, "plan a trip to Lyon")
    titled = wait_for(lambda: api.get(cid)["title"])
    assert titled == "echo: plan a trip to Lyon"
    [title_req] = rows(database_url, "SELECT * FROM request_log WHERE endpoint = 'title'")
    assert title_req["success"] and title_req["conversation_id"] is None
    assert title_req["model_requested"] == "up/gpt-4o-mini"
    title_body = next(
        body for _, _, body in upstream.received if body["messages"][0]["role"] == "system"
    )
    assert title_body["messages"][-1] == {"role": "user", "content": "plan a trip to Lyon"}
    # Later exchanges make no other title; the user's own title stays.
    api.send(cid, "by train")
    api.http.patch(f"/conversations/{cid}", json={"title": "Lyon"})
    # A conversation titled by its user never gets a generated one.
    mine = api.create(title="Mine")["id"]
    api.send(mine, "hello")
    # (A third conversation's title marks the moment all earlier titles are done.)
    marker = api.create()["id"]
    api.send(marker, "marker")
    wait_for(lambda: api.get(marker)["title"])
    assert len(rows(database_url, "SELECT id FROM request_log WHERE endpoint = 'title'")) == 2
    assert api.get(cid)["title"] == "Lyon" and api.get(mine)["title"] == "Mine"
    # The titles' exchanges never became messages of any conversation.
    assert len(api.get(cid)["messages"]) == 4


def test_v1_traffic_conversations_are_listed_as_api(server: Server) -> None:
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "sdk"}]},
        timeout=10,
    )
    assert response.status_code == 200
    api = Api(server)
    api.create(title="chat")
    listed = api.http.get("/conversations").json()["data"]
    assert [(c["source"], c["message_count"]) for c in listed] == [("chat", 0), ("api", 2)]
    got = api.get(listed[1]["id"])
    assert [m["content"] for m in got["messages"]] == ["sdk", "echo: sdk"]
    # The chat continues it under its newest message.
    assert (
        last(api.send(listed[1]["id"], "more"), "message")["parent_id"] == got["messages"][1]["id"]
    )


def test_another_users_conversation_is_a_404_on_every_route(server: Server) -> None:
    alice, bob = Api(server, user=1), Api(server, user=2)
    cid = alice.create(title="Alice's")["id"]
    events = alice.send(cid, "secret")
    user_message, answer = last(events, "message")["id"], last(events, "done")["id"]
    attempts = [
        ("GET", f"/conversations/{cid}", None),
        ("PATCH", f"/conversations/{cid}", {"title": "Bob's now"}),
        ("DELETE", f"/conversations/{cid}", None),
        ("POST", f"/conversations/{cid}/messages", {"content": "hi", "stream": False}),
        ("POST", f"/conversations/{cid}/messages", {"content": "hi"}),
        ("POST", f"/conversations/{cid}/messages/{answer}/regenerate", {}),
        ("POST", f"/conversations/{cid}/messages/{user_message}/regenerate", {}),
    ]
    missing = str(uuid.uuid4())
    for method, path, body in attempts:
        theirs = bob.http.request(method, path, json=body)
        nobodys = bob.http.request(method, path.replace(cid, missing), json=body)
        malformed = bob.http.request(method, path.replace(cid, "12"), json=body)
        for response in (theirs, nobodys, malformed):
            assert response.status_code == 404, (method, path, response.text)
        # Same answer whether the id exists or not: nothing to probe.
        assert theirs.json() == nobodys.json()
    assert bob.http.get("/conversations").json()["data"] == []
    # Alice's conversation is untouched and still hers; the local admin may read it.
    got = alice.get(cid)
    assert got["title"] == "Alice's" and len(got["messages"]) == 2
    assert Api(server).get(cid)["id"] == cid
    assert [c["id"] for c in alice.http.get("/conversations").json()["data"]] == [cid]


def test_master_key_protects_the_chat_api(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    _config(tmp_path, upstream)
    settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY="sk-master-0123456789")
    with ParleyServer(settings) as running:
        assert httpx.get(f"{running.root}/api/conversations").status_code == 401
        api = Api(running, Authorization="Bearer sk-master-0123456789")
        cid = api.create()["id"]
        assert last(api.send(cid, "hi"), "done")["content"] == "echo: hi"
        assert [c["id"] for c in api.http.get("/conversations").json()["data"]] == [cid]


def test_client_leaving_mid_stream_cancels_and_keeps_the_partial_answer(
    server: Server, database_url: str, upstream: FakeOpenAI
) -> None:
    api = Api(server)
    cid = api.create(default_model="up/slow-stream", title="t")["id"]
    path = f"/conversations/{cid}/messages"
    with api.http.stream("POST", path, json={"content": "one two three four five"}) as response:
        for line in response.iter_lines():
            if line.startswith("event: delta"):
                break  # leave after the first piece of the answer
    [req] = wait_for(
        lambda: rows(database_url, "SELECT * FROM request_log WHERE finish_reason IS NOT NULL")
    )
    assert req["finish_reason"] == "client_disconnected" and req["error_type"] == "cancelled"
    wait_for(lambda: upstream.abandoned == 1, timeout=2.0)
    got = api.get(cid)
    assert got["messages"][0]["content"] == "one two three four five"
    [partial] = [m for m in got["messages"] if m["role"] == "assistant"]
    assert partial["content"] and "five" not in partial["content"]


def test_deleting_a_conversation_deletes_its_attachments_blobs(
    server: Server, database_url: str, tmp_path: Path
) -> None:
    # Attachments belong to a user row; the test-only identity is user 1.
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO users (id, public_id, email, username, password_hash, role,"
                    " is_active, preferences, created_at, updated_at) VALUES (1, :p,"
                    " 'a@example.org', 'alice', 'x', 'user', :t, '{}', :n, :n)"
                ),
                {"p": uuid.uuid4().hex, "t": True, "n": datetime.now(UTC)},
            )
    finally:
        engine.dispose()
    alice = Api(server, user=1)
    kept, doomed = alice.create()["id"], alice.create()["id"]

    def upload(conversation_id: str, data: bytes) -> str:
        response = alice.http.post(
            "/attachments",
            files={"file": ("notes.txt", data, "text/plain")},
            data={"conversation_id": conversation_id},
        )
        assert response.status_code == 201, response.text
        sha256: str = response.json()["sha256"]
        return sha256

    only_here = upload(doomed, b"only in the deleted conversation\n")
    shared = upload(doomed, b"in both conversations\n")
    assert upload(kept, b"in both conversations\n") == shared
    blob_dir = tmp_path / "data" / "blobs"
    assert (blob_dir / only_here[:2] / only_here).exists()

    assert alice.http.delete(f"/conversations/{doomed}").status_code == 204
    assert not (blob_dir / only_here[:2] / only_here).exists()
    # Bytes another conversation's attachment still names stay.
    assert (blob_dir / shared[:2] / shared).exists()
    # The other conversation's attachment row is untouched.
    assert len(rows(database_url, "SELECT id FROM attachments")) == 1


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        ('"Trip to Lyon."', "Trip to Lyon"),
        ("Title: **Budget   plan**\nHere is why...", "Budget plan"),
        ("\u201cSmart quotes\u201d", "Smart quotes"),
        ("  \n ", None),
        ("word " * 40, ("word " * 16).strip()),
    ],
)
def test_generated_titles_are_cleaned_up(answer: str, title: str | None) -> None:
    assert clean_title(answer) == title


def test_deleting_a_conversation_mid_answer_keeps_the_request_log_row(
    server: Server, database_url: str
) -> None:
    api = Api(server)
    doomed = api.create(default_model="up/slow-stream")["id"]  # five chunks, 100 ms apart
    with ThreadPoolExecutor(1) as pool:
        answering = pool.submit(api.send, doomed, "tell me slowly")
        time.sleep(0.2)
        assert Api(server).http.delete(f"/conversations/{doomed}").status_code == 204
        events = answering.result(timeout=10)
    # The answer still reaches the client; it has no conversation left to be stored in.
    assert [event for event, _ in events][-1] == "done", events
    assert Api(server).http.get(f"/conversations/{doomed}").status_code == 404
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            logged = conn.execute(
                # The title exchange (endpoint "title") is recorded outside conversations.
                sa.text(
                    "SELECT success, conversation_id FROM request_log "
                    "WHERE model = :m AND endpoint <> 'title'"
                ),
                {"m": "slow-stream"},
            ).all()
    finally:
        engine.dispose()
    assert [(bool(success), conv) for success, conv in logged] == [(True, None)]


def test_a_send_no_model_can_answer_stores_nothing(server: Server, database_url: str) -> None:
    api = Api(server)
    # An imported conversation has no default model; another's left the configuration.
    cases = {None: "the conversation has no default model", "gone/model": "gone"}
    ids = {model: api.create()["id"] for model in cases}
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            for model, conversation_id in ids.items():
                conn.execute(
                    sa.update(conversations)
                    .where(conversations.c.public_id == uuid.UUID(conversation_id))
                    .values(default_model=model)
                )
    finally:
        engine.dispose()
    for model, wanted in cases.items():
        for stream in (True, False):
            reply = api.http.post(
                f"/conversations/{ids[model]}/messages",
                json={"content": "continue", "stream": stream},
            )
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert wanted in error["message"] and error["param"] == "model"
        assert api.get(ids[model])["message_count"] == 0  # no stray user messages


def test_text_with_a_nul_character_is_a_400_on_both_databases(server: Server) -> None:
    api = Api(server)
    refused = api.http.post(
        "/conversations", json={"default_model": "up/gpt-4o-mini", "title": "a\u0000b"}
    )
    assert refused.status_code == 400, refused.text
    assert "NUL" in refused.json()["error"]["message"]
    cid = api.create()["id"]
    sent = api.http.post(f"/conversations/{cid}/messages", json={"content": "a\u0000b"})
    assert sent.status_code == 400, sent.text
    assert api.get(cid)["message_count"] == 0


def test_a_max_tokens_the_request_log_cannot_hold_is_a_400_before_any_upstream_call(
    server: Server, upstream: FakeOpenAI
) -> None:
    api = Api(server)
    cid = api.create()["id"]
    for max_tokens in (2**31, 3_000_000_000, 2**63):
        reply = api.http.post(
            f"/conversations/{cid}/messages",
            json={"content": "hi", "stream": False, "max_tokens": max_tokens},
        )
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "max_tokens"
    assert api.get(cid)["message_count"] == 0
    assert upstream.received == []
    # The largest value passes the check; this model's context window then refuses it.
    events = api.send(cid, "hi", max_tokens=2**31 - 1)
    assert "context window" in last(events, "error")["message"]


def test_content_parts_an_upstream_would_refuse_are_a_400(server: Server) -> None:
    api = Api(server)
    cid = api.create()["id"]
    for content in (
        [{"type": "bogus"}],
        [{"type": "text"}],
        [{"type": "text", "text": 5}],
        [{"type": "image_url", "image_url": "notadict"}],
        [{"type": "image_url", "image_url": {"detail": "low"}}],
    ):
        reply = api.http.post(
            f"/conversations/{cid}/messages", json={"content": content, "stream": False}
        )
        assert reply.status_code == 400, (content, reply.text)
        assert reply.json()["error"]["param"] == "content"
    assert api.get(cid)["message_count"] == 0
    parts = [
        {"type": "text", "text": "what is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    assert last(api.send(cid, parts), "done")["role"] == "assistant"


def _import(api: Api, conversation: dict[str, Any]) -> httpx.Response:
    base = {"created_at": "2024-05-01T10:00:00Z", "messages": []}
    document = {"format": "parley", "version": 1, "conversations": [{**base, **conversation}]}
    return api.http.post("/import", content=orjson.dumps(document))


def test_an_import_refuses_what_create_refuses_with_the_same_error(server: Server) -> None:
    api = Api(server)
    for field, value in [
        ("title", 7),
        ("title", "t" * 501),
        ("default_model", ""),
        ("default_model", 5),
        ("default_model", "up/" + "m" * 253),
        ("system_prompt", ["Be brief."]),
    ]:
        body = {"default_model": "up/gpt-4o-mini", field: value}
        created = api.http.post("/conversations", json=body)
        imported = _import(api, {field: value})
        assert (created.status_code, imported.status_code) == (400, 400), (field, imported.text)
        create_error, import_error = created.json()["error"], imported.json()["error"]
        where = f"conversations[0].{field}"
        assert create_error["param"] == field and import_error["param"] == where
        assert import_error["message"] == create_error["message"].replace(
            f"'{field}'", f"'{where}'"
        )
    # A time that leaves the calendar once in UTC is refused like any bad time.
    for conversation in (
        {"created_at": "0001-01-01T00:00:00+14:00"},
        {"messages": [{**_entry("u", "hi"), "created_at": "9999-12-31T23:59:59-14:00"}]},
    ):
        imported = _import(api, conversation)
        assert imported.status_code == 400, imported.text
        assert "ISO 8601" in imported.json()["error"]["message"]
    # NUL: a 400 on both databases (PostgreSQL cannot store it), before anything is stored.
    for conversation in (
        {"title": "a\u0000b"},
        {"messages": [_entry("u", "a\u0000b")]},
    ):
        imported = _import(api, conversation)
        assert imported.status_code == 400, imported.text
        assert "NUL" in imported.json()["error"]["message"]
    assert api.http.get("/conversations").json()["data"] == []
    # What create accepts, import accepts alike: the title tidied the same way.
    imported = _import(api, {"title": "  Trip   plans ", "messages": [_entry("u", "hi")]})
    assert imported.status_code == 201, imported.text
    [conversation_id] = imported.json()["conversations"]
    assert api.get(conversation_id)["title"] == api.create(title="  Trip   plans ")["title"]


def _entry(key: str, content: str) -> dict[str, Any]:
    return {
        "id": key,
        "parent_id": None,
        "created_at": "2024-05-01T10:00:01Z",
        "message": {"role": "user", "content": content},
    }


def test_a_nul_in_a_path_or_a_query_is_a_400_on_both_databases(server: Server) -> None:
    api = Api(server)
    for method, path, param in (
        ("GET", "/conversations?q=a%00b", "q"),
        ("GET", "/admin/keys?user=a%00b", "user"),
        ("PUT", "/me/provider-keys/up%00x", None),
        ("DELETE", "/me/provider-keys/up%00x", None),
    ):
        reply = api.http.request(method, path, json={"api_key": "sk-test-0123456789"})
        assert reply.status_code == 400, (path, reply.text)
        error = reply.json()["error"]
        assert "NUL" in error["message"] and error["param"] == param, (path, error)
    # The same on /v1, in OpenAI's error shape.
    reply = httpx.get(f"{server.base_url}/models/a%00b")
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


def test_a_malformed_message_id_to_regenerate_is_a_400_naming_it(server: Server) -> None:
    api = Api(server)
    cid = api.create(title="t")["id"]
    events = api.send(cid, "hello")
    answer = last(events, "done")["id"]
    for message_id in ("12", "not-a-uuid", str(uuid.uuid4())):
        path = f"/conversations/{cid}/messages/{message_id}/regenerate"
        reply = api.http.post(path, json={"stream": False})
        assert reply.status_code == 400, (message_id, reply.text)
        assert reply.json()["error"]["param"] == "message_id"
    # A malformed conversation id stays the 404 of any conversation one may not see.
    reply = api.http.post(f"/conversations/12/messages/{answer}/regenerate", json={})
    assert reply.status_code == 404
    assert len(api.get(cid)["messages"]) == 2


def test_booleans_must_be_json_booleans(server: Server) -> None:
    api = Api(server)
    cid = api.create(title="t")["id"]
    answer = last(api.send(cid, "hello"), "done")["id"]
    # The list's filters are words (true, false, all): 1 and 0 are not read as them.
    for field in ("pinned", "archived"):
        for value in ("1", "0", "yes"):
            reply = api.http.get("/conversations", params={field: value})
            assert reply.status_code == 400, (field, value, reply.text)
            assert reply.json()["error"]["param"] == field
        assert api.http.get("/conversations", params={field: "TRUE"}).status_code == 200
    for value in (1, 0, "true", None):
        for field in ("pinned", "archived", "is_active"):
            reply = api.http.patch(f"/conversations/{cid}", json={field: value})
            assert reply.status_code == 400, (field, value, reply.text)
            assert reply.json()["error"]["param"] == field
        for path in (
            f"/conversations/{cid}/messages",
            f"/conversations/{cid}/messages/{answer}/regenerate",
        ):
            body: dict[str, Any] = {} if path.endswith("regenerate") else {"content": "x"}
            reply = api.http.post(path, json={**body, "stream": value})
            assert reply.status_code == 400, (path, value, reply.text)
            assert reply.json()["error"]["param"] == "stream"
        for field in ("pinned", "archived"):
            reply = _import(api, {field: value})
            assert reply.status_code == 400, (field, value, reply.text)
            assert reply.json()["error"]["param"] == f"conversations[0].{field}"
    got = api.get(cid)
    assert (got["pinned"], got["archived"], got["is_active"]) == (False, False, True)
    assert len(got["messages"]) == 2


def test_a_first_answer_cut_short_still_leads_to_a_title(server: Server) -> None:
    api = Api(server)
    cid = api.create()["id"]
    events = api.send(cid, "plan a trip to Lyon", model="up/error-mid")
    assert [e for e, _ in events][-1] == "error"
    # The partial answer is kept, linked to its failed request; the user answers again.
    assert [m["role"] for m in api.get(cid)["messages"]] == ["user", "assistant"]
    assert last(api.regenerate(cid, last(events, "message")["id"]), "done")
    assert wait_for(lambda: api.get(cid)["title"]) == "echo: plan a trip to Lyon"


def test_a_conversation_begun_with_files_alone_is_titled_from_their_names(
    server: Server,
) -> None:
    api = Api(server)
    cid = api.create()["id"]
    uploaded = api.http.post("/attachments", files={"file": ("q3-report.md", b"# Q3\n")})
    assert uploaded.status_code == 201, uploaded.text
    assert last(api.send(cid, "", attachments=[uploaded.json()["id"]]), "done")
    assert wait_for(lambda: api.get(cid)["title"]) == "echo: [file: q3-report.md]"


@pytest.mark.parametrize("fault", ["unreadable", "not-utf8"])
def test_a_file_that_cannot_be_read_ends_the_answer_with_an_error(
    server: Server, tmp_path: Path, fault: str
) -> None:
    api = Api(server)
    cid = api.create(title="t")["id"]
    uploaded = api.http.post("/attachments", files={"file": ("notes.txt", b"my notes\n")})
    assert uploaded.status_code == 201, uploaded.text
    assert last(api.send(cid, "read this", attachments=[uploaded.json()["id"]]), "done")
    sha256 = uploaded.json()["sha256"]
    blob = tmp_path / "data" / "blobs" / sha256[:2] / sha256
    blob.unlink()
    if fault == "unreadable":
        # A socket where the blob was: opening it fails with an OSError (ENXIO), as a
        # disk error would. Bound under a short path (socket paths are short), then moved.
        with tempfile.TemporaryDirectory(dir="/tmp") as short, socket.socket(socket.AF_UNIX) as s:
            s.bind(f"{short}/s")
            os.rename(f"{short}/s", blob)
    else:
        blob.write_bytes(b"\xff\xfe no longer what was uploaded")
    # The next turn sends the file again: the stream ends with an error, never silently.
    events = api.send(cid, "and now?")
    assert [e for e, _ in events] == ["message", "error"], events
    error = last(events, "error")
    assert error["status"] == 500 and "cannot be read" in error["message"]
    plain = api.http.post(f"/conversations/{cid}/messages", json={"content": "?", "stream": False})
    assert plain.status_code == 500 and "cannot be read" in plain.json()["error"]["message"]
    assert plain.json()["user_message"]["content"] == "?"
    assert [m["content"] for m in api.get(cid)["messages"]][-2:] == ["and now?", "?"]


def test_a_failure_inside_the_answer_ends_the_stream_with_an_error_event(
    server: Server, database_url: str
) -> None:
    api = Api(server)
    cid = api.create(title="t")["id"]
    first = last(api.send(cid, "hello"), "message")
    # A stored message the branch cannot be rebuilt from (a fault of the database).
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(messages)
                .where(messages.c.public_id == uuid.UUID(first["id"]))
                .values(payload="{not json")
            )
    finally:
        engine.dispose()
    events = api.send(cid, "still there?")
    assert [e for e, _ in events] == ["message", "error"], events
    assert last(events, "error") == {
        "message": "internal error while answering",
        "type": "internal",
        "status": 500,
    }
    plain = api.http.post(f"/conversations/{cid}/messages", json={"content": "?", "stream": False})
    assert plain.status_code == 500, plain.text
    assert plain.json()["user_message"]["content"] == "?"


def test_line_separators_in_a_message_never_cut_an_event(server: Server) -> None:
    # httpx's iter_lines (like str.splitlines) also ends lines at NEL, U+2028 and U+2029,
    # which text pasted from documents holds: each event must still be one data line.
    api = Api(server)
    cid = api.create(title="t")["id"]
    text = "one\u2028two\u2029three\x85four\r\nfive"
    events = api.send(cid, text)
    names = [e for e, _ in events]
    assert names[0] == "message" and names[-1] == "done" and "error" not in names
    assert last(events, "message")["content"] == text
    assert text_of(events) == last(events, "done")["content"] == f"echo: {text}"
    assert last(events, "done")["payload"]["content"] == f"echo: {text}"
    assert [m["content"] for m in api.get(cid)["messages"]] == [text, f"echo: {text}"]


# The route once left its default_model check unawaited when another field was refused
# (a "coroutine ... was never awaited" RuntimeWarning): made an error here, whatever the
# suite's configuration says.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_refused_patch_leaves_no_check_unawaited(server: Server) -> None:
    api = Api(server)
    cid = api.create(title="t")["id"]
    for body in (
        {"default_model": "fast", "pinned": "yes"},
        {"default_model": "up/gpt-4o-mini", "title": 5},
        {"default_model": "nope/x", "archived": 1},
    ):
        reply = api.http.patch(f"/conversations/{cid}", json=body)
        assert reply.status_code == 400, (body, reply.text)
    reply = api.http.patch(f"/conversations/{cid}", json={"default_model": "nope/x"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "default_model"
    assert api.get(cid)["default_model"] == "up/gpt-4o-mini"
