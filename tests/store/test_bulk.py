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
    # The same conversation twice, both inside the first 64-row statement: the later wins.
    updates.insert(10, {"id": ids[3], "title": "later"})
    statements: list[str] = []
    with writer_connection(migrated_engine) as conn, conn.begin():
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.connection.driver_connection.set_trace_callback(statements.append)  # type: ignore[union-attr]
        bulk_update(conn, conversations, updates)
    if sqlite:
        # 150 ids: two 64-row statements, then the 22 left one by one.
        # 150 ids: two 64-row statements, then the 22 left one by one (the trace repeats
        # a statement for each trigger it fires, so distinct texts are counted).
        updates_run = {s for s in statements if s.startswith("UPDATE")}
        assert len([s for s in updates_run if "VALUES" in s]) == 2
        assert len(updates_run) == 24
    stored = rows(migrated_engine, "SELECT id, title FROM conversations")
    titles = {row["id"]: row["title"] for row in stored}
    expected = {conv_id: f"first {n}" for n, conv_id in enumerate(ids)}
    expected[ids[3]] = "later"
    assert titles == expected
