"""Hybrid search (the API's default) when the embedder fails, on SQLite and PostgreSQL: the
words still answer, with a notice saying why; semantic mode is the error itself."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.errors import SearchUnavailable, UpstreamConnectError
from parley.search.hybrid import SemanticSearch
from parley.search.vector_rows import MessageVector
from parley.search.vectors import VectorStore
from parley.settings import Settings
from parley.store.conversations import Conversations
from parley.store.search import Scope
from tests.store.test_conversations import ALICE, new, say

A = Scope(ALICE.user_id)


class _Unreachable:
    """A remote embedder whose provider does not answer."""

    model = "remote/up/embed-8"
    dimension: int | None = 8

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise UpstreamConnectError("no answer from upstream up: connection refused")

    async def embed_query(self, text: str) -> list[float]:
        raise UpstreamConnectError("no answer from upstream up: connection refused")


async def test_hybrid_answers_by_words_when_the_embedder_fails(
    migrated_engine: sa.Engine, settings: Settings
) -> None:
    store = Conversations(migrated_engine)
    say(store, new(store), "the tomato blight is spreading")
    search = SemanticSearch(migrated_engine, VectorStore.open(settings.vector_uri), _Unreachable())
    found = await search.search("tomato", A)
    assert found.mode == "keyword"
    assert [hit.role for hit in found.hits] == ["user"]
    assert found.notice is not None
    assert "semantic search failed" in found.notice and "connection refused" in found.notice
    with pytest.raises(UpstreamConnectError):
        await search.search("tomato", A, mode="semantic")


class _Constant:
    """An embedder that answers: every text is the same vector."""

    model = "test/constant-4"
    dimension: int | None = 4

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0, 0.0] for _ in texts]

    async def embed_query(self, text: str) -> list[float]:
        return [1.0, 0.0, 0.0, 0.0]


async def test_hybrid_answers_by_words_when_the_vector_store_is_damaged(
    migrated_engine: sa.Engine, settings: Settings
) -> None:
    """A store with a file missing (a restore of a broken copy, a disk error) fails in
    LanceDB's own words: hybrid falls back to words, semantic mode is a clear 503."""
    store = Conversations(migrated_engine)
    say(store, new(store), "the tomato blight is spreading")
    vectors = VectorStore.open(settings.vector_uri)
    vectors.prepare(_Constant.model, 4)
    now = datetime.now(UTC)
    rows = [
        MessageVector(i, ALICE.user_id, 1, "user", f"m{i}", now, "{}", [1, 0, 0, 0]) for i in (7, 8)
    ]
    vectors.upsert_messages(_Constant.model, rows)
    vectors.delete_messages([7])
    _remove_deletions(Path(settings.vector_uri))
    search = SemanticSearch(migrated_engine, VectorStore.open(settings.vector_uri), _Constant())
    found = await search.search("tomato", A)
    assert found.mode == "keyword" and [hit.role for hit in found.hits] == ["user"]
    assert found.notice is not None and "could not be read" in found.notice
    with pytest.raises(SearchUnavailable, match="parley reindex --full"):
        await search.search("tomato", A, mode="semantic")


def _remove_deletions(store: Path) -> None:
    for path in store.glob("messages.lance/_deletions/*"):
        path.unlink()
