"""Attachments for the chat service: record an upload, read it back, turn a message's
files into model content parts, and sweep blobs that no row references any more.

``Attachments`` wraps the engine and the blob store; its methods are synchronous (file
and database I/O): call them through ``asyncio.to_thread``. Ownership is the caller's
decision, passed in as ``may_see`` (``Identity.may_see``), so that this layer knows
nothing of HTTP. Invariants: a row is committed only once its blob is durable, and a
blob is swept only after the rows naming it are gone (see ``store.blobs``).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

import sqlalchemy

from parley.chat.uploads import IMAGE_TYPES, TEXT_TYPES
from parley.errors import NotFound
from parley.store import attachments as repo
from parley.store.attachments import AttachmentRow, ConversationRef
from parley.store.blobs import BlobStore, PendingBlob
from parley.store.engine import writer_connection

MaySee = Callable[[int | None], bool]


class Attachments:
    def __init__(self, engine: sqlalchemy.Engine, blobs: BlobStore) -> None:
        self.engine = engine
        self.blobs = blobs

    def begin(self) -> PendingBlob:
        """A temporary file in the blob directory to stream an upload into."""
        return self.blobs.begin()

    def conversation(self, public_id: uuid.UUID, may_see: MaySee) -> ConversationRef:
        """The conversation an upload goes to; ``NotFound`` unless the caller may see it."""
        with self.engine.connect() as conn:
            ref = repo.conversation_ref(conn, public_id)
        if ref is None or not may_see(ref.user_id):
            raise NotFound(f"no such conversation: {public_id}")
        return ref

    def record(
        self,
        pending: PendingBlob,
        *,
        user_id: int | None,
        conversation: ConversationRef | None,
        filename: str,
        mime_type: str,
    ) -> AttachmentRow:
        """Publish the upload's blob, then commit its row; the blob goes again if the row
        cannot be committed (unless another row names the same bytes). ``NotFound`` when
        ``conversation`` was deleted since it was looked up."""
        sha256 = pending.finish()
        try:
            with writer_connection(self.engine) as conn, conn.begin():
                if conversation is not None and not repo.hold_conversation(conn, conversation.id):
                    raise NotFound(f"no such conversation: {conversation.public_id}")
                row = repo.insert_attachment(
                    conn,
                    user_id=user_id,
                    conversation=conversation,
                    filename=filename,
                    mime_type=mime_type,
                    size=pending.size,
                    sha256=sha256,
                )
        except BaseException:
            pending.discard()
            self.sweep([sha256])
            raise
        pending.settle()
        return row

    def get(self, public_id: uuid.UUID, may_see: MaySee) -> AttachmentRow:
        """The attachment; ``NotFound`` when it does not exist or is not the caller's."""
        with self.engine.connect() as conn:
            row = repo.get_attachment(conn, public_id)
        if row is None or not may_see(row.user_id):
            raise NotFound(f"no such attachment: {public_id}")
        return row

    def for_message(self, public_ids: Sequence[uuid.UUID], may_see: MaySee) -> list[AttachmentRow]:
        """The attachments a new message carries, all the caller's (``NotFound`` naming
        the first that is not): the chat service links them with
        ``store.attachments.link_to_message`` in the transaction that commits the message."""
        with self.engine.connect() as conn:
            rows = {row.public_id: row for row in repo.get_attachments(conn, public_ids)}
        for public_id in public_ids:
            row = rows.get(public_id)
            if row is None or not may_see(row.user_id):
                raise NotFound(f"no such attachment: {public_id}")
        return [rows[p] for p in public_ids]

    def open(self, row: AttachmentRow) -> BinaryIO:
        return self.blobs.open(row.sha256)

    def delete(self, row: AttachmentRow) -> None:
        """Delete the row, then its blob if no other row names it."""
        with writer_connection(self.engine) as conn, conn.begin():
            repo.delete_attachment(conn, row.id)
        self.sweep([row.sha256])

    def sweep(self, hashes: Iterable[str]) -> int:
        """Delete those blobs no attachment row names any more; how many went.

        The conversation delete calls this after its commit, with the hashes it read
        (``store.attachments.conversation_blobs``) before deleting.
        """
        return sum(self.blobs.sweep(sha256, self._referenced) for sha256 in set(hashes))

    def message_parts(self, message_id: int) -> list[dict[str, Any]]:
        """The content parts for the files attached to a stored message, in upload order."""
        with self.engine.connect() as conn:
            rows = repo.message_attachments(conn, message_id)
        return self.parts(rows)

    def parts(self, rows: Iterable[AttachmentRow]) -> list[dict[str, Any]]:
        """Content parts for ``rows``: images as data URLs, text files as text, PDFs as
        OpenAI ``file`` parts."""
        return [content_part(row, self.blobs.read(row.sha256)) for row in rows]

    def _referenced(self, sha256: str) -> bool:
        with self.engine.connect() as conn:
            return repo.referenced(conn, sha256)


def content_part(row: AttachmentRow, data: bytes) -> dict[str, Any]:
    """One OpenAI content part for an attachment's bytes."""
    if row.mime_type in IMAGE_TYPES:
        url = f"data:{row.mime_type};base64,{base64.b64encode(data).decode()}"
        return {"type": "image_url", "image_url": {"url": url}}
    if row.mime_type in TEXT_TYPES:
        name = row.filename.replace('"', "'")
        text = data.decode("utf-8")
        return {
            "type": "text",
            "text": f'<file name="{name}" type="{row.mime_type}">\n{text}\n</file>',
        }
    return {
        "type": "file",
        "file": {
            "filename": row.filename,
            "file_data": f"data:{row.mime_type};base64,{base64.b64encode(data).decode()}",
        },
    }
