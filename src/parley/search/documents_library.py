"""The document library: record an upload as a document with its chunks, read, list and
delete documents, on the engine and the blob store shared with attachments.

Methods are synchronous (file and database I/O): call them through ``asyncio.to_thread``.
Ownership is the caller's decision, passed in as ``may_see`` (``Identity.may_see``), so
this layer knows nothing of HTTP. Invariants:
- a file is read and chunked (``search.documents``) before anything of it is stored: a
  refused file leaves no blob, no row and no outbox entry;
- the document row and its chunks are committed together, only once the blob is durable;
  the blob goes again if that commit fails (unless another row names the same bytes);
- deleting a document deletes its chunks (and, through the outbox, their vectors), then
  sweeps its blob unless an attachment or another document still names it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy

from parley.errors import InvalidRequest, NotFound
from parley.search.documents import ChunkText, Extracted
from parley.store import attachments as files
from parley.store import documents as repo
from parley.store.blobs import BlobStore, PendingBlob
from parley.store.documents import DocumentRow, Place
from parley.store.engine import writer_connection

MaySee = Callable[[int | None], bool]
MAX_COLLECTION = 128


class DocumentLibrary:
    def __init__(self, engine: sqlalchemy.Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    def begin(self) -> PendingBlob:
        """A temporary file in the blob directory to stream an upload into."""
        return self.blobs.begin()

    def place(
        self,
        *,
        conversation: uuid.UUID | None,
        collection: str | None,
        user_id: int | None,
        may_see: MaySee,
    ) -> Place:
        """Where an upload goes: into a conversation the caller may see (the document is
        then its owner's), or into a collection of the caller's own."""
        if (conversation is None) == (collection is None):
            raise InvalidRequest(
                "send either 'conversation_id' or 'collection' with the file", "collection"
            )
        if collection is not None:
            return Place(user_id=user_id, collection=collection)
        assert conversation is not None
        with self.engine.connect() as conn:
            ref = files.conversation_ref(conn, conversation)
        if ref is None or not may_see(ref.user_id):
            raise NotFound(f"no such conversation: {conversation}")
        return Place(ref.user_id, ref.id, ref.public_id)

    def record(
        self,
        pending: PendingBlob,
        place: Place,
        *,
        filename: str,
        extracted: Extracted,
        chunks: list[ChunkText],
    ) -> DocumentRow:
        """Publish the blob, then commit the document and its chunks (``pending``);
        ``NotFound`` when the conversation of ``place`` was deleted since ``place``."""
        sha256 = pending.finish()
        try:
            with writer_connection(self.engine) as conn, conn.begin():
                held = place.conversation_id
                if held is not None and not files.hold_conversation(conn, held):
                    raise NotFound(f"no such conversation: {place.conversation_public_id}")
                row = repo.insert_document(
                    conn,
                    place,
                    filename=filename,
                    mime_type=extracted.mime_type,
                    size=pending.size,
                    sha256=sha256,
                    page_count=extracted.page_count,
                    chunks=chunks,
                )
        except BaseException:
            pending.discard()
            self.sweep([sha256])
            raise
        pending.settle()
        return row

    def get(self, public_id: uuid.UUID, may_see: MaySee) -> DocumentRow:
        """The document; ``NotFound`` when it does not exist or is not the caller's."""
        with self.engine.connect() as conn:
            row = repo.get_document(conn, public_id)
        if row is None or not may_see(row.user_id):
            raise NotFound(f"no such document: {public_id}")
        return row

    def listing(
        self,
        *,
        user_id: int | None,
        may_see: MaySee,
        conversation: uuid.UUID | None = None,
        collection: str | None = None,
        status: str | None = None,
        after: uuid.UUID | None = None,
        limit: int = 50,
    ) -> list[DocumentRow]:
        """The caller's own documents, or those of a conversation the caller may see."""
        conversation_id: int | None = None
        if conversation is not None:
            with self.engine.connect() as conn:
                ref = files.conversation_ref(conn, conversation)
            if ref is None or not may_see(ref.user_id):
                raise NotFound(f"no such conversation: {conversation}")
            conversation_id = ref.id
        with self.engine.connect() as conn:
            return repo.list_documents(
                conn,
                user_id=user_id,
                conversation_id=conversation_id,
                collection=collection,
                status=status,
                after=after,
                limit=limit,
            )

    def delete(self, row: DocumentRow) -> None:
        """Delete the document with its chunks, then its blob if nothing names it."""
        with writer_connection(self.engine) as conn, conn.begin():
            repo.delete_document(conn, row.id)
        self.sweep([row.sha256])

    def sweep(self, hashes: Iterable[str]) -> int:
        return sum(self.blobs.sweep(sha256, self._referenced) for sha256 in set(hashes))

    def _referenced(self, sha256: str) -> bool:
        with self.engine.connect() as conn:
            # Attachments and documents share the blob directory (``files.referenced``
            # counts both).
            return files.referenced(conn, sha256)


def collection_name(value: Any, param: str = "collection") -> str:
    """A collection's name: 1 to 128 printable characters."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{param}' must be a non-empty string", param)
    name = value.strip()
    if len(name) > MAX_COLLECTION or not name.isprintable():
        raise InvalidRequest(
            f"'{param}' must be at most {MAX_COLLECTION} printable characters", param
        )
    return name
