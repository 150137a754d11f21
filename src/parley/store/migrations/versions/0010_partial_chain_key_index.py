"""The chain-key index holds only messages a request can continue from.

Why: a request continues a stored conversation only from a message that comes after an
assistant message (``store.exchanges``), so the continuation lookup never reads the index
entries of a new chat's system and first user message. Their keys are random (hash
bits), so each of those inserts dirtied a random index page: two of three entries for a
one-shot request, and the part of the index that grows fastest with traffic that never
continues a conversation. The writer now stores those messages with chain key 0, and the
index leaves key 0 out (a partial index, ``WHERE chain_key <> 0``). Measured on a
one-exchange commit: 31.9 write-ahead-log frames against 33.7.

No row changes: messages written before keep their keys and their entries (the rebuilt
index holds them all, as before), so every conversation stays continuable. Rebuilding
the index reads the messages table once; writes wait meanwhile (SQLite's write lock,
PostgreSQL's plain CREATE INDEX). Downgrade rebuilds the full index: the rows with key 0
then get entries again, harmlessly.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_messages_chain_key", table_name="messages")
    where = sa.text("chain_key <> 0")
    op.create_index(
        "ix_messages_chain_key",
        "messages",
        ["chain_key"],
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index("ix_messages_chain_key", table_name="messages")
    op.create_index("ix_messages_chain_key", "messages", ["chain_key"])
