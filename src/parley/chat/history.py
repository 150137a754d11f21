"""Export and import of whole histories: the store's trees through ``chat.transfer``.

The one implementation behind ``GET /api/export``, ``GET /api/conversations/{id}/export``,
``POST /api/import`` and ``parley export`` / ``parley import``. Functions are synchronous
(database I/O): the server calls them through ``asyncio.to_thread``. An import is one
transaction: every conversation of the document lands, or none does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import sqlalchemy

from parley.chat import transfer
from parley.domain.transfer import ConversationTree
from parley.errors import InvalidRequest, NotFound
from parley.store import transfer as repo
from parley.store.attachments import conversation_ref
from parley.store.engine import writer_connection

EXPORT_FORMATS = ("json", "jsonl")
IMPORT_FORMATS = ("parley", "chatgpt")
MEDIA_TYPES = {"json": "application/json", "jsonl": "application/x-ndjson"}


def conversation_id(
    engine: sqlalchemy.Engine, public_id: uuid.UUID, may_see: Callable[[int | None], bool]
) -> int:
    """The conversation's id; ``NotFound`` when it does not exist or is not the caller's."""
    with engine.connect() as conn:
        ref = conversation_ref(conn, public_id)
    if ref is None or not may_see(ref.user_id):
        raise NotFound(f"no such conversation: {public_id}")
    return ref.id


def user_conversations(engine: sqlalchemy.Engine, user_id: int | None) -> list[int]:
    """Every conversation of ``user_id`` (None: the local admin's, which have no owner)."""
    with engine.connect() as conn:
        return repo.conversation_ids_of(conn, user_id)


def user_id_by_name(engine: sqlalchemy.Engine, name: str) -> int:
    with engine.connect() as conn:
        found = repo.user_id_by_name(conn, name)
    if found is None:
        raise NotFound(f"no user with username or email {name!r}")
    return found


def export(engine: sqlalchemy.Engine, conversation_ids: Sequence[int], fmt: str) -> bytes:
    """The conversations as ``fmt``: ``json`` (parley's, every branch) or ``jsonl``."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}: use json or jsonl", "format")
    with engine.connect() as conn:
        trees = repo.read_trees(conn, conversation_ids)
    return render(trees, fmt)


def render(trees: Sequence[ConversationTree], fmt: str) -> bytes:
    if fmt == "jsonl":
        return transfer.to_openai_jsonl(trees)
    return transfer.to_parley(trees, datetime.now(UTC))


def import_document(
    engine: sqlalchemy.Engine, raw: bytes, fmt: str | None, user_id: int | None
) -> list[uuid.UUID]:
    """Import a parley export or a ChatGPT ``conversations.json`` (``fmt`` None: detected)
    for ``user_id``; the new conversations' public ids."""
    if fmt is not None and fmt not in IMPORT_FORMATS:
        raise InvalidRequest(f"unknown import format {fmt!r}: use parley or chatgpt", "format")
    trees = transfer.import_trees(transfer.parse_json(raw), fmt)
    with writer_connection(engine) as conn, conn.begin():
        return repo.import_trees(conn, trees, user_id)
