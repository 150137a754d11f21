"""The search outbox and the rows the vector store mirrors (all of the indexer's SQL).

``search_outbox`` is filled by triggers in the transaction that inserts, edits or deletes
a message or a document chunk (migration 0005); the indexer reads it in id order, looks
the items up as they are *now* (a row that is gone, or whose text is empty, means
"delete its vector"; the queued ``op`` is only a hint), and removes exactly the outbox
rows it read, so a change queued meanwhile is handled by the next batch. Invariants:

- a message is "indexable" when its content is not the empty string; reconcile and the
  indexer use this same rule (``INDEXABLE``), so a reconciled store has a vector for every
  indexable message and for every chunk, and for nothing else;
- ids are internal integer keys: they never leave the server.

Every function takes an open connection; the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from parley.domain.times import utc
from parley.store.schema import (
    conversations,
    document_chunks,
    documents,
    messages,
    search_outbox,
)

MESSAGE = "message"
CHUNK = "chunk"
_IN = 500  # ids per IN (...) list
INDEXABLE = messages.c.content != ""


@dataclass(frozen=True, slots=True)
class Queued:
    id: int
    kind: str
    item_id: int
    op: str


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: int
    public_id: uuid.UUID
    user_id: int | None
    conversation_id: int
    conversation_public_id: uuid.UUID
    role: str
    content: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkRow:
    id: int
    document_id: int
    user_id: int | None
    conversation_id: int | None
    collection: str | None
    page: int | None
    ordinal: int
    content: str
    filename: str
    created_at: datetime


def pending(conn: Connection, limit: int) -> list[Queued]:
    """The oldest ``limit`` outbox rows."""
    rows = conn.execute(
        select(
            search_outbox.c.id, search_outbox.c.kind, search_outbox.c.item_id, search_outbox.c.op
        )
        .order_by(search_outbox.c.id)
        .limit(limit)
    ).all()
    return [Queued(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]


def size(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(search_outbox)).scalar_one())


def remove(conn: Connection, ids: Collection[int]) -> None:
    """Delete the handled outbox rows (by their own ids)."""
    for part in _parts(sorted(ids)):
        conn.execute(delete(search_outbox).where(search_outbox.c.id.in_(part)))


def clear(conn: Connection) -> int:
    """Drop every queued row (no embedder: nothing can be indexed, and reconcile queues
    what is missing once there is one); return how many."""
    return int(conn.execute(delete(search_outbox)).rowcount or 0)


def queue(conn: Connection, kind: str, item_ids: Collection[int]) -> None:
    """Queue ``upsert`` rows for items that lack a vector (reconcile)."""
    for part in _parts(sorted(item_ids)):
        conn.execute(
            insert(search_outbox),
            [{"kind": kind, "item_id": item, "op": "upsert"} for item in part],
        )


def queued_items(conn: Connection, kind: str) -> set[int]:
    rows = conn.execute(select(search_outbox.c.item_id).where(search_outbox.c.kind == kind))
    return {int(r[0]) for r in rows}


def message_rows(conn: Connection, ids: Collection[int]) -> list[MessageRow]:
    """The indexable messages among ``ids``, with their owner."""
    m, c = messages, conversations
    rows = _indexable(
        conn,
        ids,
        m.c.id,
        m.c.public_id,
        c.c.user_id,
        c.c.id,
        c.c.public_id,
        m.c.role,
        m.c.content,
        m.c.created_at,
    )
    return [
        MessageRow(int(r[0]), r[1], r[2], int(r[3]), r[4], str(r[5]), str(r[6]), utc(r[7]))
        for r in rows
    ]


def indexable_message_ids(conn: Connection, ids: Collection[int]) -> set[int]:
    """The ids among ``ids`` that ``message_rows`` would return, read without the rows."""
    return {int(r[0]) for r in _indexable(conn, ids, messages.c.id)}


def _indexable(conn: Connection, ids: Collection[int], *columns: Any) -> Iterator[Sequence[Any]]:
    """``columns`` of the indexable messages among ``ids`` (``messages`` joined to their
    ``conversations``), one query per part of the ids."""
    m, c = messages, conversations
    for part in _parts(sorted(ids)):
        yield from conn.execute(
            select(*columns)
            .select_from(m)
            .join(c, c.c.id == m.c.conversation_id)
            .where(m.c.id.in_(part), INDEXABLE)
        )


def chunk_rows(conn: Connection, ids: Collection[int]) -> list[ChunkRow]:
    """The chunks among ``ids`` that still exist, with their document's owner and place."""
    out: list[ChunkRow] = []
    k, d = document_chunks, documents
    for part in _parts(sorted(ids)):
        rows = conn.execute(
            select(
                k.c.id,
                k.c.document_id,
                d.c.user_id,
                d.c.conversation_id,
                d.c.collection,
                k.c.page,
                k.c.ordinal,
                k.c.content,
                d.c.filename,
                d.c.created_at,
            )
            .join(d, d.c.id == k.c.document_id)
            .where(k.c.id.in_(part))
        ).all()
        out += [
            ChunkRow(
                int(r[0]),
                int(r[1]),
                r[2],
                r[3],
                r[4],
                r[5],
                int(r[6]),
                str(r[7]),
                str(r[8]),
                utc(r[9]),
            )
            for r in rows
        ]
    return out


def message_ids(conn: Connection) -> set[int]:
    """Every indexable message id (what the ``messages`` vector table must hold)."""
    return {int(r[0]) for r in conn.execute(select(messages.c.id).where(INDEXABLE))}


def chunk_ids(conn: Connection) -> set[int]:
    return {int(r[0]) for r in conn.execute(select(document_chunks.c.id))}


@dataclass(frozen=True, slots=True)
class Found:
    """A message found by the vector store, as the API shows it."""

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    conversation_title: str | None
    role: str
    content: str
    created_at: datetime


def found_messages(
    conn: Connection, ids: Sequence[int], user_id: int | None, everyone: bool
) -> dict[int, Found]:
    """The messages ``ids`` (internal) that still exist and the scope may see. The owner
    was already filtered inside the vector query; checked again here, because a vector
    can outlive its row until the indexer catches up."""
    out: dict[int, Found] = {}
    m, c = messages, conversations
    for part in _parts(list(ids)):
        query = (
            select(
                m.c.id,
                m.c.public_id,
                c.c.public_id,
                c.c.title,
                m.c.role,
                m.c.content,
                m.c.created_at,
            )
            .join(c, c.c.id == m.c.conversation_id)
            .where(m.c.id.in_(part))
        )
        if not everyone:
            owner = c.c.user_id.is_(None) if user_id is None else c.c.user_id == user_id
            query = query.where(owner)
        for r in conn.execute(query):
            out[int(r[0])] = Found(r[1], r[2], r[3], str(r[4]), str(r[5]), utc(r[6]))
    return out


def conversation_key(
    conn: Connection, public_id: uuid.UUID, user_id: int | None, everyone: bool
) -> int | None:
    """The internal id of a conversation the scope may see, else None."""
    query = select(conversations.c.id).where(conversations.c.public_id == public_id)
    if not everyone:
        c = conversations.c
        query = query.where(c.user_id.is_(None) if user_id is None else c.user_id == user_id)
    value: Any = conn.execute(query).scalar_one_or_none()
    return None if value is None else int(value)


def _parts(ids: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(ids), _IN):
        yield ids[start : start + _IN]
