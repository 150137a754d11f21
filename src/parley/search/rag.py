"""Retrieval for answers: the chunks of a conversation's documents (and of the collections
a message names) nearest the user's message, the prompt that carries them upstream, and
the citations the answer keeps.

``Retriever`` wraps the engine, an embedder and the vector store (``search.embedders`` /
``search.vectors``, seen here through the two narrow protocols below). Invariants:
- isolation: the chunks of a conversation are searched among its owner's vectors, those
  of named collections among the caller's own; the user filter is inside the vector query
  (``VectorStore.search_chunks``), and every hit is checked again against its row in the
  store (owner, conversation, collection) before it is used: a vector left behind by a
  deleted chunk, or one that is not the caller's, never reaches a prompt;
- only indexed chunks are found: a document still ``pending`` is not waited for (nothing
  on the request path waits for embeddings);
- the text sent upstream is the chunk's row (``document_chunks.content``), not the copy in
  the vector store; the citations name the same chunks, in the same order, numbered as
  the prompt numbers them;
- distinct passages: chunks with the same text (a file uploaded twice, to the same
  conversation or to a collection and a conversation) take one slot, the best-ranked copy
  (on a tie, the oldest chunk), so the top ``limit`` hold different text;
- a failing embedder (its provider errors or is down, the local embedding process died
  or hangs past ``EMBED_TIMEOUT_SECONDS``) is one error, ``SearchUnavailable``, whose
  message names the cause with secrets redacted; so is a vector store that cannot be used
  (its files damaged or missing...), named without its location. What to do with it is
  the caller's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy

from parley.errors import ParleyError, SearchUnavailable, VectorStoreUnusable
from parley.metrics.redact import redact_text
from parley.store import documents as repo
from parley.store.documents import ChunkRow, NewCitation
from parley.store.engine import writer_connection

# How many chunks go into a prompt.
TOP_CHUNKS = 4
# Asked of the vector store per scope, before the store's rows are checked and copies of
# the same text dropped.
_CANDIDATES = 16
# How long a query's embedding may take before retrieval gives up (a hung embedder).
EMBED_TIMEOUT_SECONDS = 15.0
MAX_COLLECTIONS = 20
PROMPT_HEAD = (
    "Excerpts from the user's documents follow, numbered. Use them when they help to "
    "answer, and cite the ones you use by number, like [1]. If they do not contain the "
    "answer, say so rather than guessing."
)


class QueryEmbedder(Protocol):
    """What retrieval needs of an embedder (``search.embedders.Embedder`` is one)."""

    async def embed_query(self, text: str) -> list[float]: ...


class Hit(Protocol):
    @property
    def chunk_id(self) -> int: ...

    @property
    def score(self) -> float: ...


class ChunkIndex(Protocol):
    """What retrieval needs of the vector store (``search.vectors.VectorStore`` is one)."""

    def search_chunks(
        self,
        vector: Sequence[float],
        *,
        user_id: int | None,
        conversation_id: int | None = None,
        collections: Sequence[str] = (),
        limit: int = 5,
    ) -> Sequence[Hit]: ...


@dataclass(frozen=True, slots=True)
class Source:
    """One chunk given to the model, and how well it matched (cosine similarity)."""

    chunk: ChunkRow
    score: float

    def citation(self) -> NewCitation:
        c = self.chunk
        return NewCitation(c.document_id, c.id, c.filename, c.page, c.ordinal, self.score)


@dataclass(frozen=True, slots=True)
class Scope:
    """Where to look: the conversation's documents (of its owner ``owner_id``) and the
    caller's collections ``collections``."""

    conversation_id: int | None
    owner_id: int | None
    caller_id: int | None
    collections: tuple[str, ...] = ()


class Retriever:
    def __init__(
        self,
        engine: sqlalchemy.Engine,
        embedder: QueryEmbedder,
        index: ChunkIndex,
        *,
        limit: int = TOP_CHUNKS,
    ) -> None:
        self._engine = engine
        self._embedder = embedder
        self._index = index
        self._limit = limit

    async def retrieve(self, query: str, scope: Scope) -> list[Source]:
        """The best ``limit`` chunks for ``query`` in ``scope``, best first."""
        if not query.strip():
            return []
        try:
            vector = await asyncio.wait_for(
                self._embedder.embed_query(query), timeout=EMBED_TIMEOUT_SECONDS
            )
        except ParleyError as exc:
            raise SearchUnavailable(f"document search failed: {redact_text(exc.message)}") from None
        except TimeoutError:
            seconds = f"{EMBED_TIMEOUT_SECONDS:g}"
            raise SearchUnavailable(
                f"document search failed: the embedder did not answer in {seconds} s"
            ) from None
        except Exception as exc:
            # A crashed local embedding process (``BrokenProcessPool``, a failed restart):
            # its class only, the text may hold paths and arguments.
            raise SearchUnavailable(
                f"document search failed: the embedder failed ({type(exc).__name__})"
            ) from None
        return await asyncio.to_thread(self._search, vector, scope)

    def _search(self, vector: Sequence[float], scope: Scope) -> list[Source]:
        # One vector query per owner: the conversation's owner for its documents, the
        # caller for collections (the same query when they are the same user).
        asks: dict[int | None, tuple[int | None, tuple[str, ...]]] = {}
        if scope.conversation_id is not None:
            asks[scope.owner_id] = (scope.conversation_id, ())
        if scope.collections:
            conversation, _ = asks.get(scope.caller_id, (None, ()))
            asks[scope.caller_id] = (conversation, scope.collections)
        scores: dict[int, float] = {}
        for user_id, (conversation_id, collections) in asks.items():
            try:
                hits = self._index.search_chunks(
                    vector,
                    user_id=user_id,
                    conversation_id=conversation_id,
                    collections=collections,
                    limit=max(_CANDIDATES, self._limit * 4),
                )
            except VectorStoreUnusable as exc:
                what = "document search failed: the vector store could not be read"
                raise SearchUnavailable(exc.public(what)) from None
            for hit in hits:
                scores[hit.chunk_id] = max(hit.score, scores.get(hit.chunk_id, -1.0))
        if not scores:
            return []
        with self._engine.connect() as conn:
            rows = repo.chunks_by_id(conn, list(scores))
        sources = [
            Source(rows[chunk_id], score)
            for chunk_id, score in scores.items()
            if chunk_id in rows and _in_scope(rows[chunk_id], scope)
        ]
        sources.sort(key=lambda s: (-s.score, s.chunk.id))
        return _distinct(sources)[: self._limit]

    def cite(self, message_id: int, sources: Sequence[Source]) -> set[int]:
        """Store the sources of answer ``message_id`` (committed), in prompt order; the
        ids of their documents that still exist (one deleted meanwhile is cited as a
        deleted document is, see ``store.documents.insert_citations``)."""
        with writer_connection(self._engine) as conn, conn.begin():
            return repo.insert_citations(conn, message_id, [s.citation() for s in sources])

    def has_documents(self, conversation_id: int) -> bool:
        with self._engine.connect() as conn:
            return repo.has_documents(conn, conversation_id)


def _in_scope(chunk: ChunkRow, scope: Scope) -> bool:
    """The store's word on a hit: the conversation's own, or the caller's collection."""
    if scope.conversation_id is not None and chunk.conversation_id == scope.conversation_id:
        return chunk.user_id == scope.owner_id
    return (
        chunk.collection is not None
        and chunk.collection in scope.collections
        and chunk.user_id == scope.caller_id
    )


def _distinct(sources: Sequence[Source]) -> list[Source]:
    """``sources`` (best first) with each text kept once, at its best rank; texts that
    differ only in spacing are the same passage."""
    seen: set[str] = set()
    kept: list[Source] = []
    for source in sources:
        text = " ".join(source.chunk.content.split())
        if text not in seen:
            seen.add(text)
            kept.append(source)
    return kept


def prompt(sources: Sequence[Source]) -> str:
    """The system text that carries ``sources`` upstream, numbered from 1."""
    parts = [PROMPT_HEAD]
    for number, source in enumerate(sources, start=1):
        c = source.chunk
        where = f"{c.filename}, page {c.page}" if c.page is not None else c.filename
        parts.append(f"[{number}] {where}\n{c.content}")
    return "\n\n".join(parts)
