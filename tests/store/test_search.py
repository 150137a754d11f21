"""Keyword search on SQLite and PostgreSQL: exact words found and ranked, snippets, scope,
the index kept in the writer's transaction, deletes, and user text that looks like syntax."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.domain.messages import Message
from parley.errors import InvalidRequest
from parley.ops import migrate
from parley.server.identity import LOCAL
from parley.settings import Settings
from parley.store.conversations import Conversations
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from parley.store.search import MARK_END, MARK_START, Hit, Scope, Search
from parley.store.search import search as search_on
from parley.store.transfer import conversation_ids_of, import_trees, read_trees
from tests.store.test_conversations import ALICE, BOB, new, say
from tests.store.test_exchanges import chat

A = Scope(ALICE.user_id)
B = Scope(BOB.user_id)


@pytest.fixture
def search(migrated_engine: sa.Engine) -> Search:
    return Search(migrated_engine)


@pytest.fixture
def store(migrated_engine: sa.Engine) -> Conversations:
    return Conversations(migrated_engine)


def test_exact_words_are_found_and_ranked(store: Conversations, search: Search) -> None:
    conv = new(store, title="Gardening notes")
    say(store, conv, "tomato blight on the leaves, tomato plants wilting; tomato again")
    say(store, conv, "one tomato and many other words about cucumbers and peppers here")
    say(store, conv, "nothing relevant at all")
    hits = search.keyword("tomato", A)
    assert [h.kind for h in hits] == ["message", "message"]
    assert "tomato blight" in hits[0].snippet.replace(MARK_START, "").replace(MARK_END, "")
    assert hits[0].score > hits[1].score
    assert hits[0].conversation_id == conv.public_id
    assert hits[0].conversation_title == "Gardening notes"
    assert hits[0].role == "user" and hits[0].message_id is not None
    # Every word must match; case does not matter.
    assert len(search.keyword("TOMATO cucumbers", A)) == 1
    assert search.keyword("tomato zucchini", A) == []


def test_snippets_mark_the_matched_word(store: Conversations, search: Search) -> None:
    conv = new(store)
    filler = " ".join(f"word{i}" for i in range(200))
    say(store, conv, f"{filler} the kraken surfaced {filler}")
    [hit] = search.keyword("kraken", A)
    assert f"{MARK_START}kraken{MARK_END}" in hit.snippet
    assert len(hit.snippet) < 400  # a window around the match, not the whole message


def test_titles_are_searched(store: Conversations, search: Search) -> None:
    conv = new(store, title="Quarterly zeppelin budget")
    hits = search.keyword("zeppelin", A)
    assert [(h.kind, h.conversation_id, h.message_id) for h in hits] == [
        ("title", conv.public_id, None)
    ]
    assert f"{MARK_START}zeppelin{MARK_END}" in hits[0].snippet
    store.update(ALICE, conv.public_id, {"title": "renamed"})
    assert search.keyword("zeppelin", A) == []
    assert len(search.keyword("renamed", A)) == 1


def test_an_untitled_conversation_is_found_by_the_title_it_gets_later(
    store: Conversations, search: Search
) -> None:
    conv = new(store)  # untitled: no full-text entry yet (store.history_rows)
    store.update(ALICE, conv.public_id, {"title": "Heron migration"})
    assert [h.kind for h in search.keyword("heron", A)] == ["title"]
    store.update(ALICE, conv.public_id, {"title": None})
    assert search.keyword("heron", A) == []
    store.delete(ALICE, conv.public_id)


def test_scope_is_the_callers_own_unless_everyone(store: Conversations, search: Search) -> None:
    mine = new(store, ALICE)
    say(store, mine, "canary-7f3e private phrase", ALICE)
    theirs = new(store, BOB, title="canary-7f3e")
    say(store, theirs, "canary-7f3e other phrase", BOB)
    assert {h.conversation_id for h in search.keyword("canary-7f3e", A)} == {mine.public_id}
    assert {h.conversation_id for h in search.keyword("canary-7f3e", B)} == {theirs.public_id}
    assert search.keyword("canary-7f3e", Scope(None)) == []
    everyone = search.keyword("canary-7f3e", Scope(None, everyone=True))
    assert {h.conversation_id for h in everyone} == {mine.public_id, theirs.public_id}
    # A conversation filter narrows the scope, never widens it.
    assert search.keyword("canary-7f3e", B, conversation=mine.public_id) == []
    only = search.keyword("canary-7f3e", Scope(None, True), conversation=mine.public_id)
    assert {h.conversation_id for h in only} == {mine.public_id}


def test_local_admin_searches_the_rows_without_owner(store: Conversations, search: Search) -> None:
    conv = new(store, LOCAL)
    say(store, conv, "local heliotrope", LOCAL)
    assert len(search.keyword("heliotrope", Scope(None))) == 1
    assert search.keyword("heliotrope", A) == []


def test_a_written_exchange_is_searchable_right_after_commit(
    migrated_engine: sa.Engine, search: Search
) -> None:
    exchange = chat(
        [Message("user", "what is a quokka")],
        answers=("A quokka is a small marsupial",),
        user_id=ALICE.user_id,
    )
    with writer_connection(migrated_engine) as conn, conn.begin():
        [recorded] = write_batch(conn, [exchange])
        # Same transaction: the index already holds the rows before the commit.
        assert {h.role for h in _in(conn, "marsupial")} == {"assistant"}
    hits = search.keyword("quokka", A)
    assert {h.role for h in hits} == {"user", "assistant"}
    [answer] = [h for h in hits if h.role == "assistant"]
    assert answer.message_id in recorded.answer_public_ids
    assert hits[0].conversation_id == recorded.conversation_public_id


def test_every_way_in_indexes_and_queues_each_message_once(
    migrated_engine: sa.Engine, store: Conversations, search: Search
) -> None:
    # The three ways rows enter (store.history_rows): the chat repository, the exchange
    # writer, an import. On SQLite these write the entries themselves (migration 0006).
    conv = new(store, title="wombat diary")
    say(store, conv, "a wombat digs")
    exchange = chat(
        [Message("user", "wombat burrows")], answers=("the wombat sleeps",), user_id=ALICE.user_id
    )
    with writer_connection(migrated_engine) as conn, conn.begin():
        write_batch(conn, [exchange])
    with writer_connection(migrated_engine) as conn, conn.begin():
        import_trees(conn, read_trees(conn, conversation_ids_of(conn, ALICE.user_id)), None)
    with migrated_engine.connect() as conn:
        ids = sorted(conn.exec_driver_sql("SELECT id FROM messages").scalars())
        queued = conn.exec_driver_sql(
            "SELECT item_id, op FROM search_outbox WHERE kind = 'message' ORDER BY item_id"
        ).all()
    assert len(ids) == 2 * 3
    assert [tuple(row) for row in queued] == [(i, "upsert") for i in ids]
    for scope in (A, Scope(None)):
        hits = search.keyword("wombat", scope)
        assert sorted(h.kind for h in hits) == ["message"] * 3 + ["title"]


def test_a_row_inserted_past_the_store_is_deleted_without_harm(
    settings: Settings, migrated_engine: sa.Engine, store: Conversations, search: Search
) -> None:
    # By hand, as an operator's script might: no search entries (SQLite, since 0006).
    now = "2026-11-23 00:00:00"
    p = uuid.uuid4().hex if settings.is_sqlite else uuid.uuid4()
    with migrated_engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO conversations (id, public_id, created_at, updated_at, source,"
                " title, archived, pinned, is_active) VALUES (900, :p, :t, :t, 'chat',"
                " 'manual narwhal', false, false, true)"
            ),
            {"p": p, "t": now},
        )
    kept = new(store, title="narwhal log")
    say(store, kept, "narwhal tusks")
    with migrated_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM conversations WHERE id = 900"))
    # The index is intact: the other rows are still found, and can still be deleted.
    assert sorted(h.kind for h in search.keyword("narwhal", A)) == ["message", "title"]
    store.delete(ALICE, kept.public_id)
    assert search.keyword("narwhal", A) == []
    if settings.is_sqlite:
        with migrated_engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO conversations_fts(conversations_fts) VALUES ('integrity-check')"
            )


def _in(conn: sa.Connection, word: str) -> list[Hit]:
    return search_on(conn, [word], A)


def test_deleting_a_conversation_removes_it_from_results(
    store: Conversations, search: Search
) -> None:
    conv = new(store, title="ephemeral axolotl")
    say(store, conv, "axolotl facts")
    assert len(search.keyword("axolotl", A)) == 2
    store.delete(ALICE, conv.public_id)
    assert search.keyword("axolotl", A) == []


@pytest.mark.parametrize(
    "query",
    [
        '"tapir',
        "tapir*",
        "NEAR(tapir mole)",
        "tapir AND",
        "OR tapir",
        "tapir -mole",
        "^tapir",
        "tapir:",
    ],
)
def test_search_syntax_is_text(store: Conversations, search: Search, query: str) -> None:
    conv = new(store)
    say(store, conv, "tapir and mole or near")
    say(store, conv, "a tapirs herd")  # no prefix matching: "tapir*" is the word tapir
    hits = search.keyword(query, A)
    assert [h.kind for h in hits] == ["message"]


def test_punctuation_only_matches_nothing(store: Conversations, search: Search) -> None:
    say(store, new(store), 'stars * and quotes " here')
    assert search.keyword('*** "" :', A) == []


@pytest.mark.parametrize("query", ["", "   ", "x" * 1001, "word " * 20_000])
def test_empty_and_oversized_queries_are_refused(search: Search, query: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        search.keyword(query, A)
    assert caught.value.param == "q"


def test_rows_from_before_the_migration_are_indexed(settings: Settings, tmp_path: Path) -> None:
    migrate.upgrade(settings, "0003")
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO conversations (id, public_id, created_at, updated_at, source,"
                    " title, user_id, archived, pinned, is_active) VALUES (1, :p, :t, :t, 'chat',"
                    " 'old ocelot', 1, false, false, true)"
                ),
                {"p": uuid.uuid4().hex if settings.is_sqlite else uuid.uuid4(), "t": "2026-01-01"},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO messages (id, public_id, conversation_id, role, content,"
                    " payload, content_hash, chain_hash, chain_key, created_at, user_id)"
                    " VALUES (1, :p, 1, 'user', 'an ocelot from the past', '{}', 'h', 'c', 7,"
                    " :t, 1)"
                ),
                {"p": uuid.uuid4().hex if settings.is_sqlite else uuid.uuid4(), "t": "2026-01-01"},
            )
        migrate.upgrade(settings)
        assert sorted(h.kind for h in Search(engine).keyword("ocelot", A)) == ["message", "title"]
    finally:
        engine.dispose()
