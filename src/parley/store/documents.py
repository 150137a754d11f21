"""The documents repository: uploaded documents, their chunks, and the citations of the
answers given from them (all of their SQL).

Invariants:
- a document and all of its chunks are inserted in one transaction, as ``pending``: a
  document is never seen half-chunked. The outbox triggers (migration 0005) queue every
  chunk for the indexer in that same transaction;
- ``pending`` becomes ``indexed`` once no chunk of the document is left in the outbox
  (``mark_indexed``, called by the indexer in the transaction that removes the outbox rows
  it handled), or ``failed`` with its reason (``mark_failed``); nothing else moves the
  status, and ``indexed`` / ``failed`` are final;
- a document uploaded to a conversation belongs to the conversation's owner (``user_id``;
  NULL for the local admin and the master key, as elsewhere), one in a named collection to
  its uploader; ownership is the caller's question (``Viewer.may_see``), asked of the
  ``user_id`` of the rows read here;
- deleting a document deletes its chunks (foreign keys), whose delete triggers queue the
  removal of their vectors; citations keep the file name, page and chunk number, with their
  document and chunk ids set to NULL. The blob is the caller's to sweep after the commit:
  ``referenced`` counts documents as well as attachments (``store.attachments``);
- citations are written after their answer's message is committed and are read with the
  messages that carry them, in rank order.

Every function runs in the caller's transaction; writes need a write transaction
(``store.engine.writer_connection``).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from sqlalchemy import Connection, bindparam, delete, exists, insert, select, update
from sqlalchemy.sql import Select

from parley.domain.times import utc
from parley.store.bulk import new_public_id
from parley.store.schema import (
    citations,
    conversations,
    document_chunks,
    documents,
    messages,
    search_outbox,
)

PENDING: Final = "pending"
INDEXED: Final = "indexed"
FAILED: Final = "failed"
STATUSES: Final = frozenset({PENDING, INDEXED, FAILED})
MAX_PAGE: Final = 200
MAX_ERROR: Final = 1000

_D = documents.c
_K = document_chunks.c
_CHUNK = 500


class NewChunk(Protocol):
    """A chunk to store (``search.documents.ChunkText`` is one)."""

    @property
    def ordinal(self) -> int: ...

    @property
    def page(self) -> int | None: ...

    @property
    def content(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Place:
    """Where a document goes: a conversation (its id, public id and owner) or a named
    collection of ``user_id``."""

    user_id: int | None
    conversation_id: int | None = None
    conversation_public_id: uuid.UUID | None = None
    collection: str | None = None


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: int
    public_id: uuid.UUID
    user_id: int | None
    conversation_id: int | None
    conversation_public_id: uuid.UUID | None
    collection: str | None
    filename: str
    mime_type: str
    size: int
    sha256: str
    status: str
    error: str | None
    page_count: int | None
    chunk_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """A stored chunk with what retrieval needs to know of its document."""

    id: int
    document_id: int
    document_public_id: uuid.UUID
    user_id: int | None
    conversation_id: int | None
    collection: str | None
    filename: str
    ordinal: int
    page: int | None
    content: str


@dataclass(frozen=True, slots=True)
class NewCitation:
    document_id: int
    chunk_id: int
    filename: str
    page: int | None
    chunk_ordinal: int
    score: float


@dataclass(frozen=True, slots=True)
class CitationRow:
    """A source of an answer; ``document_public_id`` None once the document is deleted."""

    ordinal: int
    document_public_id: uuid.UUID | None
    filename: str
    page: int | None
    chunk_ordinal: int
    score: float


# -- documents ----------------------------------------------------------------------------


def insert_document(
    conn: Connection,
    place: Place,
    *,
    filename: str,
    mime_type: str,
    size: int,
    sha256: str,
    page_count: int | None,
    chunks: Sequence[NewChunk],
) -> DocumentRow:
    """Insert a ``pending`` document and all of its chunks (see the module docstring)."""
    now = datetime.now(UTC)
    public_id = new_public_id()
    values: dict[str, Any] = {
        "public_id": public_id,
        "user_id": place.user_id,
        "conversation_id": place.conversation_id,
        "collection": place.collection,
        "filename": filename,
        "mime_type": mime_type,
        "size": size,
        "sha256": sha256,
        "status": PENDING,
        "error": None,
        "page_count": page_count,
        "chunk_count": len(chunks),
        "created_at": now,
        "updated_at": now,
    }
    document_id = conn.execute(insert(documents).values(values).returning(_D.id)).scalar_one()
    rows = [
        {"document_id": document_id, "ordinal": c.ordinal, "page": c.page, "content": c.content}
        for c in chunks
    ]
    for start in range(0, len(rows), _CHUNK):
        conn.execute(insert(document_chunks), rows[start : start + _CHUNK])
    return DocumentRow(
        id=document_id,
        conversation_public_id=place.conversation_public_id,
        **values,
    )


def get_document(conn: Connection, public_id: uuid.UUID) -> DocumentRow | None:
    """The document, whoever owns it: the caller checks ownership."""
    row = conn.execute(_SELECT.where(_D.public_id == public_id)).first()
    return None if row is None else _document(row)


def list_documents(
    conn: Connection,
    *,
    user_id: int | None = None,
    conversation_id: int | None = None,
    collection: str | None = None,
    status: str | None = None,
    after: uuid.UUID | None = None,
    limit: int = 50,
) -> list[DocumentRow]:
    """Newest first: the documents of a conversation (``conversation_id``), else those
    of ``user_id`` (NULL: the local admin's); optionally one collection, one status, and
    only those older than the document ``after`` (a page's last, even if since deleted)."""
    query = _SELECT
    if conversation_id is not None:
        query = query.where(_D.conversation_id == conversation_id)
    else:
        query = query.where(_D.user_id.is_(None) if user_id is None else _D.user_id == user_id)
    if collection is not None:
        query = query.where(_D.collection == collection)
    if status is not None:
        query = query.where(_D.status == status)
    if after is not None:
        anchor = conn.execute(select(_D.id).where(_D.public_id == after)).scalar_one_or_none()
        # A page's last document may be deleted before the next page is asked for: its
        # public id, a UUIDv7, still says when it was made (to the millisecond), so the
        # page goes on from there instead of coming back empty.
        query = query.where(_D.id < anchor if anchor is not None else _D.public_id < after)
    limit = max(1, min(limit, MAX_PAGE))
    return [_document(r) for r in conn.execute(query.order_by(_D.id.desc()).limit(limit))]


def has_documents(conn: Connection, conversation_id: int) -> bool:
    """Whether any document was uploaded to the conversation (whatever its status)."""
    query = select(_D.id).where(_D.conversation_id == conversation_id).limit(1)
    return conn.execute(query).first() is not None


def delete_document(conn: Connection, document_id: int) -> None:
    conn.execute(delete(documents).where(_D.id == document_id))


def mark_indexed(conn: Connection, document_ids: Collection[int]) -> None:
    """``pending`` -> ``indexed`` for those of ``document_ids`` none of whose chunks still
    has an outbox row (run it in the transaction that removes the handled rows)."""
    if not document_ids:
        return
    queued = exists().where(
        search_outbox.c.kind == "chunk",
        search_outbox.c.item_id == _K.id,
        _K.document_id == _D.id,
    )
    now = datetime.now(UTC)
    ids = sorted(set(document_ids))
    for start in range(0, len(ids), _CHUNK):
        conn.execute(
            update(documents)
            .where(_D.id.in_(ids[start : start + _CHUNK]), _D.status == PENDING, ~queued)
            .values(status=INDEXED, updated_at=now)
        )


def mark_failed(conn: Connection, document_ids: Collection[int], reason: str) -> None:
    """``pending`` -> ``failed`` with ``reason`` (kept to ``MAX_ERROR`` characters)."""
    if not document_ids:
        return
    now = datetime.now(UTC)
    ids = sorted(set(document_ids))
    for start in range(0, len(ids), _CHUNK):
        conn.execute(
            update(documents)
            .where(_D.id.in_(ids[start : start + _CHUNK]), _D.status == PENDING)
            .values(status=FAILED, error=reason[:MAX_ERROR], updated_at=now)
        )


def referenced(conn: Connection, sha256: str) -> bool:
    """Whether any document still names the blob."""
    return conn.execute(select(_D.id).where(_D.sha256 == sha256).limit(1)).first() is not None


def named(conn: Connection, hashes: Iterable[str]) -> set[str]:
    """Those of ``hashes`` that some document names."""
    wanted = sorted(set(hashes))
    found: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        query = select(_D.sha256).where(_D.sha256.in_(wanted[start : start + _CHUNK]))
        found.update(conn.execute(query.distinct()).scalars())
    return found


def conversation_hashes(conn: Connection, conversation_id: int) -> set[str]:
    """The blobs a conversation's documents name: read before deleting it."""
    query = select(_D.sha256).where(_D.conversation_id == conversation_id).distinct()
    return set(conn.execute(query).scalars())


def hashes(conn: Connection) -> set[str]:
    """Every blob a document names."""
    return set(conn.execute(select(_D.sha256).distinct()).scalars())


# -- chunks -------------------------------------------------------------------------------


def chunks_by_id(conn: Connection, chunk_ids: Sequence[int]) -> dict[int, ChunkRow]:
    """The chunks of ``chunk_ids`` that still exist, with their document's owner, place
    and file name."""
    found: dict[int, ChunkRow] = {}
    ids = list(dict.fromkeys(chunk_ids))
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(_CHUNKS, {"ids": ids[start : start + _CHUNK]}):
            found[row.id] = ChunkRow(
                id=row.id,
                document_id=row.document_id,
                document_public_id=row.document_public_id,
                user_id=row.user_id,
                conversation_id=row.conversation_id,
                collection=row.collection,
                filename=row.filename,
                ordinal=row.ordinal,
                page=row.page,
                content=row.content,
            )
    return found


def document_chunks_of(conn: Connection, document_id: int) -> list[tuple[int, int | None, str]]:
    """``(ordinal, page, content)`` of a document's chunks, in order."""
    query = (
        select(_K.ordinal, _K.page, _K.content)
        .where(_K.document_id == document_id)
        .order_by(_K.ordinal)
    )
    return [(r.ordinal, r.page, r.content) for r in conn.execute(query)]


# -- citations ----------------------------------------------------------------------------


def insert_citations(conn: Connection, message_id: int, cited: Sequence[NewCitation]) -> set[int]:
    """The sources of answer ``message_id``, in rank order (ordinal 1 first); the ids of
    their documents that still exist.

    A document may be deleted while its answer is being made: its citations are stored as
    those of a deleted one are (file name, page and chunk kept, ids NULL), never refused
    by the foreign keys with every other citation of the answer. An answer deleted
    meanwhile (with its branch or conversation) gets none, without an error. The
    documents still there, and the answer, are locked (``FOR KEY SHARE`` on PostgreSQL;
    SQLite's write transaction serialises) so that none of them goes before this commits."""
    if not cited:
        return set()
    wanted = sorted({c.document_id for c in cited})
    kept = set(
        conn.execute(
            select(_D.id).where(_D.id.in_(wanted)).with_for_update(read=True, key_share=True)
        ).scalars()
    )
    answer = select(messages.c.id).where(messages.c.id == message_id)
    if conn.execute(answer.with_for_update(read=True, key_share=True)).first() is None:
        # The answer was deleted (with its branch or conversation) after its commit:
        # nothing is left to cite, and the foreign key would refuse the rows.
        return kept
    conn.execute(
        insert(citations),
        [
            {
                "message_id": message_id,
                "ordinal": rank,
                "document_id": c.document_id if c.document_id in kept else None,
                # A chunk goes only with its document (foreign key cascade).
                "chunk_id": c.chunk_id if c.document_id in kept else None,
                "filename": c.filename,
                "page": c.page,
                "chunk_ordinal": c.chunk_ordinal,
                "score": c.score,
            }
            for rank, c in enumerate(cited, start=1)
        ],
    )
    return kept


def citations_of(conn: Connection, message_ids: Sequence[int]) -> dict[int, list[CitationRow]]:
    """The citations of each of ``message_ids`` (those that have any), in rank order."""
    found: dict[int, list[CitationRow]] = {}
    ids = list(message_ids)
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(_CITATIONS_OF, {"ids": ids[start : start + _CHUNK]}):
            found.setdefault(row.message_id, []).append(_citation(row))
    return found


def citations_in(conn: Connection, conversation_id: int) -> dict[int, list[CitationRow]]:
    """The citations of a conversation's messages, by message id, in rank order."""
    query = (
        _citation_select()
        .join(messages, messages.c.id == citations.c.message_id)
        .where(messages.c.conversation_id == conversation_id)
        .order_by(citations.c.message_id, citations.c.ordinal)
    )
    found: dict[int, list[CitationRow]] = {}
    for row in conn.execute(query):
        found.setdefault(row.message_id, []).append(_citation(row))
    return found


# -- rows ---------------------------------------------------------------------------------


_SELECT: Select[Any] = select(
    documents, conversations.c.public_id.label("conversation_public_id")
).outerjoin(conversations, conversations.c.id == _D.conversation_id)

_CHUNKS = (
    select(
        _K.id,
        _K.document_id,
        _K.ordinal,
        _K.page,
        _K.content,
        _D.public_id.label("document_public_id"),
        _D.user_id,
        _D.conversation_id,
        _D.collection,
        _D.filename,
    )
    .join(documents, _D.id == _K.document_id)
    .where(_K.id.in_(bindparam("ids", expanding=True)))
)


def _citation_select() -> Select[Any]:
    return select(citations, _D.public_id.label("document_public_id")).outerjoin(
        documents, _D.id == citations.c.document_id
    )


_CITATIONS_OF = (
    _citation_select()
    .where(citations.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(citations.c.message_id, citations.c.ordinal)
)


def _citation(row: Any) -> CitationRow:
    return CitationRow(
        ordinal=row.ordinal,
        document_public_id=row.document_public_id,
        filename=row.filename,
        page=row.page,
        chunk_ordinal=row.chunk_ordinal,
        score=float(row.score),
    )


def _document(row: Any) -> DocumentRow:
    return DocumentRow(
        id=row.id,
        public_id=row.public_id,
        user_id=row.user_id,
        conversation_id=row.conversation_id,
        conversation_public_id=row.conversation_public_id,
        collection=row.collection,
        filename=row.filename,
        mime_type=row.mime_type,
        size=row.size,
        sha256=row.sha256,
        status=row.status,
        error=row.error,
        page_count=row.page_count,
        chunk_count=row.chunk_count,
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )
