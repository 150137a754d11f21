"""Driver-level bulk writes on SQLite and PostgreSQL: order, duplicates, chunking."""

from __future__ import annotations

import sqlalchemy as sa

from parley.domain.messages import Message
from parley.store.bulk import bulk_update
from parley.store.engine import writer_connection
from parley.store.schema import conversations
from tests.store.test_exchanges import SYSTEM, chat, rows, write


def test_bulk_update_sets_many_rows_and_the_later_of_two_wins(
    migrated_engine: sa.Engine,
) -> None:
    batch = [chat([SYSTEM, Message("user", f"question {i}")]) for i in range(150)]
    recorded = write(migrated_engine, *batch)
    ids = [r.conversation_id for r in recorded]
    updates = [{"id": conv_id, "title": f"first {n}"} for n, conv_id in enumerate(ids)]
    # The same conversation twice in one call: the later title stays.
    updates.append({"id": ids[3], "title": "later"})
    with writer_connection(migrated_engine) as conn, conn.begin():
        bulk_update(conn, conversations, updates)
    stored = rows(migrated_engine, "SELECT id, title FROM conversations")
    titles = {row["id"]: row["title"] for row in stored}
    expected = {conv_id: f"first {n}" for n, conv_id in enumerate(ids)}
    expected[ids[3]] = "later"
    assert titles == expected
