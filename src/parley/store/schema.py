"""The SQLAlchemy Core schema: the models that migrations are validated against.

Invariants:
- integer primary keys are internal; every table reachable from the API has a UUID
  ``public_id`` and only that is ever exposed;
- a message is one row, linked to its parent; ``chain_hash`` identifies the message with
  its whole history, so a client re-sending the history matches rows already stored;
- every upstream attempt is one ``request_log`` row; attempts of one client request share
  ``chain_id``; an assistant message's ``responses`` row points at the attempt that made it;
- owner columns (``user_id``, ``api_key_id``) of the request log, conversations and
  messages are plain integers without foreign keys: the request log outlives the users and
  keys it names (accounting), and deleting a user's history is explicit;
- secrets are never stored in plain text: passwords as argon2 hashes, API keys and session
  tokens as SHA-256 (they are random, high-entropy strings), provider keys encrypted.

Migrations never import this module: revisions carry their own table snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

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
    UniqueConstraint,
    Uuid,
    false,
    text,
    true,
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
    # Migration 0007: the tokens are parley's estimate (a stream cut off before its usage).
    Column("usage_estimated", Boolean, nullable=False, server_default=false()),
    # Migration 0008: when the attempt ended (``created_at`` is when it started). NULL
    # only on rows written before that migration.
    Column("finished_at", TS),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="SET NULL"),
        index=True,
    ),
    # A caller's own listing reads a key's or user's recent rows.
    Index("ix_request_log_key_time", "api_key_id", "created_at"),
    Index("ix_request_log_user_time", "user_id", "created_at"),
    # Tokens-per-minute limits read the rows a key or user finished over the last minute
    # (migration 0008). Partial: a row without a key or a user costs no entry in them.
    Index(
        "ix_request_log_key_finished",
        "api_key_id",
        "finished_at",
        sqlite_where=text("api_key_id IS NOT NULL"),
        postgresql_where=text("api_key_id IS NOT NULL"),
    ),
    Index(
        "ix_request_log_user_finished",
        "user_id",
        "finished_at",
        sqlite_where=text("user_id IS NOT NULL"),
        postgresql_where=text("user_id IS NOT NULL"),
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
    Column("archived", Boolean, nullable=False, server_default=false()),
    Column("pinned", Boolean, nullable=False, server_default=false()),
    Column("is_active", Boolean, nullable=False, server_default=true()),
    Column("system_prompt", Text),
    Column(
        "provider_config_id",
        Integer,
        ForeignKey("provider_configs.id", ondelete="SET NULL"),
    ),
    # The last message of the branch the chat continues (None: the newest leaf).
    Column("active_leaf_id", Integer),
    # Migration 0012: the message a generated title was made from (None: no title, or one
    # a user set). Deleting that message resets the title (``delete_message``).
    Column("title_message_id", Integer),
    # The sidebar: a user's conversations (archived apart), pinned first, then newest
    # activity, then the public id; pages are keyed by the last three (store.conversations).
    Index("ix_conversations_sidebar", "user_id", "archived", "pinned", "updated_at", "public_id"),
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
    # Matches are confirmed against the full ``chain_hash``. 0 for a message no request
    # can continue from (nothing before it is an assistant message: a new chat's system
    # and first user message), which the partial index leaves out (migration 0010).
    Column("chain_key", BigInteger, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("request_id", Integer, ForeignKey("request_log.id", ondelete="SET NULL"), index=True),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
    Index(
        "ix_messages_chain_key",
        "chain_key",
        sqlite_where=text("chain_key <> 0"),
        postgresql_where=text("chain_key <> 0"),
    ),
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
    # Migration 0011: why the answer was given without the conversation's documents
    # (their search failed), as the chat API told its client; NULL for any other answer.
    Column("notice", Text),
)

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    # Stored lower-cased: unique whatever case the user types.
    Column("email", String(320), nullable=False, unique=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("full_name", Text),
    Column("password_hash", Text, nullable=False),
    Column("role", String(16), nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("preferences", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Column("last_active_at", TS),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("name", String(128), nullable=False),
    # The first characters of the key, shown so that a user can tell keys apart.
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS),
    Column("revoked_at", TS),
    Column("last_used_at", TS),
)

web_sessions = Table(
    "web_sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("csrf_token", String(64), nullable=False),
    Column(
        "user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("created_at", TS, nullable=False),
    Column("expires_at", TS, nullable=False),
    Column("last_seen_at", TS, nullable=False),
)

provider_configs = Table(
    "provider_configs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("model", String(255), nullable=False),
    Column("system_prompt", Text),
    Column("temperature", Float),
    Column("max_tokens", Integer),
    Column("top_p", Float),
    Column("frequency_penalty", Float),
    Column("presence_penalty", Float),
    Column("is_active", Boolean, nullable=False),
    Column("base_url", Text),
    Column("api_key_ciphertext", Text),
    # Extra request parameters, as JSON.
    Column("extra", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
)

provider_keys = Table(
    "provider_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # The provider name (as configured) the key is for.
    Column("provider", String(128), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    UniqueConstraint("user_id", "provider"),
)

attachments = Table(
    "attachments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    # NULL: the local admin's (local mode or the master key), as for conversations.
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), index=True),
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        index=True,
    ),
    Column("message_id", Integer, ForeignKey("messages.id", ondelete="SET NULL"), index=True),
    # The name the user gave: metadata only, never a path.
    Column("filename", Text, nullable=False),
    Column("mime_type", String(128), nullable=False),
    Column("size", Integer, nullable=False),
    # The blob's name in the content-addressed blob directory.
    Column("sha256", String(64), nullable=False, index=True),
    Column("created_at", TS, nullable=False),
)

# Issue 6: rollups, HTTP metrics, limits.

# Hourly and daily tallies of the request log per series (store.rollups): the writer keeps
# them in the transaction that commits the rows, so reports never scan the raw log and
# retention of raw rows never loses a total.
metric_rollups = Table(
    "metric_rollups",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("period", String(8), nullable=False),  # "hour" | "day"
    Column("bucket_start", TS, nullable=False),
    # A digest of the dimensions below: NULLs never collide in a unique index.
    Column("series_key", String(32), nullable=False),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
    Column("provider", String(128), nullable=False),
    Column("model", String(255), nullable=False),
    Column("origin", String(255)),
    Column("success", Boolean, nullable=False),
    Column("error_type", String(64)),
    Column("requests", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cost_usd", Float, nullable=False),
    Column("priced", Integer, nullable=False),
    Column("latency_ms_sum", Float, nullable=False),
    Column("ttft_ms_sum", Float, nullable=False),
    Column("tps_sum", Float, nullable=False),
    # Sparse log-bucketed histograms as JSON (domain.histogram).
    Column("latency_ms_hist", Text, nullable=False),
    Column("ttft_ms_hist", Text, nullable=False),
    Column("tps_hist", Text, nullable=False),
    UniqueConstraint("period", "bucket_start", "series_key", name="uq_metric_rollups_bucket"),
    # Spend budgets read a key's or a user's day rows.
    Index("ix_metric_rollups_key", "api_key_id", "period", "bucket_start"),
    Index("ix_metric_rollups_user", "user_id", "period", "bucket_start"),
)

# One row per HTTP request parley served (sampled), written by the writer off the hot path.
http_metrics = Table(
    "http_metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("created_at", TS, nullable=False, index=True),
    # The route template (/api/conversations/{id}), never the raw path.
    Column("endpoint", String(255), nullable=False),
    Column("method", String(16), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response_time_ms", Float, nullable=False),
    Column("user_agent", String(512)),
    Column("client_ip", String(64)),
    Column("tags", Text),
    Column("error_message", Text),
    # Secrets redacted, large bodies truncated (server.http_metrics).
    Column("request_body", Text),
    Column("user_id", Integer),
    Column("api_key_id", Integer),
)

# Requests / tokens per minute and spend per day / month, per API key or per user.
limits = Table(
    "limits",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), unique=True),
    Column("api_key_id", Integer, ForeignKey("api_keys.id", ondelete="CASCADE"), unique=True),
    Column("requests_per_minute", Integer),
    Column("tokens_per_minute", Integer),
    Column("usd_per_day", Float),
    Column("usd_per_month", Float),
    Column("updated_at", TS, nullable=False),
)

# Counters of the current minute per limited subject ("key:<id>" | "user:<id>"): shared by
# every parley process on the database.
rate_windows = Table(
    "rate_windows",
    metadata,
    Column("subject", String(32), primary_key=True),
    Column("window_start", TS, primary_key=True),
    Column("requests", Integer, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)

# The end of the last anomaly episode logged per series (metrics.watch, migration 0009):
# shared by every parley process on the database, so an episode is logged once, not once
# per process or again after a restart.
anomaly_log = Table(
    "anomaly_log",
    metadata,
    Column("provider", String(128), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("metric", String(32), primary_key=True),
    # Exclusive: the hour after the episode's last anomalous one.
    Column("logged_end", TS, nullable=False),
)

# Issue 7: full-text search (store.search).


@dataclass(frozen=True, slots=True)
class FullText:
    """Database objects of the full-text index that these tables do not model.

    The database keeps them in step with the rows (migrations 0004 and 0006): on SQLite
    FTS5 external-content tables (``tables``; FTS5 adds shadow tables named after them),
    their edit and delete triggers and, for inserts, ``store.history_rows``; on
    PostgreSQL a generated ``tsvector`` column per table (``columns``, as
    ``table.column``) and its GIN index. ``ops.drift`` leaves them out of the model
    comparison and reports any that is missing.
    """

    tables: tuple[str, ...] = ()
    triggers: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()


FULL_TEXT: MappingProxyType[str, FullText] = MappingProxyType(
    {
        "sqlite": FullText(
            tables=("messages_fts", "conversations_fts"),
            # Inserts add their entries in Python (``store.history_rows``, migration 0006).
            triggers=tuple(
                f"{fts}_{event}"
                for fts in ("messages_fts", "conversations_fts")
                for event in ("delete", "update")
            ),
        ),
        "postgresql": FullText(
            columns=("messages.search_vector", "conversations.search_vector"),
            indexes=("ix_messages_search", "ix_conversations_search"),
        ),
    }
)

# Issue 7: semantic search and documents (parley.search).

# Changes that must reach the vector store, queued in the transaction that makes them:
# triggers (``OUTBOX_TRIGGERS``) add a row per inserted, edited or deleted message or
# document chunk (on SQLite a new message's row is written by ``store.history_rows``);
# the indexer embeds or deletes, then removes the rows it handled.
search_outbox = Table(
    "search_outbox",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # message | chunk
    Column("item_id", Integer, nullable=False),  # messages.id or document_chunks.id
    Column("op", String(8), nullable=False),  # upsert | delete
)

documents = Table(
    "documents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("public_id", Uuid, nullable=False, unique=True),
    # NULL: the local admin's (local mode or the master key), as for attachments.
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE")),
    # A document belongs to a conversation, or to a named collection of its owner.
    Column(
        "conversation_id",
        Integer,
        ForeignKey("conversations.id", ondelete="CASCADE"),
        index=True,
    ),
    Column("collection", String(128)),
    Column("filename", Text, nullable=False),
    Column("mime_type", String(128), nullable=False),
    Column("size", Integer, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # pending | indexed | failed
    Column("error", Text),
    Column("page_count", Integer),
    Column("chunk_count", Integer, nullable=False),
    Column("created_at", TS, nullable=False),
    Column("updated_at", TS, nullable=False),
    Index("ix_documents_owner", "user_id", "collection"),
)

document_chunks = Table(
    "document_chunks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("document_id", Integer, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("page", Integer),  # the page the chunk starts on (PDF), else NULL
    Column("content", Text, nullable=False),
    UniqueConstraint("document_id", "ordinal"),
)

# The chunks an answer was given, in rank order: what the UI shows as its sources. The
# file name, page and chunk number are kept if the document is deleted later.
citations = Table(
    "citations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("ordinal", Integer, nullable=False),
    Column("document_id", Integer, ForeignKey("documents.id", ondelete="SET NULL"), index=True),
    Column("chunk_id", Integer, ForeignKey("document_chunks.id", ondelete="SET NULL"), index=True),
    Column("filename", Text, nullable=False),
    Column("page", Integer),
    Column("chunk_ordinal", Integer, nullable=False),
    Column("score", Float, nullable=False),
    UniqueConstraint("message_id", "ordinal"),
)

OUTBOX_TRIGGERS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        # A new message's row comes from ``store.history_rows`` (migration 0006).
        "sqlite": (
            "search_outbox_message_update",
            "search_outbox_message_delete",
            "search_outbox_chunk_insert",
            "search_outbox_chunk_update",
            "search_outbox_chunk_delete",
        ),
        "postgresql": ("search_outbox_message", "search_outbox_chunk"),
    }
)
"""The triggers that fill ``search_outbox`` (migration 0005), by dialect; ``ops.drift``
reports any that is missing."""
