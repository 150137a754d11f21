"""Initial schema: the request log, conversations, messages and responses.

Why: parley's first durable store. Every upstream attempt is a ``request_log`` row (attempts
of one client request share ``chain_id``); a chat is a ``conversations`` row and one
``messages`` row per message, linked to its parent and chain-hashed so that a stateless
client re-sending its history adds only the new tail; an assistant message's ``responses``
row points at the attempt that produced it. Integer keys stay internal; ``public_id``
UUIDs are what clients see. Owner columns (``user_id``, ``api_key_id``) carry no foreign
key yet: the users tables arrive in a later revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

The tables below are a snapshot written out here, not imported from ``parley.store.schema``:
a revision must keep meaning what it meant when it shipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("title", sa.Text()),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("default_model", sa.String(255)),
        sa.Column("user_id", sa.Integer()),
        sa.Column("api_key_id", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
        sa.UniqueConstraint("public_id", name="uq_conversations_public_id"),
    )
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])

    op.create_table(
        "request_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("chain_id", sa.Uuid(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("response_time_ms", sa.Float()),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("client_protocol", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("model_requested", sa.String(255), nullable=False),
        sa.Column("origin", sa.String(255)),
        sa.Column("is_streaming", sa.Boolean(), nullable=False),
        sa.Column("max_tokens", sa.Integer()),
        sa.Column("temperature", sa.Float()),
        sa.Column("top_p", sa.Float()),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("total_tokens", sa.Integer()),
        sa.Column("cached_tokens", sa.Integer()),
        sa.Column("reasoning_tokens", sa.Integer()),
        sa.Column("finish_reason", sa.String(64)),
        sa.Column("time_to_first_token_ms", sa.Float()),
        sa.Column("time_to_last_token_ms", sa.Float()),
        sa.Column("tokens_per_second", sa.Float()),
        sa.Column("error_type", sa.String(64)),
        sa.Column("error_message", sa.Text()),
        sa.Column("cost_usd", sa.Float()),
        sa.Column("upstream_id", sa.String(255)),
        sa.Column("user_id", sa.Integer()),
        sa.Column("api_key_id", sa.Integer()),
        sa.Column("conversation_id", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_request_log"),
        sa.UniqueConstraint("public_id", name="uq_request_log_public_id"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_request_log_conversation_id_conversations",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_request_log_chain_id", "request_log", ["chain_id"])
    op.create_index("ix_request_log_created_at", "request_log", ["created_at"])
    op.create_index("ix_request_log_conversation_id", "request_log", ["conversation_id"])

    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer()),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("chain_hash", sa.String(64), nullable=False),
        sa.Column("chain_key", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("request_id", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("public_id", name="uq_messages_public_id"),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_messages_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["messages.id"],
            name="fk_messages_parent_id_messages",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["request_log.id"],
            name="fk_messages_request_id_request_log",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_messages_conversation_id", "messages", ["conversation_id"])
    op.create_index("ix_messages_parent_id", "messages", ["parent_id"])
    op.create_index("ix_messages_request_id", "messages", ["request_id"])
    op.create_index("ix_messages_chain_key", "messages", ["chain_key"])

    op.create_table(
        "responses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.Integer()),
        sa.Column("model_used", sa.String(255), nullable=False),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("total_tokens", sa.Integer()),
        sa.Column("completion_time_ms", sa.Float()),
        sa.Column("finish_reason", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
        sa.UniqueConstraint("message_id", name="uq_responses_message_id"),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name="fk_responses_message_id_messages",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["request_log.id"],
            name="fk_responses_request_id_request_log",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_responses_request_id", "responses", ["request_id"])


def downgrade() -> None:
    # Children first: every foreign key points at a table dropped after it.
    op.drop_table("responses")
    op.drop_table("messages")
    op.drop_table("request_log")
    op.drop_table("conversations")
