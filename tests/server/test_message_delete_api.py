"""``DELETE /api/conversations/{id}/messages/{message_id}`` over real HTTP: a real parley
in front of the fake OpenAI upstream, on a SQLite file and on PostgreSQL.

Before, a single message could not be deleted: only the whole conversation."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import rows, settings_for, wait_for
from tests.server.test_chat_api import Api, Server, _config, last


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[Server]:
    _config(tmp_path, upstream)
    with Server(settings_for(tmp_path, database_url)) as running:
        yield running


def _path(cid: str, message_id: str) -> str:
    return f"/conversations/{cid}/messages/{message_id}"


def _keyword(api: Api, word: str) -> list[str]:
    found = api.http.get("/search", params={"q": word, "mode": "keyword"})
    assert found.status_code == 200, found.text
    return [hit["message_id"] for hit in found.json()["data"] if hit["type"] == "message"]


def test_a_message_goes_with_its_replies_files_and_search_entries(
    server: Server, database_url: str, tmp_path: Path
) -> None:
    api = Api(server)
    cid = api.create(title="birds")["id"]
    q1 = last(api.send(cid, "herons first"), "message")["id"]
    a2 = last(api.send(cid, "herons first again"), "done")["id"]  # q1 a1 q2 a2
    upload = api.http.post(
        "/attachments", files={"file": ("egrets.txt", b"notes about egrets\n")}
    ).json()
    events = api.send(cid, "egrets now", attachments=[upload["id"]])
    q3, a3 = last(events, "message")["id"], last(events, "done")["id"]
    a4 = last(api.send(cid, "egrets again"), "done")["id"]  # q4, a4 below a3
    # An edit of q3: a branch of its own under a2, which stays.
    kept_answer = last(api.send(cid, "storks instead", parent_id=a2), "done")["id"]
    # Back on the egret branch, the one about to go, at its end.
    assert api.http.patch(f"/conversations/{cid}", json={"active_leaf_id": a4}).status_code == 200
    blob = tmp_path / "data" / "blobs" / upload["sha256"][:2] / upload["sha256"]
    assert blob.is_file() and len(_keyword(api, "egrets")) == 4
    requests = rows(database_url, "SELECT id, conversation_id FROM request_log ORDER BY id")

    deleted = api.http.delete(_path(cid, q3))
    assert (deleted.status_code, deleted.content) == (204, b"")

    got = api.get(cid)
    assert [m["content"] for m in got["messages"] if m["role"] == "user"] == [
        "herons first",
        "herons first again",
        "storks instead",
    ]
    # The view was on the deleted branch: it ends at q3's parent, a2.
    assert got["active_leaf_id"] == a2 and got["active_path"][0] == q1
    assert len(got["active_path"]) == 4 and got["message_count"] == 6
    assert kept_answer in {m["id"] for m in got["messages"]}
    # The file went with its message, its bytes with it (no other attachment names them).
    assert api.http.get(f"/attachments/{upload['id']}").status_code == 404
    assert not blob.exists()
    # Keyword search no longer finds the deleted text (the storks branch still is).
    assert _keyword(api, "egrets") == [] and len(_keyword(api, "storks")) == 2
    # The request log keeps every row, in the conversation; the outbox tells the vector
    # store to drop the four deleted messages (tests/search/test_vector_purge.py).
    after = rows(database_url, "SELECT id, conversation_id FROM request_log ORDER BY id")
    assert after == requests
    assert len(rows(database_url, "SELECT id FROM responses")) == 3

    # Gone is gone: a second delete, or a regenerate of the deleted answer, find nothing.
    again = api.http.delete(_path(cid, q3))
    assert again.status_code == 404 and again.json()["error"]["message"].startswith(
        "no such message"
    )
    assert api.http.post(_path(cid, a3) + "/regenerate", json={}).status_code == 400


def test_someone_elses_or_an_unknown_message_is_a_404(server: Server) -> None:
    alice, bob = Api(server, user=1), Api(server, user=2)
    cid = alice.create()["id"]
    events = alice.send(cid, "secret")
    question = last(events, "message")["id"]
    bobs = bob.create()["id"]
    bobs_message = last(bob.send(bobs, "mine"), "message")["id"]

    theirs = bob.http.delete(_path(cid, question))
    nobodys = bob.http.delete(_path(str(uuid.uuid4()), question))
    malformed_conversation = bob.http.delete(_path("12", question))
    for response in (theirs, nobodys, malformed_conversation):
        assert response.status_code == 404, response.text
    # Same answer whether the conversation exists or not: nothing to probe.
    assert theirs.json() == nobodys.json()
    assert theirs.json()["error"]["type"] == "invalid_request_error"
    # In one's own conversation: an unknown, malformed or other conversation's message.
    for message_id in (str(uuid.uuid4()), "12", bobs_message):
        response = alice.http.delete(_path(cid, message_id))
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"].startswith("no such message")
    assert len(alice.get(cid)["messages"]) == 2 and len(bob.get(bobs)["messages"]) == 2
    # The local admin may, as for the conversation itself.
    assert Api(server).http.delete(_path(cid, question)).status_code == 204
    assert alice.get(cid)["messages"] == [] and alice.get(cid)["active_leaf_id"] is None


@pytest.mark.parametrize("what", ["send", "regenerate"])
def test_deleting_a_message_while_an_answer_streams_into_its_branch(
    server: Server, database_url: str, what: str
) -> None:
    """The answer still reaches its client; it has no message left to hang from, so it
    is not stored: no 500, no orphan row. Its request row stays, as for a deleted
    conversation."""
    api = Api(server)
    cid = api.create(default_model="up/slow-stream")["id"]  # five chunks, 100 ms apart
    first = api.send(cid, "tell me slowly")
    question, answered = last(first, "message")["id"], last(first, "done")["id"]
    with ThreadPoolExecutor(1) as pool:
        if what == "send":
            answering = pool.submit(api.send, cid, "and then?")
        else:
            answering = pool.submit(api.regenerate, cid, answered)
        time.sleep(0.2)
        assert Api(server).http.delete(_path(cid, question)).status_code == 204
        events = answering.result(timeout=10)
    assert [event for event, _ in events][-1] == "done", events
    got = api.get(cid)
    assert got["messages"] == [] and got["active_leaf_id"] is None
    for table in ("messages", "responses", "attachments", "citations"):
        assert rows(database_url, f"SELECT id FROM {table}") == [], table
    logged = rows(
        database_url,
        "SELECT success, conversation_id FROM request_log WHERE endpoint <> 'title'",
    )
    assert len(logged) == 2 and all(r["success"] for r in logged)
    # The conversation goes on from nothing.
    assert last(api.send(cid, "hello again"), "done")["content"] == "echo: hello again"


def _found(api: Api, word: str) -> list[str]:
    """What keyword search finds for ``word``: "title" or "message" per hit."""
    found = api.http.get("/search", params={"q": word, "mode": "keyword"})
    assert found.status_code == 200, found.text
    return [hit["type"] for hit in found.json()["data"]]


def test_a_generated_title_goes_with_the_message_it_was_made_from(server: Server) -> None:
    api = Api(server)
    cid = api.create()["id"]
    q1 = last(api.send(cid, "my zanzibar passcode"), "message")["id"]
    assert wait_for(lambda: api.get(cid)["title"]) == "echo: my zanzibar passcode"
    a1 = api.get(cid)["active_path"][1]
    api.send(cid, "and a second question")
    # The fake upstream echoes: the answer holds the word too.
    assert sorted(_found(api, "zanzibar")) == ["message", "message", "title"]

    # Deleting what came later, or only the answer, leaves the text the title was made
    # from: the title stays.
    assert api.http.delete(_path(cid, a1)).status_code == 204
    assert api.get(cid)["title"] == "echo: my zanzibar passcode"
    assert sorted(_found(api, "zanzibar")) == ["message", "title"]

    # Deleting the message it was made from resets it, as a new conversation has it:
    # nothing finds the deleted text, in messages or in the title.
    assert api.http.delete(_path(cid, q1)).status_code == 204
    got = api.get(cid)
    assert got["title"] is None and got["message_count"] == 0
    assert _found(api, "zanzibar") == []
    # The next answer titles the conversation anew.
    api.send(cid, "herons in winter")
    assert wait_for(lambda: api.get(cid)["title"]) == "echo: herons in winter"


def test_a_title_the_user_set_outlives_the_messages(server: Server) -> None:
    api = Api(server)
    renamed = api.create()["id"]
    q1 = last(api.send(renamed, "my zanzibar passcode"), "message")["id"]
    assert wait_for(lambda: api.get(renamed)["title"]) == "echo: my zanzibar passcode"
    patched = api.http.patch(f"/conversations/{renamed}", json={"title": "Zanzibar trip"})
    assert patched.status_code == 200
    named = api.create(title="Zanzibar notes")["id"]
    q2 = last(api.send(named, "zanzibar ferry times"), "message")["id"]

    assert api.http.delete(_path(renamed, q1)).status_code == 204
    assert api.http.delete(_path(named, q2)).status_code == 204
    assert api.get(renamed)["title"] == "Zanzibar trip"
    assert api.get(named)["title"] == "Zanzibar notes"
    assert _found(api, "zanzibar") == ["title", "title"]
