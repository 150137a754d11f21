"""The attachment repository: metadata rows of uploaded files (their bytes are blobs).

Invariants:
- a row names its blob by ``sha256``; several rows may share one blob (the same bytes
  uploaded twice are stored once), so a blob may go only when no row names it
  (``referenced`` / ``unreferenced``, which count documents too: they share the blob
  directory);
- ``user_id`` is the owner (NULL: the local admin, as for conversations); callers check
  ownership with ``Identity.may_see(row.user_id)`` and answer 404 otherwise;
- deleting a conversation deletes its attachment rows (foreign key cascade); the caller
  takes ``conversation_blobs`` first and sweeps them after the commit;
- a row is on at most one message (``message_id``): ``attach`` links a free row and
  copies one already on another message (a new row naming the same blob).

Every function runs in the caller's transaction; writes need a write transaction
(``store.engine.writer_connection``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.sql import Select

from parley.domain.times import utc
from parley.errors import NotFound
from parley.store import documents
from parley.store.bulk import new_public_id
from parley.store.schema import attachments, conversations, messages

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class AttachmentRow:
    id: int
    public_id: uuid.UUID
    user_id: int | None
    conversation_id: int | None
    conversation_public_id: uuid.UUID | None
    message_id: int | None
    message_public_id: uuid.UUID | None
    filename: str
    mime_type: str
    size: int
    sha256: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """What an attachment needs to know about a conversation: its id and owner."""

    id: int
    public_id: uuid.UUID
    user_id: int | None


def conversation_ref(conn: Connection, public_id: uuid.UUID) -> ConversationRef | None:
    row = conn.execute(
        select(conversations.c.id, conversations.c.user_id).where(
            conversations.c.public_id == public_id
        )
    ).first()
    return None if row is None else ConversationRef(row.id, public_id, row.user_id)


def hold_conversation(conn: Connection, conversation_id: int) -> bool:
    """Whether the conversation still exists, kept so until the caller's transaction ends
    (``FOR KEY SHARE`` on PostgreSQL; SQLite's write transaction serialises): an upload
    checked against it before its bytes were read is refused, not a foreign-key error,
    when the conversation was deleted meanwhile; and a delete that began after this waits,
    and then sees the new row (and its blob) among those it removes."""
    query = (
        select(conversations.c.id)
        .where(conversations.c.id == conversation_id)
        .with_for_update(read=True, key_share=True)
    )
    return conn.execute(query).first() is not None


def insert_attachment(
    conn: Connection,
    *,
    user_id: int | None,
    conversation: ConversationRef | None,
    filename: str,
    mime_type: str,
    size: int,
    sha256: str,
) -> AttachmentRow:
    public_id = new_public_id()
    now = datetime.now(UTC)
    row_id = conn.execute(
        insert(attachments)
        .values(
            public_id=public_id,
            user_id=user_id,
            conversation_id=conversation.id if conversation else None,
            message_id=None,
            filename=filename,
            mime_type=mime_type,
            size=size,
            sha256=sha256,
            created_at=now,
        )
        .returning(attachments.c.id)
    ).scalar_one()
    return AttachmentRow(
        id=row_id,
        public_id=public_id,
        user_id=user_id,
        conversation_id=conversation.id if conversation else None,
        conversation_public_id=conversation.public_id if conversation else None,
        message_id=None,
        message_public_id=None,
        filename=filename,
        mime_type=mime_type,
        size=size,
        sha256=sha256,
        created_at=now,
    )


def get_attachment(conn: Connection, public_id: uuid.UUID) -> AttachmentRow | None:
    """The row, whoever owns it: the caller checks ownership."""
    row = conn.execute(_select().where(attachments.c.public_id == public_id)).first()
    return None if row is None else _row(row)


def get_attachments(conn: Connection, public_ids: Sequence[uuid.UUID]) -> list[AttachmentRow]:
    """Rows for ``public_ids`` that exist, in the order asked."""
    found: dict[uuid.UUID, AttachmentRow] = {}
    for start in range(0, len(public_ids), _CHUNK):
        chunk = public_ids[start : start + _CHUNK]
        for row in conn.execute(_select().where(attachments.c.public_id.in_(chunk))):
            found[row.public_id] = _row(row)
    return [found[p] for p in public_ids if p in found]


def conversation_attachments(conn: Connection, conversation_id: int) -> list[AttachmentRow]:
    query = _select().where(attachments.c.conversation_id == conversation_id)
    return [_row(r) for r in conn.execute(query.order_by(attachments.c.id))]


def message_attachments(conn: Connection, message_id: int) -> list[AttachmentRow]:
    query = _select().where(attachments.c.message_id == message_id)
    return [_row(r) for r in conn.execute(query.order_by(attachments.c.id))]


def link_to_message(
    conn: Connection, attachment_ids: Sequence[int], conversation_id: int, message_id: int
) -> None:
    """Attach uploaded files to the message that carries them (and its conversation)."""
    if attachment_ids:
        conn.execute(
            update(attachments)
            .where(attachments.c.id.in_(list(attachment_ids)))
            .values(conversation_id=conversation_id, message_id=message_id)
        )


def attach(
    conn: Connection,
    rows: Sequence[AttachmentRow],
    conversation: ConversationRef,
    message_id: int,
    message_public_id: uuid.UUID,
) -> list[AttachmentRow]:
    """Put ``rows`` (read before this transaction) on a new message of ``conversation``,
    in the caller's transaction; the rows as linked, in the order given.

    A free row (on no message yet) is linked, wherever it was uploaded. A row already on
    another message (a message edited into a new branch, sent again with its files) is
    copied: a new row for the same blob, so the old branch keeps its own. A row deleted
    since it was read is ``NotFound``, and the caller's transaction rolls back.
    """
    out: list[AttachmentRow] = []

    def placed(row: AttachmentRow) -> AttachmentRow:
        return replace(
            row,
            conversation_id=conversation.id,
            conversation_public_id=conversation.public_id,
            message_id=message_id,
            message_public_id=message_public_id,
        )

    for row in rows:
        # Only while free: of two messages sending one file at once, the second copies.
        linked = conn.execute(
            update(attachments)
            .where(attachments.c.id == row.id, attachments.c.message_id.is_(None))
            .values(conversation_id=conversation.id, message_id=message_id)
        ).rowcount
        if linked:
            out.append(placed(row))
            continue
        current = get_attachment(conn, row.public_id)
        if current is None:
            raise NotFound(f"no such attachment: {row.public_id}")
        copy = insert_attachment(
            conn,
            user_id=current.user_id,
            conversation=conversation,
            filename=current.filename,
            mime_type=current.mime_type,
            size=current.size,
            sha256=current.sha256,
        )
        conn.execute(
            update(attachments).where(attachments.c.id == copy.id).values(message_id=message_id)
        )
        out.append(placed(copy))
    return out


def of_messages(conn: Connection, message_ids: Sequence[int]) -> dict[int, list[AttachmentRow]]:
    """The files on each of ``message_ids`` (those that have any), in upload order."""
    found: dict[int, list[AttachmentRow]] = {}
    for start in range(0, len(message_ids), _CHUNK):
        chunk = list(message_ids[start : start + _CHUNK])
        for row in conn.execute(_ON_MESSAGES, {"ids": chunk}):
            found.setdefault(row.message_id, []).append(_row(row))
    return found


def on_messages_of(conn: Connection, conversation_id: int) -> dict[int, list[AttachmentRow]]:
    """The files on the messages of a conversation, by message id, in upload order."""
    found: dict[int, list[AttachmentRow]] = {}
    for row in conn.execute(_IN_CONVERSATION, {"conversation_id": conversation_id}):
        found.setdefault(row.message_id, []).append(_row(row))
    return found


def delete_attachment(conn: Connection, attachment_id: int) -> None:
    conn.execute(delete(attachments).where(attachments.c.id == attachment_id))


def conversation_blobs(conn: Connection, conversation_id: int) -> set[str]:
    """The blobs a conversation's attachments name: read before deleting it."""
    query = select(attachments.c.sha256).where(attachments.c.conversation_id == conversation_id)
    return set(conn.execute(query.distinct()).scalars())


def referenced(conn: Connection, sha256: str) -> bool:
    """Whether any attachment row, or any document (``store.documents``: they share the
    blob directory), still names the blob."""
    query = select(attachments.c.id).where(attachments.c.sha256 == sha256).limit(1)
    return conn.execute(query).first() is not None or documents.referenced(conn, sha256)


def unreferenced(conn: Connection, hashes: Iterable[str]) -> set[str]:
    """Those of ``hashes`` that no attachment row and no document names any more."""
    wanted = sorted(set(hashes))
    named: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        query = select(attachments.c.sha256).where(attachments.c.sha256.in_(chunk)).distinct()
        named.update(conn.execute(query).scalars())
    named |= documents.named(conn, set(wanted) - named)
    return set(wanted) - named


def _select() -> Select[Any]:
    return (
        select(
            attachments,
            conversations.c.public_id.label("conversation_public_id"),
            messages.c.public_id.label("message_public_id"),
        )
        .outerjoin(conversations, conversations.c.id == attachments.c.conversation_id)
        .outerjoin(messages, messages.c.id == attachments.c.message_id)
    )


# Built once: loading a conversation runs one of these, and building the statement each
# time cost five times what running it does.
_IN_CONVERSATION = (
    _select()
    .where(
        attachments.c.conversation_id == bindparam("conversation_id"),
        attachments.c.message_id.is_not(None),
    )
    .order_by(attachments.c.id)
)
_ON_MESSAGES = (
    _select()
    .where(attachments.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(attachments.c.id)
)


def _row(row: Any) -> AttachmentRow:
    created = utc(row.created_at)
    return AttachmentRow(
        id=row.id,
        public_id=row.public_id,
        user_id=row.user_id,
        conversation_id=row.conversation_id,
        conversation_public_id=row.conversation_public_id,
        message_id=row.message_id,
        message_public_id=row.message_public_id,
        filename=row.filename,
        mime_type=row.mime_type,
        size=row.size,
        sha256=row.sha256,
        created_at=created,
    )
