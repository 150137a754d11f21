"""Export and import SQL: whole conversation trees out of the store and back in.

Reads return ``ConversationTree`` values (``domain.transfer``) keyed by public ids.
``import_trees`` writes conversations, messages and (for answers whose model is known)
responses rows in the caller's write transaction, so an import lands whole or not at all.
Imported rows get new public ids and ``source = "import"``; each message's content hash
and chain hash are computed exactly as the exchange writer computes them, so a client
that continues an imported thread over ``/v1`` matches it like any other.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, or_, select

from parley.domain.messages import Message, chain_hash, content_hash_of
from parley.domain.times import utc
from parley.domain.transfer import ConversationTree, TreeMessage, message_from_wire
from parley.store.bulk import PublicIds, assign_ids, bulk_insert
from parley.store.exchange_lookups import chain_key
from parley.store.history_rows import insert_conversations, insert_messages
from parley.store.schema import conversations, messages, responses, users

_CHUNK = 500
SOURCE = "import"


def user_id_by_name(conn: Connection, name: str) -> int | None:
    """The id of the user whose username or email is ``name``."""
    query = select(users.c.id).where(
        or_(users.c.username == name, users.c.email == name.strip().lower())
    )
    return conn.execute(query).scalar_one_or_none()


def conversation_ids_of(conn: Connection, user_id: int | None) -> list[int]:
    """A user's conversations, oldest first (None: those without an owner, the local
    admin's)."""
    owner = (
        conversations.c.user_id.is_(None) if user_id is None else conversations.c.user_id == user_id
    )
    query = select(conversations.c.id).where(owner).order_by(conversations.c.id)
    return list(conn.execute(query).scalars())


def read_trees(conn: Connection, conversation_ids: Sequence[int]) -> list[ConversationTree]:
    """The conversations with every message of every branch, in the order asked."""
    trees: list[ConversationTree] = []
    for start in range(0, len(conversation_ids), _CHUNK):
        trees.extend(_read_chunk(conn, conversation_ids[start : start + _CHUNK]))
    return trees


def _read_chunk(conn: Connection, ids: Sequence[int]) -> list[ConversationTree]:
    convs = {
        row.id: row
        for row in conn.execute(select(conversations).where(conversations.c.id.in_(ids)))
    }
    query = (
        select(
            messages.c.id,
            messages.c.public_id,
            messages.c.conversation_id,
            messages.c.parent_id,
            messages.c.payload,
            messages.c.created_at,
            responses.c.model_used,
            responses.c.finish_reason,
            responses.c.notice,
        )
        .outerjoin(responses, responses.c.message_id == messages.c.id)
        .where(messages.c.conversation_id.in_(ids))
        .order_by(messages.c.conversation_id, messages.c.id)
    )
    keys: dict[int, str] = {}
    nodes: dict[int, list[TreeMessage]] = {conv_id: [] for conv_id in convs}
    for row in conn.execute(query):
        key = str(row.public_id)
        keys[row.id] = key
        message, reasoning = message_from_wire(orjson.loads(row.payload), f"stored message {key}")
        nodes[row.conversation_id].append(
            TreeMessage(
                key=key,
                parent=None if row.parent_id is None else keys[row.parent_id],
                message=message,
                created_at=utc(row.created_at),
                model=row.model_used,
                finish_reason=row.finish_reason,
                reasoning=reasoning,
                notice=row.notice,
            )
        )
    out = []
    for conv_id in ids:
        conv = convs.get(conv_id)
        if conv is None:
            continue
        out.append(
            ConversationTree(
                key=str(conv.public_id),
                title=conv.title,
                created_at=utc(conv.created_at),
                updated_at=utc(conv.updated_at),
                messages=tuple(nodes[conv_id]),
                source=conv.source,
                default_model=conv.default_model,
                system_prompt=conv.system_prompt,
                archived=conv.archived,
                pinned=conv.pinned,
                active_leaf=keys.get(conv.active_leaf_id) if conv.active_leaf_id else None,
            )
        )
    return out


def import_trees(
    conn: Connection, trees: Sequence[ConversationTree], user_id: int | None
) -> list[uuid.UUID]:
    """Insert ``trees`` for ``user_id`` (None: the local admin); their new public ids.

    On SQLite the transaction must hold the write lock (``writer_connection``): ids are
    reserved before the inserts.
    """
    ids = PublicIds()
    conv_rows: list[dict[str, Any]] = []
    message_rows: list[dict[str, Any]] = []
    # Per message row: the row of its parent (or None); per conversation: its leaf row.
    parents: list[dict[str, Any] | None] = []
    leaves: list[dict[str, Any] | None] = []
    answers: list[tuple[dict[str, Any], TreeMessage]] = []
    for tree in trees:
        conv_row = {
            "public_id": ids.new(),
            "created_at": utc(tree.created_at),
            "updated_at": utc(tree.updated_at),
            "title": tree.title,
            "source": SOURCE,
            "default_model": _clip(tree.default_model, 255),
            "user_id": user_id,
            "api_key_id": None,
            "archived": tree.archived,
            "pinned": tree.pinned,
            "is_active": True,
            "system_prompt": tree.system_prompt,
            "provider_config_id": None,
        }
        conv_rows.append(conv_row)
        by_key: dict[str, dict[str, Any]] = {}
        for node in tree.messages:
            parent = by_key[node.parent] if node.parent is not None else None
            row = _message_row(node, parent, conv_row, user_id, ids)
            by_key[node.key] = row
            message_rows.append(row)
            parents.append(parent)
            if node.model is not None:
                answers.append((row, node))
        leaves.append(by_key.get(tree.active_leaf) if tree.active_leaf else None)

    assign_ids(conn, [(conversations, conv_rows), (messages, message_rows)])
    for conv_row, leaf in zip(conv_rows, leaves, strict=True):
        conv_row["active_leaf_id"] = leaf["id"] if leaf is not None else None
    for row, parent in zip(message_rows, parents, strict=True):
        row["parent_id"] = parent["id"] if parent is not None else None
        row["conversation_id"] = row.pop("_conversation")["id"]
    insert_conversations(conn, conv_rows)
    insert_messages(conn, message_rows)
    bulk_insert(
        conn,
        responses,
        [
            {
                "message_id": row["id"],
                "request_id": None,
                "model_used": _clip(node.model, 255),
                "prompt_tokens": None,
                "completion_tokens": None,
                "total_tokens": None,
                "completion_time_ms": None,
                "finish_reason": _clip(node.finish_reason, 64),
                "created_at": row["created_at"],
                "notice": node.notice,
            }
            for row, node in answers
        ],
    )
    return [row["public_id"] for row in conv_rows]


def _message_row(
    node: TreeMessage,
    parent: dict[str, Any] | None,
    conv_row: dict[str, Any],
    user_id: int | None,
    ids: PublicIds,
) -> dict[str, Any]:
    payload, content_hash = stored_form(node.message, node.reasoning)
    chain = chain_hash(parent["chain_hash"] if parent is not None else None, content_hash)
    return {
        "public_id": ids.new(),
        "_conversation": conv_row,
        "role": node.message.role,
        "content": node.message.text(),
        "payload": payload,
        "content_hash": content_hash,
        "chain_hash": chain,
        "chain_key": chain_key(chain),
        "created_at": utc(node.created_at),
        "request_id": None,
        "user_id": user_id,
        "api_key_id": None,
    }


def stored_form(message: Message, reasoning: str | None) -> tuple[str, str]:
    """A message's stored payload and content hash, as the exchange writer makes them:
    the canonical JSON (what the hash is of), or, with tool calls or reasoning, the
    canonical dict with its arguments as sent and the reasoning beside it."""
    canonical = message.canonical_json()
    if not message.tool_calls and not reasoning:
        return canonical.decode(), content_hash_of(canonical)
    payload = message.canonical()
    if reasoning:
        payload["reasoning_content"] = reasoning
    return orjson.dumps(payload).decode(), content_hash_of(canonical)


def _clip(value: str | None, length: int) -> str | None:
    return None if value is None else value[:length]
