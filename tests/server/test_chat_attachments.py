"""Files attached to chat messages, end to end: a real parley with a master key in front of
the fake OpenAI upstream, on a SQLite file and on PostgreSQL.

Users and their API keys are made over HTTP (the master key creates the users, each logs
in and makes a key), uploads go through ``POST /api/attachments``, and what the model got
is read from ``FakeOpenAI.received``; the store and the blob directory are inspected
directly to show what is kept and what is gone.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from parley.store.schema import metadata
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config

MASTER = "attachments-master-key"
PASSWORD = "correct horse battery"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
IMAGE_PART = {
    "type": "image_url",
    "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
}
NOTES = "# Plan\nBuy bread.\n"
NOTES_PART = {
    "type": "text",
    "text": f'<file name="notes.md" type="text/markdown">\n{NOTES}\n</file>',
}
Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _serve(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, extra: str = "", **env: str
) -> ParleyServer:
    provider = {
        "name": "up",
        "kind": "openai",
        "base_url": upstream.base_url,
        "models": ["gpt-4o-mini"],
        "list_models": False,
    }
    write_config(tmp_path, [provider], extra="[retry]\nattempts = 1\n" + extra)
    settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, **env)
    return ParleyServer(settings).start()


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    running = _serve(tmp_path, database_url, upstream)
    try:
        yield running
    finally:
        running.stop()


class User:
    """A user made with the master key, calling the chat API with an API key of their own
    (``name`` None: the master key itself, an admin without a user row)."""

    opened: list[httpx.Client] = []

    def __init__(self, server: ParleyServer, name: str | None) -> None:
        key = MASTER if name is None else _user_key(server, name)
        self.http = httpx.Client(
            base_url=f"{server.root}/api", headers={"Authorization": f"Bearer {key}"}, timeout=10
        )
        User.opened.append(self.http)

    def upload(self, data: bytes, name: str) -> dict[str, Any]:
        reply = self.http.post("/attachments", files={"file": (name, data, "text/plain")})
        assert reply.status_code == 201, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def create(self) -> str:
        # Titled: no background title request reaches the upstream.
        reply = self.http.post(
            "/conversations", json={"default_model": "up/gpt-4o-mini", "title": "files"}
        )
        assert reply.status_code == 201, reply.text
        conversation_id: str = reply.json()["id"]
        return conversation_id

    def get(self, conversation_id: str) -> dict[str, Any]:
        reply = self.http.get(f"/conversations/{conversation_id}")
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def post(self, path: str, **body: Any) -> httpx.Response:
        return self.http.post(path, json={"stream": False, **body})

    def send(self, conversation_id: str, **body: Any) -> Events:
        return self.stream(f"/conversations/{conversation_id}/messages", **body)

    def stream(self, path: str, **body: Any) -> Events:
        events: Events = []
        with self.http.stream("POST", path, json=body) as reply:
            assert reply.status_code == 200, reply.read()
            event = None
            for line in reply.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    assert event is not None
                    events.append((event, orjson.loads(line.removeprefix("data: "))))
        return events


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while User.opened:
        User.opened.pop().close()


def _user_key(server: ParleyServer, name: str) -> str:
    master = {"Authorization": f"Bearer {MASTER}"}
    made = httpx.post(
        f"{server.root}/api/admin/users",
        json={"email": f"{name}@example.org", "username": name, "password": PASSWORD},
        headers=master,
        timeout=10,
    )
    assert made.status_code == 201, made.text
    with httpx.Client(base_url=server.root, timeout=10) as browser:
        login = browser.post("/api/auth/login", json={"login": name, "password": PASSWORD})
        assert login.status_code == 200, login.text
        csrf = {"X-CSRF-Token": login.json()["csrf_token"]}
        key = browser.post("/api/keys", json={"name": "tests"}, headers=csrf)
        assert key.status_code == 201, key.text
        secret: str = key.json()["key"]
        return secret


def chat_bodies(upstream: FakeOpenAI) -> list[dict[str, Any]]:
    return [body for path, _, body in upstream.received if path.endswith("/chat/completions")]


def meta(upload: dict[str, Any]) -> dict[str, Any]:
    """An upload as a message lists it."""
    return {key: upload[key] for key in ("id", "filename", "mime_type", "size")}


def public(value: Any) -> str:
    """A public id read back through raw SQL (SQLite keeps 32 hex digits)."""
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(value))


def internal_ids(database_url: str, table: str) -> dict[str, int]:
    return {
        public(r["public_id"]): r["id"]
        for r in rows(database_url, f"SELECT id, public_id FROM {table}")
    }


def links(database_url: str) -> dict[str, tuple[int | None, int | None]]:
    """Each attachment's (conversation, message), internal ids, by public id."""
    found = rows(database_url, "SELECT public_id, conversation_id, message_id FROM attachments")
    return {public(r["public_id"]): (r["conversation_id"], r["message_id"]) for r in found}


def dump_store(database_url: str) -> str:
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


def blob_files(server: ParleyServer) -> list[Path]:
    return [p for p in server.settings.blob_dir.rglob("*") if p.is_file()]


def test_images_and_text_files_reach_the_model_as_parts_and_stay_in_the_branch(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    alice = User(server, "alice")
    image = alice.upload(PNG, "photo.png")
    notes = alice.upload(NOTES.encode(), "notes.md")
    conversation = alice.create()

    events = alice.send(
        conversation, content="Describe these", attachments=[image["id"], notes["id"]]
    )
    assert events[0][0] == "message" and events[-1][0] == "done", events
    question, answer = events[0][1], events[-1][1]
    assert question["attachments"] == [meta(image), meta(notes)]
    assert answer["attachments"] == []
    # The model gets the text, then the image as a data URL, then the text file as text.
    sent = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Describe these"}, IMAGE_PART, NOTES_PART],
        }
    ]
    [first] = chat_bodies(upstream)
    assert first["messages"] == sent

    # The message row keeps its text only; the files are linked to it.
    stored = rows(database_url, "SELECT payload FROM messages WHERE role = 'user'")
    assert [orjson.loads(r["payload"]) for r in stored] == [
        {"role": "user", "content": "Describe these"}
    ]
    store = dump_store(database_url)
    # (The answer echoes the text file: an answer is text the model wrote.)
    assert base64.b64encode(PNG).decode() not in store
    message_ids = internal_ids(database_url, "messages")
    conversation_ids = internal_ids(database_url, "conversations")
    linked = (conversation_ids[conversation], message_ids[question["id"]])
    assert links(database_url) == {image["id"]: linked, notes["id"]: linked}
    assert alice.http.get(f"/attachments/{image['id']}").json()["message_id"] == question["id"]
    tree = alice.get(conversation)
    assert [m["attachments"] for m in tree["messages"]] == [[meta(image), meta(notes)], []]

    # A later message on the branch, and a regenerated answer, still carry the files.
    events = alice.send(conversation, content="And the colours?")
    second_answer = events[-1][1]
    history = [*sent, {"role": "assistant", "content": answer["content"]}]
    assert chat_bodies(upstream)[1]["messages"] == [
        *history,
        {"role": "user", "content": "And the colours?"},
    ]
    again = alice.stream(f"/conversations/{conversation}/messages/{second_answer['id']}/regenerate")
    assert again[-1][0] == "done"
    assert chat_bodies(upstream)[2]["messages"] == chat_bodies(upstream)[1]["messages"]

    # The message's hash is that of what the model got, files included: a /v1 client
    # re-sending this history continues the same conversation.
    v1 = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "up/gpt-4o-mini", "messages": [*history, {"role": "user", "content": "v1"}]},
        headers=alice.http.headers,
        timeout=10,
    )
    assert v1.status_code == 200, v1.text
    listed = alice.http.get("/conversations").json()["data"]
    assert [(c["id"], c["message_count"]) for c in listed] == [(conversation, 7)]


def test_someone_elses_or_unknown_attachment_is_a_404_and_nothing_is_stored(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    alice, bob, admin = User(server, "alice"), User(server, "bob"), User(server, None)
    bobs = bob.upload(b"bob's notes\n", "bob.txt")
    mine = alice.upload(b"alice's notes\n", "alice.txt")
    conversation = alice.create()
    path = f"/conversations/{conversation}/messages"

    for ids in ([bobs["id"]], [mine["id"], bobs["id"]], [str(uuid.uuid4())], ["not-an-id"]):
        refused = alice.post(path, content="hi", attachments=ids)
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["message"].startswith("no such attachment")
        refused = alice.http.post(path, json={"content": "hi", "attachments": ids})
        assert refused.status_code == 404, refused.text
    # Admins see every upload, yet attach only their own.
    theirs = admin.create()
    refused = admin.post(
        f"/conversations/{theirs}/messages", content="hi", attachments=[mine["id"]]
    )
    assert refused.status_code == 404, refused.text
    # Malformed lists are the body's fault.
    for bad in ([mine["id"], mine["id"]], mine["id"], [1], [str(uuid.uuid4()) for _ in range(21)]):
        refused = alice.post(path, content="hi", attachments=bad)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "attachments"
    assert alice.post(path, content="", attachments=[]).status_code == 400

    assert rows(database_url, "SELECT id FROM messages") == []
    assert set(links(database_url).values()) == {(None, None)}
    assert chat_bodies(upstream) == []
    # Alice's own file still goes through, and bob still cannot read it.
    sent = alice.post(path, content="hi", attachments=[mine["id"]])
    assert sent.status_code == 200, sent.text
    assert sent.json()["user_message"]["attachments"] == [meta(mine)]
    assert bob.http.get(f"/attachments/{mine['id']}").status_code == 404
    assert bob.http.get(f"/conversations/{conversation}").status_code == 404


def test_a_model_known_not_to_take_images_refuses_them_before_any_upstream_call(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    blind = '[capabilities."up/gpt-4o-mini"]\nvision = false\n'
    server = _serve(tmp_path, database_url, upstream, extra=blind)
    try:
        alice = User(server, "alice")
        image = alice.upload(PNG, "photo.png")
        notes = alice.upload(NOTES.encode(), "notes.md")
        conversation = alice.create()

        events = alice.send(conversation, content="What is this?", attachments=[image["id"]])
        assert [name for name, _ in events] == ["message", "error"]
        error = events[1][1]
        assert error["status"] == 400 and error["type"] == "bad_request"
        assert "does not accept images" in error["message"]
        # Not streamed: a 400 with the message that was kept.
        refused = alice.post(f"/conversations/{conversation}/messages", content="Still?")
        assert refused.status_code == 400
        assert "does not accept images" in refused.json()["error"]["message"]
        assert refused.json()["user_message"]["content"] == "Still?"
        assert chat_bodies(upstream) == []
        assert rows(database_url, "SELECT id FROM request_log") == []
        # The user messages stay, with their file, ready for another model.
        tree = alice.get(conversation)
        assert [(m["content"], m["attachments"]) for m in tree["messages"]] == [
            ("What is this?", [meta(image)]),
            ("Still?", []),
        ]

        # Text files are text: the same model reads them.
        other = alice.create()
        events = alice.send(other, attachments=[notes["id"]])
        assert events[-1][0] == "done", events
        assert events[0][1]["content"] == ""
        assert chat_bodies(upstream)[0]["messages"] == [{"role": "user", "content": [NOTES_PART]}]
    finally:
        server.stop()


def test_a_file_sent_again_in_an_edit_is_copied_and_the_old_branch_keeps_its_own(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    alice = User(server, "alice")
    image = alice.upload(PNG, "photo.png")
    conversation = alice.create()
    first = alice.send(conversation, content="Look", attachments=[image["id"]])
    old_answer = first[-1][1]
    edited = alice.send(
        conversation, content="Look closely", parent_id=None, attachments=[image["id"]]
    )
    copy = edited[0][1]["attachments"][0]
    assert copy["id"] != image["id"] and meta(copy) | {"id": image["id"]} == meta(image)
    assert [b["messages"][0]["content"][1] for b in chat_bodies(upstream)] == [IMAGE_PART] * 2

    # One blob, two rows, one per message.
    found = rows(database_url, "SELECT sha256, message_id FROM attachments ORDER BY id")
    assert len({r["sha256"] for r in found}) == 1 and len(blob_files(server)) == 1
    message_ids = internal_ids(database_url, "messages")
    assert [r["message_id"] for r in found] == [
        message_ids[first[0][1]["id"]],
        message_ids[edited[0][1]["id"]],
    ]
    # The old branch, answered again, still has its file.
    alice.stream(f"/conversations/{conversation}/messages/{old_answer['id']}/regenerate")
    assert chat_bodies(upstream)[2]["messages"][0]["content"] == [
        {"type": "text", "text": "Look"},
        IMAGE_PART,
    ]
    # Deleting the copy leaves the original and the bytes it names.
    assert alice.http.delete(f"/attachments/{copy['id']}").status_code == 200
    assert len(blob_files(server)) == 1
    assert [m["attachments"] for m in alice.get(conversation)["messages"]][:1] == [[meta(image)]]


def test_deleting_the_conversation_deletes_its_attachments_and_their_blobs(
    server: ParleyServer, database_url: str
) -> None:
    alice = User(server, "alice")
    kept = alice.upload(b"not sent anywhere\n", "kept.txt")
    image = alice.upload(PNG, "photo.png")
    notes = alice.upload(NOTES.encode(), "notes.md")
    conversation = alice.create()
    sent = alice.post(
        f"/conversations/{conversation}/messages",
        content="Describe these",
        attachments=[image["id"], notes["id"]],
    )
    assert sent.status_code == 200, sent.text
    assert len(blob_files(server)) == 3

    assert alice.http.delete(f"/conversations/{conversation}").status_code == 204
    assert list(links(database_url)) == [kept["id"]]
    assert [p.name for p in blob_files(server)] == [kept["sha256"]]
    for gone in (image, notes):
        assert alice.http.get(f"/attachments/{gone['id']}").status_code == 404


def test_an_oversized_document_is_a_413_about_the_file(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    limit = 64 * 1024
    running = _serve(tmp_path, database_url, upstream, PARLEY_MAX_UPLOAD_BYTES=str(limit))
    try:
        alice = User(running, "alice")
        # Just over the limit (refused while streaming), and far over it (refused from
        # Content-Length before a byte is read): the same error as the upload's others.
        for size in (limit + 1, limit * 8):
            reply = alice.http.post(
                "/documents",
                files={"file": ("big.txt", b"a" * size, "text/plain")},
                data={"collection": "inbox"},
            )
            assert reply.status_code == 413, reply.text
            error = reply.json()["error"]
            assert (error["param"], error["code"]) == ("file", "request_too_large")
            assert str(limit) in error["message"]
        refused = alice.http.post(
            "/documents", files={"file": ("empty.txt", b"", "text/plain")}, data={"collection": "x"}
        )
        assert refused.json()["error"]["param"] == "file"
        assert alice.http.get("/documents").json()["data"] == []
        assert blob_files(running) == []
    finally:
        running.stop()
