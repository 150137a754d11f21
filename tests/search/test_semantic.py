"""Semantic and hybrid search with the real local model, on SQLite and PostgreSQL: a
paraphrase found without shared words, exact terms by keyword, fusion ranking, isolation
between users, deletes reaching the vectors, reconcile, a model change, bad input, and
life without an embedder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parley.errors import InvalidRequest, SearchUnavailable
from parley.ops.maintenance import run_maintenance
from parley.search.embedders import LocalEmbedder
from parley.search.hybrid import SemanticSearch
from parley.search.indexer import Indexer
from parley.search.vector_rows import MessageVector
from parley.search.vectors import VectorStore
from parley.settings import Settings
from parley.store import outbox
from parley.store.conversations import Conversations
from parley.store.search import Scope
from tests.store.test_conversations import ALICE, BOB, new, say

A = Scope(ALICE.user_id)
B = Scope(BOB.user_id)


@dataclass
class World:
    engine: sa.Engine
    store: Conversations
    vectors: VectorStore
    indexer: Indexer
    search: SemanticSearch

    async def index(self) -> int:
        return await self.indexer.run_once()


@pytest.fixture
def world(
    migrated_engine: sa.Engine, settings: Settings, local_embedder: LocalEmbedder
) -> Iterator[World]:
    vectors = VectorStore.open(settings.vector_uri)
    indexer = Indexer(migrated_engine, vectors, local_embedder)
    yield World(
        migrated_engine,
        Conversations(migrated_engine),
        vectors,
        indexer,
        SemanticSearch(migrated_engine, vectors, local_embedder),
    )


def _texts(hits: list[Any]) -> list[str]:
    return [hit.snippet for hit in hits]


def _which(hit: Any, *texts: str) -> str:
    """The one of ``texts`` a hit's snippet (marks and ellipses removed) was cut from."""
    plain = hit.snippet.replace("\ue000", "").replace("\ue001", "").replace("…", "").strip()
    [text] = [text for text in texts if plain and plain in text]
    return text


async def test_semantic_search_finds_a_paraphrase_that_shares_no_words(world: World) -> None:
    conv = new(world.store)
    say(world.store, conv, "My cat keeps scratching the sofa")
    say(world.store, conv, "The stock market fell sharply on Tuesday")
    say(world.store, conv, "Recipe for a quick tomato pasta sauce")
    assert await world.index() == 3
    query = "feline damaging furniture"
    found = await world.search.search(query, A, mode="semantic")
    assert found.mode == "semantic"
    assert found.hits[0].snippet == "My cat keeps scratching the sofa"
    assert found.hits[0].conversation_id == conv.public_id
    assert found.hits[0].message_id is not None and found.hits[0].role == "user"
    assert found.hits[0].score > found.hits[1].score
    # No word in common: keyword search has nothing.
    assert (await world.search.search(query, A, mode="keyword")).hits == []


async def test_keyword_finds_exact_terms_and_hybrid_ranks_both_first(world: World) -> None:
    conv = new(world.store)
    both = "We finally secured the funding for the airship"
    words_only = (
        "Shopping list: eggs, milk, bread, an airship model kit for Sam; "
        "funding for the school trip is due on Friday"
    )
    meaning_only = "The dirigible project received money from investors"
    for text in (words_only, both, meaning_only, "Error XK4471 in the billing service"):
        say(world.store, conv, text)
    await world.index()
    exact = await world.search.search("xk4471", A, mode="keyword")
    assert _texts(exact.hits) == ["Error \ue000XK4471\ue001 in the billing service"]
    texts = (both, words_only, meaning_only)
    keyword = await world.search.search("airship funding", A, mode="keyword")
    assert {_which(h, *texts) for h in keyword.hits} == {both, words_only}
    hybrid = await world.search.search("airship funding", A)
    assert hybrid.mode == "hybrid"
    plain = [_which(h, *texts, "Error XK4471 in the billing service") for h in hybrid.hits]
    assert plain[0] == both
    assert meaning_only in plain  # found by meaning alone
    assert hybrid.hits[0].score > hybrid.hits[1].score


async def test_another_users_canary_is_never_found(world: World) -> None:
    alices = new(world.store, ALICE, title="moon base")
    say(world.store, alices, "canary zq-falcon-7731: the secret plans for the moon base", ALICE)
    bobs = new(world.store, BOB)
    say(world.store, bobs, "Bob's notes about gardening and tomatoes", BOB)
    await world.index()
    for mode in ("keyword", "semantic", "hybrid"):
        for query in ("zq-falcon-7731", "secret plans for the moon base"):
            hits = (await world.search.search(query, B, mode=mode)).hits
            assert alices.public_id not in {h.conversation_id for h in hits}, (mode, query)
            # Alice herself finds it: the canary is really there.
            mine = (await world.search.search(query, A, mode=mode)).hits
            assert alices.public_id in {h.conversation_id for h in mine}, (mode, query)
    # Inside the vector query: Bob's nearest neighbours are only ever Bob's, however many.
    vector = await world.indexer.embedder.embed_query("moon base")  # type: ignore[union-attr]
    near = world.vectors.search_messages(
        vector, model=world.vectors.model or "", user_id=BOB.user_id, limit=50
    )
    assert [hit.conversation_id for hit in near] and all(
        hit.text.startswith("Bob's") for hit in near
    )
    # A conversation filter naming Alice's conversation gives Bob nothing.
    for mode in ("semantic", "hybrid"):
        shown = await world.search.search("moon", B, mode=mode, conversation=alices.public_id)
        assert shown.hits == []


async def test_deleting_a_conversation_removes_its_vectors(world: World) -> None:
    conv = new(world.store)
    say(world.store, conv, "a message about lighthouses")
    keep = new(world.store)
    say(world.store, keep, "a message about harbours")
    await world.index()
    assert len(world.vectors.message_ids()) == 2
    assert world.store.delete(ALICE, conv.public_id) is not None
    await world.index()
    with world.engine.connect() as conn:
        assert world.vectors.message_ids() == outbox.message_ids(conn)
        assert outbox.size(conn) == 0
    assert len(world.vectors.message_ids()) == 1
    hits = (await world.search.search("lighthouses", A, mode="semantic")).hits
    assert {h.conversation_id for h in hits} == {keep.public_id}


async def test_without_an_embedder_the_drain_deletes_only_the_vectors_of_what_is_gone(
    world: World,
) -> None:
    gone, kept = new(world.store), new(world.store)
    say(world.store, gone, "a message about lighthouses")
    say(world.store, kept, "a message about harbours")
    await world.index()
    assert len(world.vectors.message_ids()) == 2
    assert world.store.delete(ALICE, gone.public_id) is not None
    with world.engine.begin() as conn:
        kept_ids = outbox.message_ids(conn)
        outbox.queue(conn, outbox.MESSAGE, kept_ids)  # queued again, and still there
    assert len(kept_ids) == 1
    idle = Indexer(world.engine, world.vectors, None)
    assert await idle.run_once() == 2
    assert world.vectors.message_ids() == kept_ids
    with world.engine.connect() as conn:
        assert outbox.size(conn) == 0


async def test_reconcile_fixes_rows_without_vectors_and_vectors_without_rows(
    world: World, local_embedder: LocalEmbedder
) -> None:
    conv = new(world.store)
    for text in ("first", "second", "third"):
        say(world.store, conv, f"the {text} message")
    await world.index()
    ids = sorted(world.vectors.message_ids())
    # A vector lost (a restore of an older vector store) and one whose row is long gone.
    world.vectors.delete_messages([ids[0]])
    orphan = MessageVector(
        10_000_000, ALICE.user_id, 1, "user", "gone", datetime.now(UTC), "{}", [0.1] * 384
    )
    world.vectors.upsert_messages(local_embedder.model, [orphan])
    done = await world.indexer.reconcile()
    assert (done.messages_queued, done.messages_deleted) == (1, 1)
    await world.index()
    with world.engine.connect() as conn:
        assert world.vectors.message_ids() == outbox.message_ids(conn) == set(ids)
    again = await world.indexer.reconcile()
    assert again.messages_queued == again.messages_deleted == 0


async def test_a_new_model_empties_the_store_and_everything_is_embedded_again(
    world: World,
) -> None:
    conv = new(world.store)
    say(world.store, conv, "a message to embed twice")
    await world.index()
    model = world.vectors.model
    assert model == "local/all-MiniLM-L6-v2" and world.vectors.dimension == 384
    # Another model's vectors never mix with these: preparing for it empties the store.
    assert world.vectors.prepare("remote/other-model", 384)
    assert world.vectors.message_ids() == set()
    with pytest.raises(SearchUnavailable, match="rebuilt"):
        await world.search.search("embed", A, mode="semantic")
    # The indexer prepares the store for its own model again and reconcile refills it.
    assert await world.indexer.prepare()
    assert (await world.indexer.reconcile()).messages_queued == 1
    await world.index()
    assert len(world.vectors.message_ids()) == 1
    reopened = VectorStore.open(world.vectors.uri)
    assert reopened._db is None  # opening reads nothing: the model is read on first use
    assert (reopened.model, reopened.dimension) == (model, 384)


@pytest.mark.parametrize("mode", ["keyword", "semantic", "hybrid"])
async def test_bad_queries_are_refused_clearly(world: World, mode: str) -> None:
    with pytest.raises(InvalidRequest, match="must not be empty"):
        await world.search.search("   ", A, mode=mode)
    with pytest.raises(InvalidRequest, match="102400 characters long; the limit is 1000"):
        await world.search.search("x" * 102_400, A, mode=mode)
    with pytest.raises(InvalidRequest, match="unknown search mode"):
        await world.search.search("x", A, mode="fuzzy")


async def test_without_an_embedder_hybrid_is_keyword_and_the_outbox_drains(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    store = Conversations(migrated_engine)
    vectors = VectorStore.open(str(tmp_path / "vectors"))
    indexer = Indexer(migrated_engine, vectors, None)
    search = SemanticSearch(migrated_engine, vectors, None)
    conv = new(store)
    say(store, conv, "plain keyword search still works")
    with pytest.raises(SearchUnavailable, match="no embedder"):
        await search.search("keyword", A, mode="semantic")
    hybrid = await search.search("keyword", A)
    assert hybrid.mode == "keyword" and hybrid.notice and len(hybrid.hits) == 1
    assert await indexer.run_once() == 1
    with migrated_engine.connect() as conn:
        assert outbox.size(conn) == 0
    # Nothing here needed the vector store: it was never connected, nor created on disk.
    assert vectors.message_ids() == set() and vectors.count("chunks") == 0
    assert vectors._db is None and not (tmp_path / "vectors").exists()


async def test_maintenance_compacts_the_store_and_reports_orphan_vectors(
    world: World, settings: Settings, local_embedder: LocalEmbedder
) -> None:
    conv = new(world.store)
    say(world.store, conv, "a message for the maintenance run")
    await world.index()
    orphan = MessageVector(
        10_000_000, ALICE.user_id, 1, "user", "gone", datetime.now(UTC), "{}", [0.1] * 384
    )
    world.vectors.upsert_messages(local_embedder.model, [orphan])
    report = run_maintenance(settings, vacuum=False)
    [step] = [step for step in report.steps if step.name == "vector store"]
    assert step.status == "done" and "messages: 2 vectors compacted" in step.detail
    [check] = [check for check in report.checks if check.name == "vectors without rows"]
    assert not check.ok and check.items == ("message 10000000",)
