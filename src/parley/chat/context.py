"""The context sent upstream for a chat API answer: a message with its files' content
parts after its text, and the retrieved documents in the system message.

Blobs that are gone or unreadable are the store's fault (``StoreError``), never the
caller's; their bytes are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from parley.chat.attachments import Attachments
from parley.domain.messages import Message
from parley.errors import NotFound, StoreError
from parley.store.attachments import AttachmentRow

log = logging.getLogger(__name__)

Part = dict[str, Any]


def parts_of(files: Attachments, rows: Sequence[AttachmentRow]) -> list[Part]:
    """The content parts of ``rows``; a blob that is gone or cannot be read (a disk
    error, bytes that are no longer what was uploaded) is the store's fault, not the
    caller's: a ``StoreError`` that says so, never an unexplained 500."""
    parts: list[Part] = []
    for row in rows:
        try:
            parts.extend(files.parts([row]))
        except NotFound:
            raise StoreError(
                "a file attached to this conversation is missing from the blob store"
            ) from None
        except (OSError, ValueError) as exc:
            # The reason only: a decoding error's text holds the file's bytes.
            reason = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
            log.error("blob %s of an attachment cannot be read: %s", row.sha256, reason)
            raise StoreError(
                "a file attached to this conversation cannot be read from the blob store"
            ) from None
    return parts


def carrying(message: Message, parts: Sequence[Part]) -> Message:
    """``message`` with the content parts of its files after its text (an empty text
    is left out: a message may be its files alone)."""
    if not parts:
        return message
    content = message.content
    if isinstance(content, str):
        head: tuple[Any, ...] = ({"type": "text", "text": content},) if content else ()
    else:
        head = tuple(content or ())
    return replace(message, content=(*head, *parts))


def with_sources(context: tuple[Message, ...], text: str) -> tuple[Message, ...]:
    """``context`` with ``text`` (the retrieved sources) at the end of its system message,
    or in a system message of its own when it has none (or one that is not plain text)."""
    if context and context[0].role == "system" and isinstance(context[0].content, str):
        head = context[0]
        return (replace(head, content=f"{head.content}\n\n{text}"), *context[1:])
    if context and context[0].role == "system":
        return (context[0], Message("system", text), *context[1:])
    return (Message("system", text), *context)
