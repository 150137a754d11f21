"""Semantic and hybrid search over a user's messages (keyword search is ``store.search``).

- **semantic**: the query is embedded with the configured embedder and the nearest
  message vectors are asked of the vector store, with the owner (and conversation) filter
  inside the vector query; the hits are then read back from the database, which drops a
  vector whose row is already gone and checks the owner once more;
- **hybrid** (the API's default): reciprocal rank fusion of the keyword and the semantic
  lists, ``score = sum(1 / (RRF_K + rank))`` over the lists an item appears in (rank from
  1). A message found by both ranks above one found by either alone at the same ranks.
  Without an embedder hybrid is keyword search, and says so (``mode`` "keyword"); so it
  is when the embedder fails (a remote one unreachable, the index being rebuilt) or the
  vector store cannot be used (``VectorStoreUnusable``: files damaged or missing...): the
  words still answer, with a ``notice`` saying why, where ``semantic`` mode is the error.
  That error names the store's location, for the operator (``parley search``); a client
  of the API is told ``public_reason``.

The query rules are keyword search's (``store.search.words``): an empty or over-long query
is a 400 whatever the mode.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace

import sqlalchemy

from parley.errors import InvalidRequest, ParleyError, SearchUnavailable, VectorStoreUnusable
from parley.search.embedders import Embedder
from parley.search.vectors import ModelMismatch, VectorStore
from parley.store import outbox
from parley.store.search import MAX_LIMIT, Hit, Scope, Search, words

RRF_K = 60
# Characters of a message shown as the snippet of a semantic hit (no words to mark).
SNIPPET_CHARS = 240
# Each list hybrid fuses holds this many candidates (at least ``limit``).
CANDIDATES = 50

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Results:
    hits: list[Hit]
    # The mode that answered: "keyword" when hybrid had no embedder to use.
    mode: str
    notice: str | None = None


class SemanticSearch:
    def __init__(
        self, engine: sqlalchemy.Engine, vectors: VectorStore | None, embedder: Embedder | None
    ) -> None:
        self.engine = engine
        self.vectors = vectors
        self.embedder = embedder

    @property
    def available(self) -> bool:
        return self.embedder is not None and self.vectors is not None

    async def search(
        self,
        query: str,
        scope: Scope,
        *,
        mode: str = "hybrid",
        conversation: uuid.UUID | None = None,
        limit: int = 20,
    ) -> Results:
        words(query)  # the same 400s in every mode
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"'limit' must be between 1 and {MAX_LIMIT}", "limit")
        keyword = Search(self.engine)
        if mode == "keyword":
            hits = await asyncio.to_thread(
                keyword.keyword, query, scope, conversation=conversation, limit=limit
            )
            return Results(hits, "keyword")
        if mode == "semantic":
            return Results(await self.semantic(query, scope, conversation, limit), "semantic")
        if mode != "hybrid":
            raise InvalidRequest(
                f"unknown search mode '{mode}'; expected keyword, semantic or hybrid", "mode"
            )
        size = max(limit, CANDIDATES)
        by_words = await asyncio.to_thread(
            keyword.keyword, query, scope, conversation=conversation, limit=min(size, MAX_LIMIT)
        )
        if not self.available:
            notice = "semantic search is not available (no embedder): keyword results only"
            return Results(by_words[:limit], "keyword", notice)
        try:
            by_meaning = await self.semantic(query, scope, conversation, min(size, MAX_LIMIT))
        except ParleyError as exc:
            # The query was checked above: whatever fails here is the embedder's or the
            # vector store's, and the words can still answer. Said to the caller
            # (``notice``, without the store's location); logged with it.
            level = logging.WARNING if isinstance(exc, VectorStoreUnusable) else logging.INFO
            log.log(level, "hybrid search answered by words only: %s", exc.message)
            notice = f"semantic search failed ({public_reason(exc)}): keyword results only"
            return Results(by_words[:limit], "keyword", notice)
        return Results(fuse([by_words, by_meaning])[:limit], "hybrid")

    async def semantic(
        self, query: str, scope: Scope, conversation: uuid.UUID | None, limit: int
    ) -> list[Hit]:
        if self.embedder is None or self.vectors is None:
            raise SearchUnavailable(
                "semantic search is not available: no embedder is configured or installed "
                "(see [search] embedder); use mode=keyword"
            )
        vector = await self.embedder.embed_query(query)
        return await asyncio.to_thread(self._nearest, vector, scope, conversation, limit)

    def _nearest(
        self, vector: list[float], scope: Scope, conversation: uuid.UUID | None, limit: int
    ) -> list[Hit]:
        assert self.vectors is not None and self.embedder is not None
        key: int | None = None
        if conversation is not None:
            with self.engine.connect() as conn:
                key = outbox.conversation_key(conn, conversation, scope.user_id, scope.everyone)
            if key is None:
                return []  # not the caller's (or no such one): the same as no match
        try:
            nearest = self.vectors.search_messages(
                vector,
                model=self.embedder.model,
                user_id=scope.user_id,
                everyone=scope.everyone,
                conversation_id=key,
                limit=limit,
            )
        except ModelMismatch:
            # No model yet: a new store (or one emptied for a model) is being filled.
            what = "built" if self.vectors.model is None else "rebuilt for a new embedding model"
            raise SearchUnavailable(
                f"the semantic index is being {what}; try again later or use mode=keyword"
            ) from None
        with self.engine.connect() as conn:
            found = outbox.found_messages(
                conn, [n.message_id for n in nearest], scope.user_id, scope.everyone
            )
        hits: list[Hit] = []
        for near in nearest:
            row = found.get(near.message_id)
            if row is None:
                continue
            hits.append(
                Hit(
                    "message",
                    near.score,
                    _excerpt(row.content),
                    row.conversation_id,
                    row.conversation_title,
                    row.message_id,
                    row.role,
                    row.created_at,
                )
            )
        return hits


def public_reason(exc: ParleyError) -> str:
    """Why semantic search failed, for a client: a vector store that cannot be used is
    named without its location (``VectorStoreUnusable.public``)."""
    if isinstance(exc, VectorStoreUnusable):
        return exc.public("the semantic index could not be read")
    return exc.message


def fuse(lists: list[list[Hit]]) -> list[Hit]:
    """Reciprocal rank fusion of ranked lists (best first); a hit keeps the first list's
    snippet (keyword's: its matched words are marked) and gets the fused score."""
    scores: dict[tuple[str, uuid.UUID], float] = {}
    first: dict[tuple[str, uuid.UUID], Hit] = {}
    for ranked in lists:
        for rank, hit in enumerate(ranked, start=1):
            key = _key(hit)
            scores[key] = scores.get(key, 0.0) + 1.0 / (RRF_K + rank)
            first.setdefault(key, hit)
    order = sorted(scores, key=lambda key: scores[key], reverse=True)
    return [replace(first[key], score=scores[key]) for key in order]


def _key(hit: Hit) -> tuple[str, uuid.UUID]:
    if hit.message_id is not None:
        return ("message", hit.message_id)
    return ("title", hit.conversation_id)


def _excerpt(content: str) -> str:
    text = " ".join(content.split())
    if len(text) <= SNIPPET_CHARS:
        return text
    return text[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " …"
