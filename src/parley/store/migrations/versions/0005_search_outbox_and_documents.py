"""The search outbox, uploaded documents and their chunks, and answers' citations.

Why: issue 7 adds semantic search and questions over documents. Vectors live outside the
database (LanceDB), so every change that must reach them is queued in the same
transaction as the row: ``search_outbox`` gets one row per inserted, edited or deleted
message or document chunk, written by triggers (the exchange writer inserts messages with
driver-level ``executemany``, past any Python hook, and deletes cascade from
conversations and users). A background indexer consumes it; nothing on the hot path
waits for an embedding.

- ``documents``: an uploaded file (its bytes in the blob directory, by sha256), owned by a
  user (NULL: the local admin), attached to a conversation or to a named collection, with
  its indexing status (``pending`` / ``indexed`` / ``failed`` and the reason).
- ``document_chunks``: the extracted text, cut in overlapping chunks, with the page it
  starts on.
- ``citations``: the chunks an answer was given, in rank order, with what the UI shows
  (file name and page are kept even if the document is deleted later).

Existing messages are queued here, so the first indexer run embeds the history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

The tables and statements below are a snapshot written out here, not imported from
``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)

# (trigger name prefix, table, outbox kind, column whose update re-queues the row)
_SOURCES = (
    ("search_outbox_message", "messages", "message", "content"),
    ("search_outbox_chunk", "document_chunks", "chunk", "content"),
)


def _create_tables() -> None:
    op.create_table(
        "search_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_search_outbox"),
    )
    op.create_table(
        "documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Integer()),
        sa.Column("conversation_id", sa.Integer()),
        sa.Column("collection", sa.String(128)),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("mime_type", sa.String(128), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("page_count", sa.Integer()),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_documents_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name="fk_documents_conversation_id_conversations",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_documents"),
        sa.UniqueConstraint("public_id", name="uq_documents_public_id"),
    )
    op.create_index("ix_documents_owner", "documents", ["user_id", "collection"])
    op.create_index("ix_documents_conversation_id", "documents", ["conversation_id"])
    op.create_index("ix_documents_sha256", "documents", ["sha256"])
    op.create_table(
        "document_chunks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("page", sa.Integer()),
        sa.Column("content", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name="fk_document_chunks_document_id_documents",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_document_chunks"),
        sa.UniqueConstraint("document_id", "ordinal", name="uq_document_chunks_document_id"),
    )
    op.create_table(
        "citations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("document_id", sa.Integer()),
        sa.Column("chunk_id", sa.Integer()),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("page", sa.Integer()),
        sa.Column("chunk_ordinal", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name="fk_citations_message_id_messages",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name="fk_citations_document_id_documents",
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["chunk_id"],
            ["document_chunks.id"],
            name="fk_citations_chunk_id_document_chunks",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_citations"),
        sa.UniqueConstraint("message_id", "ordinal", name="uq_citations_message_id"),
    )
    op.create_index("ix_citations_document_id", "citations", ["document_id"])
    op.create_index("ix_citations_chunk_id", "citations", ["chunk_id"])


def _sqlite_triggers() -> None:
    for name, table, kind, column in _SOURCES:

        def enqueue(row: str, what: str, kind: str = kind) -> str:
            return (
                "INSERT INTO search_outbox(kind, item_id, op) "
                f"VALUES ('{kind}', {row}.id, '{what}');"
            )

        op.execute(
            f"CREATE TRIGGER {name}_insert AFTER INSERT ON {table} "
            f"BEGIN {enqueue('new', 'upsert')} END"
        )
        op.execute(
            f"CREATE TRIGGER {name}_update AFTER UPDATE OF {column} ON {table} "
            f"BEGIN {enqueue('new', 'upsert')} END"
        )
        op.execute(
            f"CREATE TRIGGER {name}_delete AFTER DELETE ON {table} "
            f"BEGIN {enqueue('old', 'delete')} END"
        )


def _postgresql_triggers() -> None:
    op.execute(
        "CREATE FUNCTION search_outbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "  IF TG_OP = 'DELETE' THEN\n"
        "    INSERT INTO search_outbox(kind, item_id, op) VALUES (TG_ARGV[0], OLD.id, 'delete');\n"
        "    RETURN OLD;\n"
        "  END IF;\n"
        "  INSERT INTO search_outbox(kind, item_id, op) VALUES (TG_ARGV[0], NEW.id, 'upsert');\n"
        "  RETURN NEW;\n"
        "END\n"
        "$$"
    )
    for name, table, kind, column in _SOURCES:
        op.execute(
            f"CREATE TRIGGER {name} AFTER INSERT OR DELETE OR UPDATE OF {column} ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION search_outbox_enqueue('{kind}')"
        )


def upgrade() -> None:
    _create_tables()
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_triggers()
    else:
        _postgresql_triggers()
    op.execute(
        "INSERT INTO search_outbox(kind, item_id, op) "
        "SELECT 'message', id, 'upsert' FROM messages ORDER BY id"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name, _table, _kind, _column in _SOURCES:
            for event in ("insert", "update", "delete"):
                op.execute(f"DROP TRIGGER {name}_{event}")
    else:
        for name, table, _kind, _column in _SOURCES:
            op.execute(f"DROP TRIGGER {name} ON {table}")
        op.execute("DROP FUNCTION search_outbox_enqueue()")
    op.drop_index("ix_citations_chunk_id", table_name="citations")
    op.drop_index("ix_citations_document_id", table_name="citations")
    op.drop_table("citations")
    op.drop_table("document_chunks")
    op.drop_index("ix_documents_sha256", table_name="documents")
    op.drop_index("ix_documents_conversation_id", table_name="documents")
    op.drop_index("ix_documents_owner", table_name="documents")
    op.drop_table("documents")
    op.drop_table("search_outbox")
