"""Full-text search over message content and conversation titles.

Why: issue 7 makes all history searchable by words. The index must never drift from the
rows, and the exchange writer inserts messages with driver-level ``executemany``
(``store.bulk``), past any Python hook: so the database maintains the index itself, in
the transaction that writes the rows.

- SQLite: FTS5 external-content tables (``messages_fts`` over ``messages.content``,
  ``conversations_fts`` over ``conversations.title``; the text is stored once, in the
  base table) kept by insert / update / delete triggers. Titles change far more rarely
  than ``updated_at``, so the conversation trigger fires on ``UPDATE OF title`` only.
- PostgreSQL: a stored generated ``tsvector`` column (``search_vector``) on each table,
  with a GIN index. The ``simple`` configuration (lower-casing, no stemming, no stop
  words) behaves like FTS5's ``unicode61`` tokenizer, so a query finds the same rows on
  both databases, and history in any language (or code) is indexed word for word.
  A message is indexed up to its first 200,000 characters: a ``tsvector`` is limited to
  1 MB, and a longer pasted document must not make the writer's batch fail.

Existing rows are indexed here (FTS5 ``rebuild``; PostgreSQL fills a generated column
when it adds it). Neither object is in ``parley.store.schema``'s tables: the schema
declares their names (``FULL_TEXT``) and ``ops.drift`` checks they exist.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

The statements below are a snapshot written out here, not derived from
``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (FTS table, base table, indexed column)
_SQLITE = (("messages_fts", "messages", "content"), ("conversations_fts", "conversations", "title"))


def _sqlite_upgrade() -> None:
    for fts, base, column in _SQLITE:
        op.execute(
            f"CREATE VIRTUAL TABLE {fts} USING fts5({column}, content='{base}', content_rowid='id')"
        )
        insert = f"INSERT INTO {fts}(rowid, {column}) VALUES (new.id, new.{column});"
        remove = (
            f"INSERT INTO {fts}({fts}, rowid, {column}) VALUES ('delete', old.id, old.{column});"
        )
        op.execute(f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {base} BEGIN {insert} END")
        op.execute(f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {base} BEGIN {remove} END")
        op.execute(
            f"CREATE TRIGGER {fts}_update AFTER UPDATE OF {column} ON {base} "
            f"BEGIN {remove} {insert} END"
        )
        op.execute(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")


def _sqlite_downgrade() -> None:
    for fts, _base, _column in _SQLITE:
        for event in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER {fts}_{event}")
        op.execute(f"DROP TABLE {fts}")


def _postgresql_upgrade() -> None:
    op.execute(
        "ALTER TABLE messages ADD COLUMN search_vector tsvector GENERATED ALWAYS AS "
        "(to_tsvector('simple'::regconfig, left(content, 200000))) STORED"
    )
    op.execute(
        "ALTER TABLE conversations ADD COLUMN search_vector tsvector GENERATED ALWAYS AS "
        "(to_tsvector('simple'::regconfig, coalesce(title, ''))) STORED"
    )
    op.execute("CREATE INDEX ix_messages_search ON messages USING gin (search_vector)")
    op.execute("CREATE INDEX ix_conversations_search ON conversations USING gin (search_vector)")


def _postgresql_downgrade() -> None:
    op.execute("DROP INDEX ix_conversations_search")
    op.execute("DROP INDEX ix_messages_search")
    op.execute("ALTER TABLE conversations DROP COLUMN search_vector")
    op.execute("ALTER TABLE messages DROP COLUMN search_vector")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_upgrade()
    else:
        _postgresql_upgrade()


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_downgrade()
    else:
        _postgresql_downgrade()
