"""The rows of the vector store's tables: what a caller writes (``MessageVector``,
``ChunkVector``), what a search finds (``MessageHit``, ``ChunkHit``), their Arrow schemas,
and the values stored for "none".

LanceDB has no NULL-friendly equality, so "no owner" (the local admin, the master key) is
stored as ``LOCAL_OWNER`` (-1), "no conversation" as ``NONE`` (-1), "no collection" as "",
"no page" as ``NONE``: a filter can then name each of them. pyarrow is imported by each
function, not here, so importing this module stays free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

LOCAL_OWNER = -1
NONE = -1


@dataclass(frozen=True, slots=True)
class MessageVector:
    id: int
    user_id: int | None
    conversation_id: int
    role: str
    text: str
    created_at: datetime
    metadata: str
    vector: Sequence[float]


@dataclass(frozen=True, slots=True)
class ChunkVector:
    id: int
    document_id: int
    user_id: int | None
    conversation_id: int | None
    collection: str | None
    page: int | None
    ordinal: int
    text: str
    created_at: datetime
    metadata: str
    vector: Sequence[float]


@dataclass(frozen=True, slots=True)
class MessageHit:
    message_id: int  # messages.id
    conversation_id: int  # conversations.id
    score: float  # cosine similarity, higher is better
    role: str
    text: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkHit:
    chunk_id: int  # document_chunks.id
    document_id: int  # documents.id
    score: float  # cosine similarity, higher is better
    text: str
    page: int | None
    ordinal: int
    conversation_id: int | None
    collection: str | None


def arrow(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema)


def meta_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field("model", pa.string()), pa.field("dimension", pa.int64())])


def message_schema(dimension: int) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("conversation_id", pa.int64(), nullable=False),
            pa.field("role", pa.string()),
            pa.field("text", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
            pa.field("metadata", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def chunk_schema(dimension: int) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("document_id", pa.int64(), nullable=False),
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("conversation_id", pa.int64(), nullable=False),
            pa.field("collection", pa.string()),
            pa.field("page", pa.int64()),
            pa.field("ordinal", pa.int64()),
            pa.field("text", pa.string()),
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
            pa.field("metadata", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def message_row(row: MessageVector) -> dict[str, Any]:
    return {
        "id": row.id,
        "user_id": owner(row.user_id),
        "conversation_id": row.conversation_id,
        "role": row.role,
        "text": row.text,
        "created_at": row.created_at,
        "metadata": row.metadata,
        "vector": list(row.vector),
    }


def chunk_row(row: ChunkVector) -> dict[str, Any]:
    return {
        "id": row.id,
        "document_id": row.document_id,
        "user_id": owner(row.user_id),
        "conversation_id": NONE if row.conversation_id is None else row.conversation_id,
        "collection": row.collection or "",
        "page": NONE if row.page is None else row.page,
        "ordinal": row.ordinal,
        "text": row.text,
        "created_at": row.created_at,
        "metadata": row.metadata,
        "vector": list(row.vector),
    }


def owner(user_id: int | None) -> int:
    return LOCAL_OWNER if user_id is None else int(user_id)
