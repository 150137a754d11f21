"""SQLite: new messages and conversations get their search entries from the writer, not
from AFTER INSERT triggers.

Why: issue 2's throughput goals. With the exchange writer's ``executemany``, the three
insert triggers (``messages_fts_insert``, ``search_outbox_message_insert``,
``conversations_fts_insert``) cost ~25 us per message (measured; a per-row statement
journal is part of it: with ``temp_store=MEMORY`` the cost fell by a third). The same
entries inserted directly, in the same transaction, cost ~2.5 us (``parley.store.history_rows``,
the one way rows enter those tables). Edit and delete triggers stay: those paths are rare
and include cascades no Python code sees. They now remove a full-text entry only if the
index holds one, so a row inserted past ``history_rows`` (by hand, or an old tool) is
merely missing from keyword search, never a corrupt index when it is deleted; an edit of
such a row indexes it.

No data changes: existing rows keep their entries. PostgreSQL is untouched (its index is
a generated column and its outbox trigger is cheap). Downgrade re-creates the triggers
exactly as migrations 0004 and 0005 made them, and rebuilds both full-text indexes so
that every row has its entry again, as those triggers require.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23

The statements below are a snapshot written out here, not derived from
``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (FTS table, base table, indexed column), as migration 0004 made them.
_FTS = (("messages_fts", "messages", "content"), ("conversations_fts", "conversations", "title"))
_OUTBOX_INSERT = (
    "CREATE TRIGGER search_outbox_message_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO search_outbox(kind, item_id, op) VALUES ('message', new.id, 'upsert'); END"
)


def _insert(fts: str, column: str) -> str:
    return f"INSERT INTO {fts}(rowid, {column}) VALUES (new.id, new.{column});"


def _remove(fts: str, column: str, *, guarded: bool) -> str:
    if not guarded:
        return f"INSERT INTO {fts}({fts}, rowid, {column}) VALUES ('delete', old.id, old.{column});"
    # Only a row the index holds (FTS5 keeps a size row per indexed rowid): removing one
    # it never held would corrupt the index.
    return (
        f"INSERT INTO {fts}({fts}, rowid, {column}) SELECT 'delete', old.id, old.{column} "
        f"WHERE EXISTS (SELECT 1 FROM {fts}_docsize WHERE id = old.id);"
    )


def _edit_triggers(*, guarded: bool) -> None:
    for fts, base, column in _FTS:
        op.execute(f"DROP TRIGGER IF EXISTS {fts}_delete")
        op.execute(f"DROP TRIGGER IF EXISTS {fts}_update")
        remove = _remove(fts, column, guarded=guarded)
        op.execute(f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {base} BEGIN {remove} END")
        op.execute(
            f"CREATE TRIGGER {fts}_update AFTER UPDATE OF {column} ON {base} "
            f"BEGIN {remove} {_insert(fts, column)} END"
        )


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for fts, _base, _column in _FTS:
        op.execute(f"DROP TRIGGER IF EXISTS {fts}_insert")
    op.execute("DROP TRIGGER IF EXISTS search_outbox_message_insert")
    _edit_triggers(guarded=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for fts, base, column in _FTS:
        op.execute(
            f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {base} BEGIN {_insert(fts, column)} END"
        )
    op.execute(_OUTBOX_INSERT)
    _edit_triggers(guarded=False)
    for fts, _base, _column in _FTS:
        # Since this revision a row may have no entry (an untitled conversation has none):
        # 0004's unguarded delete trigger would corrupt the index at such a row's delete.
        # Every row gets its entry again, as 0004 and 0005 had it.
        op.execute(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")
