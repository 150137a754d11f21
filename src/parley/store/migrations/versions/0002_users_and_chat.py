"""Users, API keys, web sessions, provider configurations, BYOK keys and attachments; the
chat columns of conversations and messages.

Why: issue 4 gives parley identities (users with roles, hashed API keys, cookie
sessions), provider configurations kept in the database with their keys encrypted, users'
own provider keys (BYOK), attachments stored as content-addressed blobs, and the chat
API's view of a conversation (archived, pinned, active, its configuration and system
prompt, the branch being continued), with an index for the sidebar. Owner columns of
``request_log``, ``conversations`` and ``messages`` stay plain integers without foreign
keys: the request log must outlive the users and keys it names (accounting), and deletes
of a user's history are explicit. An attachment without an owner is the local admin's.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

The tables below are a snapshot written out here, not imported from ``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("full_name", sa.Text()),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("preferences", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("last_active_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("public_id", name="uq_users_public_id"),
        sa.UniqueConstraint("email", name="uq_users_email"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS),
        sa.Column("revoked_at", TS),
        sa.Column("last_used_at", TS),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_api_keys_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("public_id", name="uq_api_keys_public_id"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_web_sessions_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_web_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_web_sessions_token_hash"),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_table(
        "provider_configs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("system_prompt", sa.Text()),
        sa.Column("temperature", sa.Float()),
        sa.Column("max_tokens", sa.Integer()),
        sa.Column("top_p", sa.Float()),
        sa.Column("frequency_penalty", sa.Float()),
        sa.Column("presence_penalty", sa.Float()),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("base_url", sa.Text()),
        sa.Column("api_key_ciphertext", sa.Text()),
        sa.Column("extra", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_provider_configs"),
        sa.UniqueConstraint("public_id", name="uq_provider_configs_public_id"),
        sa.UniqueConstraint("name", name="uq_provider_configs_name"),
    )
    op.create_table(
        "provider_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_provider_keys_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_provider_keys"),
        sa.UniqueConstraint("user_id", "provider", name="uq_provider_keys_user_id"),
    )
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(
            sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("is_active", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.add_column(sa.Column("system_prompt", sa.Text()))
        batch.add_column(sa.Column("provider_config_id", sa.Integer()))
        batch.add_column(sa.Column("active_leaf_id", sa.Integer()))
        batch.create_foreign_key(
            "fk_conversations_provider_config_id_provider_configs",
            "provider_configs",
            ["provider_config_id"],
            ["id"],
            ondelete="SET NULL",
        )
    # The sidebar: a user's conversations (archived apart), pinned first, then newest
    # activity, then the public id (pages are keyed by the last three).
    op.create_index(
        "ix_conversations_sidebar",
        "conversations",
        ["user_id", "archived", "pinned", "updated_at", "public_id"],
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("user_id", sa.Integer()))
        batch.add_column(sa.Column("api_key_id", sa.Integer()))
    op.create_table(
        "attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        # NULL: the local admin's (local mode or the master key), as for conversations.
        sa.Column("user_id", sa.Integer()),
        sa.Column("conversation_id", sa.Integer()),
        sa.Column("message_id", sa.Integer()),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("mime_type", sa.String(128), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_attachments_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_attachments_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name="fk_attachments_message_id_messages",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_attachments"),
        sa.UniqueConstraint("public_id", name="uq_attachments_public_id"),
    )
    op.create_index("ix_attachments_user_id", "attachments", ["user_id"])
    op.create_index("ix_attachments_conversation_id", "attachments", ["conversation_id"])
    op.create_index("ix_attachments_message_id", "attachments", ["message_id"])
    op.create_index("ix_attachments_sha256", "attachments", ["sha256"])


def downgrade() -> None:
    op.drop_table("attachments")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("api_key_id")
        batch.drop_column("user_id")
    op.drop_index("ix_conversations_sidebar", "conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_constraint(
            "fk_conversations_provider_config_id_provider_configs", type_="foreignkey"
        )
        for column in (
            "active_leaf_id",
            "provider_config_id",
            "system_prompt",
            "is_active",
            "pinned",
            "archived",
        ):
            batch.drop_column(column)
    op.drop_table("provider_keys")
    op.drop_table("provider_configs")
    op.drop_table("web_sessions")
    op.drop_table("api_keys")
    op.drop_table("users")
