"""Deleting one message with its replies, in the conversation repository, on SQLite and
PostgreSQL: the subtree and what hangs off it go, the rest of the tree, the request log
and the other branches stay, the search index forgets the deleted text, and a send or
an answer racing the delete leaves no orphan row."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from parley.errors import InvalidRequest, NotFound
from parley.server.identity import LOCAL
from parley.store import attachments as files
from parley.store.conversations import Conversations, Turn
from parley.store.engine import writer_connection
from parley.store.schema import conversations, messages
from parley.store.search import Scope, Search
from tests.store.test_conversations import (
    ADMIN,
    ALICE,
    BOB,
    answer,
    answer_racing,
    deep_branch,
    new,
    rows,
    say,
)


@pytest.fixture
def store(migrated_engine: sa.Engine) -> Conversations:
    return Conversations(migrated_engine)


def contents(store: Conversations, conv: Any) -> tuple[list[str], list[str]]:
    """Every message's text, and the active branch's, as ``GET`` would list them."""
    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    by_id = {m.id: m.content for m in tree.messages}
    return [m.content for m in tree.messages], [by_id[key] for key in tree.active_path]


def found(engine: sa.Engine, word: str) -> list[str]:
    """The texts keyword search finds for ``word`` in Alice's history."""
    hits = Search(engine).keyword(word, Scope(ALICE.user_id))
    return sorted(hit.snippet.replace("\ue000", "").replace("\ue001", "") for hit in hits)


def attach(engine: sa.Engine, conv: Any, turn: Turn, sha256: str) -> None:
    with writer_connection(engine) as conn, conn.begin():
        row = files.insert_attachment(
            conn,
            user_id=None,
            conversation=files.ConversationRef(conv.id, conv.public_id, None),
            filename=f"{sha256[:4]}.txt",
            mime_type="text/plain",
            size=1,
            sha256=sha256,
        )
        files.link_to_message(conn, [row.id], conv.id, turn.message.id)


def test_a_message_goes_with_its_replies_and_the_view_moves_to_its_parent(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    q1 = say(store, conv, "first question about herons")
    a1 = answer(migrated_engine, q1, "first answer about herons").answer_public_ids[0]
    q2 = say(store, conv, "second question about egrets")
    answer(migrated_engine, q2, "second answer about egrets")
    q3 = say(store, conv, "third question about egrets")
    answer(migrated_engine, q3, "third answer about egrets")
    # An edit of q2: a second branch under a1, which stays.
    edit = say(store, conv, "edited question about storks", parent=a1)
    answer(migrated_engine, edit, "edited answer about storks")
    attach(migrated_engine, conv, q3, "c3" * 32)
    attach(migrated_engine, conv, edit, "ed" * 32)
    store.update(ALICE, conv.public_id, {"active_leaf_id": q3.message.public_id})
    requests = rows(migrated_engine, "SELECT id, conversation_id FROM request_log ORDER BY id")
    assert len(requests) == 4
    doomed = [
        r["id"]
        for r in rows(migrated_engine, "SELECT id FROM messages WHERE content LIKE '%egrets'")
    ]
    assert len(doomed) == 4
    before = {r["id"] for r in rows(migrated_engine, "SELECT id FROM search_outbox")}

    # Deleting q2 takes its answer, q3 and q3's answer (the active branch) with it.
    assert store.delete_message(ALICE, conv.public_id, q2.message.public_id) == {"c3" * 32}

    everything, shown = contents(store, conv)
    assert everything == [
        "first question about herons",
        "first answer about herons",
        "edited question about storks",
        "edited answer about storks",
    ]
    # The view was on the deleted branch: it ends at q2's parent now, not on the other
    # branch (which the newest message would have shown).
    assert shown == ["first question about herons", "first answer about herons"]
    # Each answer's response row went with it; the request log keeps every row, still
    # in the conversation (which is still there), no longer linked from any message.
    assert len(rows(migrated_engine, "SELECT id FROM responses")) == 2
    assert rows(migrated_engine, "SELECT id, conversation_id FROM request_log ORDER BY id") == (
        requests
    )
    linked = rows(migrated_engine, "SELECT request_id FROM messages WHERE request_id IS NOT NULL")
    assert len(linked) == 2
    # The deleted message's file went; the other branch's stays on its message.
    kept = rows(migrated_engine, "SELECT sha256, message_id FROM attachments")
    assert kept == [{"sha256": "ed" * 32, "message_id": edit.message.id}]
    # Search: the keyword index forgets the deleted text at once, and the vector store
    # is told to (one outbox delete per message, for the indexer).
    assert found(migrated_engine, "egrets") == []
    assert len(found(migrated_engine, "storks")) == 2
    queued = rows(migrated_engine, "SELECT id, kind, item_id, op FROM search_outbox")
    deletes = [(r["kind"], r["item_id"], r["op"]) for r in queued if r["id"] not in before]
    assert sorted(deletes) == [("message", key, "delete") for key in sorted(doomed)]


def test_the_view_stays_where_it_was_when_another_branch_is_deleted(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    q1 = say(store, conv, "one")
    a1 = answer(migrated_engine, q1, "one answered").answer_public_ids[0]
    old = say(store, conv, "two")
    say(store, conv, "two, edited", parent=a1)  # the view follows the new branch
    store.delete_message(ALICE, conv.public_id, old.message.public_id)
    assert contents(store, conv)[1] == ["one", "one answered", "two, edited"]
    # Deleting an answer leaves the question it answered (the view stays on it).
    q3 = say(store, conv, "three")
    a3 = answer(migrated_engine, q3, "three answered").answer_public_ids[0]
    store.delete_message(ALICE, conv.public_id, a3)
    everything, shown = contents(store, conv)
    assert shown == ["one", "one answered", "two, edited", "three"] == everything


def test_deleting_the_first_message_empties_the_conversation(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store, title="kept")
    first = say(store, conv, "hello")
    answer(migrated_engine, first, "hi")
    say(store, conv, "more")
    store.delete_message(ALICE, conv.public_id, first.message.public_id)
    assert contents(store, conv) == ([], [])
    got = store.get(ALICE, conv.public_id)
    assert got is not None and got.title == "kept" and got.message_count == 0
    # The conversation goes on: a new message is a new root.
    again = say(store, conv, "starting again")
    assert again.message.parent_id is None and contents(store, conv)[1] == ["starting again"]


def test_only_a_caller_who_may_see_the_conversation_deletes_its_messages(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    turn = say(store, conv, "mine")
    elsewhere = say(store, new(store), "another conversation")
    # Another user's: as missing as an unknown conversation (None: the API's 404).
    assert store.delete_message(BOB, conv.public_id, turn.message.public_id) is None
    assert store.delete_message(ALICE, uuid.uuid4(), turn.message.public_id) is None
    # A message this conversation does not hold: unknown, or of another conversation.
    for message_id in (uuid.uuid4(), elsewhere.message.public_id):
        with pytest.raises(NotFound, match="no such message"):
            store.delete_message(ALICE, conv.public_id, message_id)
    assert len(rows(migrated_engine, "SELECT id FROM messages")) == 2
    # An admin may, as for the conversation itself.
    assert store.delete_message(ADMIN, conv.public_id, turn.message.public_id) == set()
    assert contents(store, conv) == ([], [])


def test_a_branch_over_a_thousand_messages_deep_is_deleted(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """Below the deleted message, SQLite's ``parent_id`` cascade would recurse once per
    message ("too many levels of trigger recursion" past 1,000)."""
    conv = new(store, LOCAL)
    rows_ = deep_branch(migrated_engine, conv.id, 1100)
    store.delete_message(LOCAL, conv.public_id, rows_[1]["public_id"])
    assert rows(migrated_engine, "SELECT id FROM messages") == [{"id": rows_[0]["id"]}]
    tree = store.load(LOCAL, conv.public_id)
    assert tree is not None and tree.active_path == [rows_[0]["id"]]


def test_an_answer_to_a_message_deleted_meanwhile_is_not_stored(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """The answer's upstream call still happened: its request row is kept, linked to
    nothing, as when its conversation is deleted; the answer has no message to hang
    from."""
    conv = new(store)
    turn = say(store, conv, "answer me slowly")
    store.delete_message(ALICE, conv.public_id, turn.message.public_id)
    answer(migrated_engine, turn, "too late")
    assert rows(migrated_engine, "SELECT id FROM messages") == []
    assert rows(migrated_engine, "SELECT id FROM responses") == []
    [logged] = rows(migrated_engine, "SELECT conversation_id, success FROM request_log")
    assert logged["conversation_id"] is None and logged["success"]
    # A send under it is refused as a message the conversation does not hold.
    with pytest.raises(InvalidRequest, match="parent_id"):
        say(store, conv, "a reply", parent=turn.message.public_id)


def test_a_send_under_a_message_being_deleted_waits_and_is_refused(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """A send under a message whose delete is under way (the conversation locked, the
    row deleted, not yet committed) waits for the delete and is then the 400 of a parent
    the conversation does not hold: never a reply stored under nothing, nor (PostgreSQL,
    before the send locked the conversation) a foreign-key error, a 500."""
    conv = new(store)
    say(store, conv, "parent")
    child = say(store, conv, "child")
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(say(store, conv, "late reply", parent=child.message.public_id))
        except Exception as exc:  # what the API would make of it
            outcome.append(exc)

    deleting = writer_connection(migrated_engine)
    transaction = deleting.begin()  # SQLite: BEGIN IMMEDIATE, the write lock
    try:
        # What ``delete_message`` does, up to its commit.
        deleting.execute(
            sa.select(conversations.c.id).where(conversations.c.id == conv.id).with_for_update()
        )
        deleting.execute(sa.delete(messages).where(messages.c.id == child.message.id))
        sender = threading.Thread(target=send)
        sender.start()
        sender.join(0.5)
        assert sender.is_alive(), "the send did not wait for the delete"
        transaction.commit()
    finally:
        if transaction.is_active:
            transaction.rollback()
        deleting.close()
    sender.join(30)
    [refused] = outcome
    assert isinstance(refused, InvalidRequest) and refused.param == "parent_id", refused
    assert contents(store, conv)[0] == ["parent"]


def test_a_delete_while_the_writer_stores_an_answer_under_it_waits_for_the_writer(
    store: Conversations, migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    conv = new(store)
    turn = say(store, conv, "answer me")
    message = turn.message.public_id
    answer_racing(
        migrated_engine,
        turn,
        lambda: store.delete_message(ALICE, conv.public_id, message),
        monkeypatch,
    )
    # The delete went after the writer: the answer it stored went with the message.
    assert rows(migrated_engine, "SELECT id FROM messages") == []
    assert rows(migrated_engine, "SELECT id FROM responses") == []
    assert len(rows(migrated_engine, "SELECT id FROM request_log")) == 1
