"""Hybrid search (the API's default) when the embedder fails, on SQLite and PostgreSQL: the
words still answer, with a notice saying why; semantic mode is the error itself."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from parley.errors import UpstreamConnectError
from parley.search.hybrid import SemanticSearch
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
