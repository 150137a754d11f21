"""What the exchange writer reads before it plans a batch, and the chain key it indexes by.

``store.exchanges`` writes; this module holds its reads, each one query (per 500 values)
for a whole batch:

- ``stored_matches``: the stored messages a request may continue from, found by the first
  64 bits of their chain hash (``chain_key``, indexed) and confirmed against the whole
  hash. Only messages after an assistant message are ever continued from, so the others
  are stored with ``UNINDEXED``, which the partial index ``ix_messages_chain_key`` leaves
  out (migration 0010);
- ``unanswerable``: chat-API exchanges whose conversation or parent message was deleted
  while the answer was being made (the writer then records their attempts only);
- ``stored_chains``: which exchanges' chain ids are already in the request log (a batch
  whose COMMIT failed may have committed; a journal replay skips what is stored).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import Column, Connection, Dialect, select

from parley.domain.exchange import Exchange
from parley.store.bulk import placeholder
from parley.store.schema import conversations, messages, request_log

# Bound parameters per IN (...) lookup: far below SQLite's and PostgreSQL's limits.
_LOOKUP_CHUNK = 500

# Who may continue a conversation: the user, or the API key when there is no user.
Owner = tuple[str, int | None]
# A stored message a request may continue from: (id, conversation id, conversation public id).
Stored = tuple[int, int, uuid.UUID]

# The chain key of a message no request can continue from: left out of the lookup index.
UNINDEXED = 0


def owner(user_id: int | None, api_key_id: int | None) -> Owner:
    return ("user", user_id) if user_id is not None else ("key", api_key_id)


def chain_key(chain: str) -> int:
    """The first 64 bits of a chain hash as a signed integer (the indexed lookup key),
    never ``UNINDEXED``: a hash whose first 64 bits are zero gets 1 (keys only narrow
    the lookup; matches are confirmed against the whole hash)."""
    value = int(chain[:16], 16)
    return (value - (1 << 64) if value >= 1 << 63 else value) or 1


def stored_matches(conn: Connection, wanted: set[str]) -> dict[tuple[str, Owner], Stored]:
    """The newest stored message per (chain hash, owner) for the chain hashes ``wanted``."""
    found: dict[tuple[str, Owner], Stored] = {}
    if not wanted:
        return found
    ordered = sorted({chain_key(chain) for chain in wanted})
    public_id_of = _public_id_processor(conn.dialect)
    mark = placeholder(conn.dialect.paramstyle)
    # Straight to the driver: building and caching the Core statement cost more than
    # running it, once per group commit.
    cursor = conn.connection.cursor()
    try:
        for start in range(0, len(ordered), _LOOKUP_CHUNK):
            keys = ordered[start : start + _LOOKUP_CHUNK]
            cursor.execute(_MATCHES_SQL.format(marks=", ".join([mark] * len(keys))), keys)
            for (
                chain,
                message_id,
                conv_id,
                conv_public_id,
                user_id,
                api_key_id,
            ) in cursor.fetchall():
                if chain not in wanted:
                    continue  # another chain with the same 64-bit key
                key = (chain, owner(user_id, api_key_id))
                if key not in found or found[key][0] < message_id:
                    public_id = public_id_of(conv_public_id) if public_id_of else conv_public_id
                    found[key] = (message_id, conv_id, public_id)
    finally:
        cursor.close()
    return found


_MATCHES_SQL = (
    "SELECT m.chain_hash, m.id, m.conversation_id, c.public_id, c.user_id, c.api_key_id "
    "FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id "
    # The partial index's own condition, spelled out so that both databases use it.
    "WHERE m.chain_key IN ({marks}) AND m.chain_key <> 0"
)


@functools.lru_cache(maxsize=4)
def _public_id_processor(dialect: Dialect) -> Callable[[Any], Any] | None:
    """How the dialect turns a stored public id into a ``uuid.UUID`` (None: the driver
    already does)."""
    processor: Callable[[Any], Any] | None = conversations.c.public_id.type.dialect_impl(
        dialect
    ).result_processor(dialect, None)
    return processor


def unanswerable(conn: Connection, batch: Sequence[Exchange]) -> set[int]:
    """The chat-API exchanges (by ``id()``) whose conversation or parent message is gone:
    deleted by their owner while the answer was being made. Queries only for a batch that
    holds chat-API exchanges."""
    targets = [(id(e), e.reply_to) for e in batch if e.reply_to is not None]
    if not targets:
        return set()
    convs = _found(conn, conversations.c.id, {t.conversation_id for _, t in targets})
    parents = _found(
        conn,
        messages.c.id,
        {t.parent_message_id for _, t in targets if t.parent_message_id is not None},
    )
    return {
        key
        for key, t in targets
        if t.conversation_id not in convs
        or (t.parent_message_id is not None and t.parent_message_id not in parents)
    }


def stored_chains(conn: Connection, exchanges: Sequence[Exchange]) -> set[uuid.UUID]:
    """The chain ids of ``exchanges`` already in the request log: those committed (every
    exchange with an attempt has its chain id there once committed)."""
    chains = {e.chain_id for e in exchanges if e.chain_id is not None and e.attempts}
    return _found(conn, request_log.c.chain_id, chains)


def _found(conn: Connection, column: Column[Any], values: Collection[Any]) -> set[Any]:
    """Which of ``values`` ``column`` holds."""
    wanted = list(values)
    found: set[Any] = set()
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        part = wanted[start : start + _LOOKUP_CHUNK]
        found.update(conn.execute(select(column).where(column.in_(part))).scalars())
    return found
