"""Documents (issue 7, part 6): a placeholder holding only what the indexer calls.

Engineer B's ``store/documents.py`` (all document, chunk and citation SQL) replaces this
file; ``mark_indexed`` keeps exactly this signature and meaning.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

from sqlalchemy import Connection, exists, update

from parley.store.schema import document_chunks, documents, search_outbox


def mark_indexed(conn: Connection, document_ids: Collection[int]) -> None:
    """``pending`` -> ``indexed`` for those of ``document_ids`` none of whose chunks still
    has an outbox row (run it in the transaction that removes the handled rows)."""
    if not document_ids:
        return
    queued = exists().where(
        search_outbox.c.kind == "chunk",
        search_outbox.c.item_id == document_chunks.c.id,
        document_chunks.c.document_id == documents.c.id,
    )
    conn.execute(
        update(documents)
        .where(
            documents.c.id.in_(sorted(set(document_ids))),
            documents.c.status == "pending",
            ~queued,
        )
        .values(status="indexed", updated_at=datetime.now(UTC))
    )
