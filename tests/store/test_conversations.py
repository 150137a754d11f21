"""The conversation repository on SQLite and PostgreSQL: ownership, the sidebar's pages,
branches, and the writer's answers to chat-API turns."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message, chain_hashes
from parley.domain.usage import Usage
from parley.errors import InvalidRequest
from parley.server.identity import LOCAL, Identity
from parley.store import attachments as files
from parley.store import exchange_lookups as lookups
from parley.store.bulk import assign_ids
from parley.store.conversations import Conversations, Turn
from parley.store.engine import writer_connection
from parley.store.exchanges import Recorded, write_batch
from parley.store.history_rows import insert_messages
from parley.store.schema import conversations, messages

ALICE = Identity(user_id=1, api_key_id=10, role="user", via="api_key")
BOB = Identity(user_id=2, api_key_id=20, role="user", via="api_key")
ADMIN = Identity(user_id=3, api_key_id=None, role="admin", via="session")


@pytest.fixture
def store(migrated_engine: sa.Engine) -> Conversations:
    return Conversations(migrated_engine)


def new(store: Conversations, who: Identity = ALICE, **fields: Any) -> Any:
    return store.create(
        user_id=who.user_id,
        api_key_id=who.api_key_id,
        default_model=fields.pop("default_model", "up/gpt"),
        **fields,
    )


def say(
    store: Conversations, conversation: Any, text: str, who: Identity = ALICE, **kw: Any
) -> Turn:
    turn = store.add_user_message(
        who,
        conversation.public_id,
        Message("user", text),
        user_id=who.user_id,
        api_key_id=who.api_key_id,
        **kw,
    )
    assert turn is not None
    return turn


def answer(engine: sa.Engine, turn: Turn, text: str | None, who: Identity = ALICE) -> Recorded:
    """What the chat service hands the writer for ``turn`` (None: the upstream failed)."""
    now = datetime.now(UTC)
    ok = text is not None
    exchange = Exchange(
        model_requested="up/gpt",
        messages=tuple(m.message() for m in turn.path),
        started_at=now,
        endpoint="chat",
        client_protocol="parley",
        user_id=who.user_id,
        api_key_id=who.api_key_id,
        attempts=[
            Attempt(
                1,
                "up",
                "gpt-2024",
                now,
                success=ok,
                status_code=200 if ok else 500,
                usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
            )
        ],
        choices=[Choice(0, text, finish_reason="stop")] if ok else [],
        reply_to=ReplyTo(
            turn.conversation.id,
            turn.conversation.public_id,
            turn.message.id,
            turn.chain_hash,
            (uuid.uuid4(),),
            turn.leaf_at_start,
        ),
    )
    with writer_connection(engine) as conn, conn.begin():
        (recorded,) = write_batch(conn, [exchange])
    return recorded


def deep_branch(engine: sa.Engine, conversation_id: int, depth: int) -> list[dict[str, Any]]:
    """One branch of ``depth`` user messages in the conversation, root first: its rows."""
    texts = [Message("user", f"turn {i} about herons") for i in range(depth)]
    now = datetime.now(UTC)
    rows_ = [
        {
            "public_id": uuid.uuid4(),
            "conversation_id": conversation_id,
            "role": "user",
            "content": m.text(),
            "payload": m.canonical_json().decode(),
            "content_hash": m.content_hash(),
            "chain_hash": chain,
            "chain_key": 0,
            "created_at": now,
        }
        for m, chain in zip(texts, chain_hashes(texts), strict=True)
    ]
    with writer_connection(engine) as conn, conn.begin():
        assign_ids(conn, [(messages, rows_)])
        for parent, row in zip([None, *rows_], rows_, strict=False):
            row["parent_id"] = None if parent is None else parent["id"]
        insert_messages(conn, rows_)
    return rows_


def answer_racing(
    engine: sa.Engine, turn: Turn, delete: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record an answer to ``turn`` with ``delete`` run while the exchange writer is
    between its check that the message answered still exists and its insert of the
    answer: a delete committed there failed the writer's batch on a foreign key (on
    PostgreSQL; SQLite's write lock already kept them apart)."""
    checked = threading.Event()
    real = lookups.unanswerable

    def slow_check(conn: sa.Connection, batch: Any) -> set[int]:
        found = real(conn, batch)
        checked.set()
        time.sleep(0.5)  # the delete comes now
        return found

    monkeypatch.setattr(lookups, "unanswerable", slow_check)
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(answer, engine, turn, "stored just in time")
        assert checked.wait(10)
        delete()
        writing.result(timeout=30)  # no foreign-key error


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


def test_create_get_update_delete(store: Conversations) -> None:
    created = new(store, title="Plans", system_prompt="Be brief.")
    assert (created.title, created.default_model, created.source) == ("Plans", "up/gpt", "chat")
    assert not created.archived and not created.pinned and created.is_active
    got = store.get(ALICE, created.public_id)
    assert got is not None and got.message_count == 0 and got.last_message_at is None

    updated = store.update(
        ALICE, created.public_id, {"title": "Trips", "pinned": True, "system_prompt": None}
    )
    assert updated is not None
    assert (updated.title, updated.pinned, updated.system_prompt) == ("Trips", True, None)
    # Settings do not count as activity: the sidebar order stays.
    assert updated.updated_at == created.updated_at
    with pytest.raises(InvalidRequest, match="unknown field"):
        store.update(ALICE, created.public_id, {"owner": 2})

    assert store.delete(ALICE, created.public_id) == set()  # no attachments, no blobs
    assert store.get(ALICE, created.public_id) is None
    assert store.delete(ALICE, created.public_id) is None


def test_another_users_conversation_reads_as_missing(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    mine = new(store, ALICE)
    turn = say(store, mine, "hello")
    answer(migrated_engine, turn, "hi")
    pid = mine.public_id
    assert store.get(BOB, pid) is None
    assert store.load(BOB, pid) is None
    assert store.update(BOB, pid, {"title": "stolen"}) is None
    assert store.add_user_message(BOB, pid, Message("user", "x"), user_id=2, api_key_id=20) is None
    assert store.answer_again(BOB, pid, turn.message.public_id) is None
    assert store.delete(BOB, pid) is None
    assert store.list_page(BOB).items == []
    # Nothing Bob tried changed anything.
    tree = store.load(ALICE, pid)
    assert tree is not None and tree.conversation.title is None and len(tree.messages) == 2
    # An admin may open it, but it is not in the admin's own sidebar.
    assert store.get(ADMIN, pid) is not None
    assert store.list_page(ADMIN).items == []
    # The local admin's sidebar holds the conversations without an owner.
    local = new(store, LOCAL)
    assert [c.public_id for c in store.list_page(LOCAL).items] == [local.public_id]
    assert [c.public_id for c in store.list_page(ALICE).items] == [pid]


def test_pages_follow_newest_activity_without_gaps_or_duplicates(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    made = [new(store, title=f"c{i}") for i in range(23)]
    base = datetime(2026, 1, 1, tzinfo=UTC)
    # Several share one activity time: the tie-break must still give a total order.
    times = {c.id: base + timedelta(minutes=i // 3) for i, c in enumerate(made)}
    with migrated_engine.begin() as conn:
        for conv_id, moment in times.items():
            conn.execute(
                sa.update(conversations)
                .where(conversations.c.id == conv_id)
                .values(updated_at=moment)
            )
    store.update(ALICE, made[0].public_id, {"pinned": True})
    store.update(ALICE, made[5].public_id, {"pinned": True})

    seen: list[Any] = []
    cursor = None
    while True:
        page = store.list_page(ALICE, limit=5, cursor=cursor)
        seen.extend(page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        if len(seen) == 10:
            # Activity elsewhere between two pages: a new conversation goes to the top,
            # never into the pages still to come.
            new(store, title="late")
    ids = [c.public_id for c in seen]
    assert len(ids) == len(set(ids)) == 23
    assert ids[:2] == [made[5].public_id, made[0].public_id]  # pinned first
    rest = [c for c in seen if not c.pinned]
    keys = [(c.updated_at, c.public_id) for c in rest]
    assert keys == sorted(keys, reverse=True)
    assert all(c.updated_at == times[c.id] for c in seen)

    with pytest.raises(InvalidRequest, match="cursor"):
        store.list_page(ALICE, cursor="not-a-cursor")


def test_filters_archived_pinned_and_title(store: Conversations) -> None:
    plain = new(store, title="Trip to Lyon")
    archived = new(store, title="Old 100% stuff")
    pinned = new(store, title="Recipes")
    store.update(ALICE, archived.public_id, {"archived": True})
    store.update(ALICE, pinned.public_id, {"pinned": True})

    def titles(**kw: Any) -> list[str]:
        return [c.title for c in store.list_page(ALICE, **kw).items]

    assert titles() == ["Recipes", "Trip to Lyon"]
    assert titles(archived=True) == ["Old 100% stuff"]
    assert set(titles(archived=None)) == {"Recipes", "Trip to Lyon", "Old 100% stuff"}
    assert titles(pinned=True) == ["Recipes"]
    assert titles(pinned=False) == ["Trip to Lyon"]
    assert titles(q="lyon") == ["Trip to Lyon"]
    # LIKE wildcards in the query are literal text.
    assert titles(q="%", archived=None) == ["Old 100% stuff"]
    assert plain.title == "Trip to Lyon"


def test_user_messages_answers_and_branches(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    first = say(store, conv, "question 1")
    assert first.message.parent_id is None and first.path == [first.message]
    answer1 = answer(migrated_engine, first, "answer 1")
    second = say(store, conv, "question 2")  # under the active leaf: answer 1
    answer2 = answer(migrated_engine, second, "answer 2")

    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    by_id = {m.public_id: m for m in tree.messages}
    a1 = by_id[answer1.answer_public_ids[0]]
    assert [m.role for m in tree.messages] == ["user", "assistant", "user", "assistant"]
    assert [by_id[m.public_id].content for m in tree.messages] == [
        "question 1",
        "answer 1",
        "question 2",
        "answer 2",
    ]
    assert a1.parent_public_id == first.message.public_id
    assert (a1.model_used, a1.prompt_tokens, a1.completion_tokens, a1.total_tokens) == (
        "gpt-2024",
        5,
        2,
        7,
    )
    assert tree.conversation.message_count == 4
    assert tree.active_path == [m.id for m in tree.messages]
    # The chain hashes are the ones a /v1 client re-sending this history would send.
    stored = rows(migrated_engine, "SELECT chain_hash FROM messages ORDER BY id")
    history = [Message(m.role, m.content) for m in tree.messages]
    assert [r["chain_hash"] for r in stored] == chain_hashes(history)

    # Edit question 2: a new user message under answer 1 is a second branch.
    edited = say(store, conv, "question 2, edited", parent=a1.public_id)
    assert [m.content for m in edited.path] == ["question 1", "answer 1", "question 2, edited"]
    answer(migrated_engine, edited, "answer 2b")
    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    path = [m.content for m in tree.messages if m.id in tree.active_path]
    assert path == ["question 1", "answer 1", "question 2, edited", "answer 2b"]
    # The old branch is still there and selectable.
    old_leaf = answer2.answer_public_ids[0]
    store.update(ALICE, conv.public_id, {"active_leaf_id": old_leaf})
    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    path = [m.content for m in tree.messages if m.id in tree.active_path]
    assert path == ["question 1", "answer 1", "question 2", "answer 2"]
    assert len(tree.messages) == 6
    # A message of another conversation cannot be selected.
    other = say(store, new(store), "elsewhere")
    with pytest.raises(InvalidRequest, match="active_leaf_id"):
        store.update(ALICE, conv.public_id, {"active_leaf_id": other.message.public_id})
    with pytest.raises(InvalidRequest, match="parent_id"):
        say(store, conv, "x", parent=other.message.public_id)
    # A new root (parent None) starts a branch of its own.
    root = say(store, conv, "start over", parent=None)
    assert root.message.parent_id is None and root.path == [root.message]


def test_answer_again_asks_the_parent_of_an_answer(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store, system_prompt="Be brief.")
    turn = say(store, conv, "hello")
    first = answer(migrated_engine, turn, "hi")
    again = store.answer_again(ALICE, conv.public_id, first.answer_public_ids[0])
    assert again is not None
    assert again.message.public_id == turn.message.public_id
    assert again.chain_hash == turn.chain_hash and again.system_prompt == "Be brief."
    second = answer(migrated_engine, again, "hello there")
    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    siblings = [m for m in tree.messages if m.role == "assistant"]
    assert [m.parent_public_id for m in siblings] == [turn.message.public_id] * 2
    # The newest answer is the active branch.
    by_key = {m.id: m for m in tree.messages}
    assert by_key[tree.active_path[-1]].public_id == second.answer_public_ids[0]
    # A user message may be answered again too; nothing else can be.
    assert store.answer_again(ALICE, conv.public_id, turn.message.public_id) is not None
    with pytest.raises(InvalidRequest):
        store.answer_again(ALICE, conv.public_id, uuid.uuid4())


def test_an_answer_comes_into_view_only_if_the_view_did_not_move_meanwhile(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)

    def leaf() -> uuid.UUID:
        tree = store.load(ALICE, conv.public_id)
        assert tree is not None
        return {m.id: m for m in tree.messages}[tree.active_path[-1]].public_id

    first = say(store, conv, "slow question")
    # Another tab sends under it while its answer is still being made.
    second = say(store, conv, "meanwhile")
    late = answer(migrated_engine, first, "late answer")
    assert leaf() == second.message.public_id  # the other tab's message stays in view
    prompt = answer(migrated_engine, second, "answer to meanwhile")
    assert leaf() == prompt.answer_public_ids[0]
    # Regenerating an earlier answer with the view unmoved brings the new one into view.
    again = store.answer_again(ALICE, conv.public_id, late.answer_public_ids[0])
    assert again is not None
    redone = answer(migrated_engine, again, "late answer, again")
    assert leaf() == redone.answer_public_ids[0]
    # A branch chosen while a regenerate runs stays chosen.
    again = store.answer_again(ALICE, conv.public_id, prompt.answer_public_ids[0])
    assert again is not None
    chosen = store.update(ALICE, conv.public_id, {"active_leaf_id": late.answer_public_ids[0]})
    assert chosen is not None
    answer(migrated_engine, again, "not shown")
    assert leaf() == late.answer_public_ids[0]


def test_a_failed_answer_keeps_the_user_message_and_links_its_attempts(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    turn = say(store, conv, "will fail")
    recorded = answer(migrated_engine, turn, None)
    assert recorded.answer_public_ids == ()
    tree = store.load(ALICE, conv.public_id)
    assert tree is not None
    assert [m.content for m in tree.messages] == ["will fail"]
    assert tree.active_path == [turn.message.id]
    [req] = rows(migrated_engine, "SELECT conversation_id, success FROM request_log")
    assert req["conversation_id"] == conv.id and not req["success"]


def test_delete_cascades_and_keeps_the_request_log(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    conv = new(store)
    turn = say(store, conv, "hello")
    answer(migrated_engine, turn, "hi")
    with migrated_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO users (public_id, email, username, password_hash, role, is_active,"
                " preferences, created_at, updated_at) VALUES (:p, 'a@x.io', 'alice', 'h',"
                " 'user', :t, '{}', :n, :n)"
            ),
            {"p": uuid.uuid4().hex, "t": True, "n": datetime.now(UTC)},
        )
        user_id = conn.execute(sa.text("SELECT id FROM users")).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO attachments (public_id, user_id, conversation_id, message_id,"
                " filename, mime_type, size, sha256, created_at) VALUES (:p, :u, :c, :m,"
                " 'a.txt', 'text/plain', 1, 'ab', :n)"
            ),
            {
                "p": uuid.uuid4().hex,
                "u": user_id,
                "c": conv.id,
                "m": turn.message.id,
                "n": datetime.now(UTC),
            },
        )
    # The blobs its attachments named, for the caller to sweep after the commit.
    assert store.delete(ALICE, conv.public_id) == {"ab"}
    for table in ("messages", "responses", "attachments", "conversations"):
        assert rows(migrated_engine, f"SELECT * FROM {table}") == [], table
    [req] = rows(migrated_engine, "SELECT conversation_id, success FROM request_log")
    assert req["conversation_id"] is None and req["success"]


def test_a_delete_names_the_blob_of_an_upload_committed_while_it_waited(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """An upload into the conversation, in its transaction when the delete begins: the
    delete waits for it, and the hashes it hands back for sweeping include its blob (on
    PostgreSQL they were read before the upload committed: its file stayed on disk)."""
    conv = new(store, LOCAL)
    upload = writer_connection(migrated_engine)
    transaction = upload.begin()
    try:
        files.insert_attachment(
            upload,
            user_id=None,
            conversation=files.ConversationRef(conv.id, conv.public_id, None),
            filename="late.txt",
            mime_type="text/plain",
            size=4,
            sha256="cd" * 32,
        )
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(store.delete, LOCAL, conv.public_id)
            time.sleep(0.5)  # the delete is waiting for the upload's transaction
            assert not deleting.done()
            transaction.commit()
            assert deleting.result(timeout=30) == {"cd" * 32}
    finally:
        if transaction.is_active:
            transaction.rollback()
        upload.close()
    assert rows(migrated_engine, "SELECT * FROM attachments") == []


def test_a_branch_over_a_thousand_messages_deep_is_deleted(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    """A long chat (or an agent's /v1 session) is one deep branch. On SQLite the
    ``parent_id`` cascade ran as nested triggers, one level per message: 13 s for 800
    messages with the write lock held, and past 1,000 a 500 ("too many levels of trigger
    recursion"), so the conversation could never be deleted."""
    conv = new(store, LOCAL)
    depth = 1100
    deep_branch(migrated_engine, conv.id, depth)
    tree = store.load(LOCAL, conv.public_id)
    assert tree is not None and len(tree.active_path) == depth
    assert store.delete(LOCAL, conv.public_id) == set()
    assert rows(migrated_engine, "SELECT id FROM messages") == []


def test_a_delete_while_the_writer_stores_an_answer_in_it_waits_for_the_writer(
    store: Conversations, migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the answer's exchange failed alone, its request-log rows lost with it."""
    conv = new(store)
    turn = say(store, conv, "answer me")
    answer_racing(migrated_engine, turn, lambda: store.delete(ALICE, conv.public_id), monkeypatch)
    # The delete went after the writer: the answer went with the conversation, its
    # request row stays, unlinked.
    assert rows(migrated_engine, "SELECT id FROM messages") == []
    [logged] = rows(migrated_engine, "SELECT conversation_id, success FROM request_log")
    assert logged["conversation_id"] is None and logged["success"]


def test_generated_title_never_replaces_one_set_meanwhile(store: Conversations) -> None:
    untitled = new(store)
    first = say(store, untitled, "made from this").message.id
    assert store.set_generated_title(untitled.id, "Made up", first)
    assert not store.set_generated_title(untitled.id, "Made up again", first)
    titled = new(store)
    store.update(ALICE, titled.public_id, {"title": "Mine"})
    assert not store.set_generated_title(titled.id, "Made up", say(store, titled, "x").message.id)
    got = store.get(ALICE, titled.public_id)
    assert got is not None and got.title == "Mine"


def test_a_title_made_from_a_message_deleted_meanwhile_is_not_stored(
    store: Conversations,
) -> None:
    conv = new(store)
    first = say(store, conv, "pasted by mistake").message
    assert store.delete_message(ALICE, conv.public_id, first.public_id) == set()
    # The title task finishes after the delete: the deleted text must not come back.
    assert not store.set_generated_title(conv.id, "Pasted by mistake", first.id)
    got = store.get(ALICE, conv.public_id)
    assert got is not None and got.title is None


def test_v1_conversations_are_listed_as_api(
    store: Conversations, migrated_engine: sa.Engine
) -> None:
    now = datetime.now(UTC)
    exchange = Exchange(
        model_requested="up/gpt",
        messages=(Message("user", "from the SDK"),),
        started_at=now,
        user_id=ALICE.user_id,
        api_key_id=ALICE.api_key_id,
        attempts=[Attempt(1, "up", "gpt", now, success=True, status_code=200)],
        choices=[Choice(0, "ok", finish_reason="stop")],
    )
    with writer_connection(migrated_engine) as conn, conn.begin():
        write_batch(conn, [exchange])
    new(store, title="chat one")
    listed = store.list_page(ALICE).items
    assert [(c.source, c.message_count) for c in listed] == [("chat", 0), ("api", 2)]
    assert listed[1].last_message_at is not None
    # A chat continues a /v1 conversation like any other: under its newest message.
    turn = say(store, listed[1], "and from the chat")
    assert [m.content for m in turn.path] == ["from the SDK", "ok", "and from the chat"]
