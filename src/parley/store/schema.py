"""The SQLAlchemy Core schema: the models that migrations are validated against.

Invariants:
- integer primary keys are internal; every table reachable from the API has a UUID
  ``public_id`` and only that is ever exposed;
- a message is one row, linked to its parent; ``chain_hash`` identifies the message with
  its whole history, so a client re-sending the history matches rows already stored;
- every upstream attempt is one ``request_log`` row; attempts of one client request share
  ``chain_id``; an assistant message's ``responses`` row points at the attempt that made it;
- owner columns (``user_id``, ``api_key_id``) are nullable until users arrive.

Migrations never import this module: revisions carry their own table snapshots.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

TS = DateTime(timezone=True)

request_log = Table(
    "request_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    Column("chain_id", Uuid, nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("created_at", TS, nullable=False, index=True),
    Column("success", Boolean, nullable=False),
    Column("status_code", Integer),
    Column("response_time_ms", Float),
    Column("endpoint", String(32), nullable=False),
    Column("client_protocol", String(32), nullable=False),
    Column("provider", String(128), nullable=False),
    Column("model", String(255), nullable=False),
    Column("model_requested", String(255), nullable=False),
    Column("origin", String(255)),
    Column("is_streaming", Boolean, nullable=False),
    Column("max_tokens", Integer),
    Column("temperature", Float),
    Column("top_p", Float),
    Column("message_count", Integer, nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("cached_tokens", Integer),
    Column("reasoning_tokens", Integer),
    Column("finish_reason", String(64)),
    Column("time_to_first_token_ms", Float),
    Column("time_to_last_token_ms", Float),
    Column("tokens_per_second", Float),
    Column("error_type", String(64)),
    Column("error_message", Text),
    Column("cost_usd", Float),
    Column("upstream_id", String(255)),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="SET NULL"),
        index=True,
    ),
)

conversations = Table(
    "conversations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False, index=True),
    Column("title", Text),
    Column("source", String(32), nullable=False),
    Column("default_model", String(255)),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("parent_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"), index=True),
    Column("role", String(32), nullable=False),
    Column("content", Text, nullable=False),
    # The whole message in OpenAI wire shape (content parts, tool calls, names), as JSON.
    Column("payload", Text, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("chain_hash", String(64), nullable=False),
    # The chain hash's first 64 bits: what the continuation lookup is indexed by. A hash
    # is a random key, so each insert dirties a random index page; an 8-byte key keeps
    # that index small (measured: ~70 us less per exchange than indexing the hex text).
    # Matches are confirmed against the full ``chain_hash``.
    Column("chain_key", BigInteger, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("request_id", Integer, ForeignKey("request_log.id", ondelete="SET NULL"), index=True),
    Index("ix_messages_chain_key", "chain_key"),
)

responses = Table(
    "responses",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "message_id",
        Integer,
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("request_id", Integer, ForeignKey("request_log.id", ondelete="SET NULL"), index=True),
    Column("model_used", String(255), nullable=False),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("total_tokens", Integer),
    Column("completion_time_ms", Float),
    Column("finish_reason", String(64)),
    Column("created_at", TS, nullable=False),
)
