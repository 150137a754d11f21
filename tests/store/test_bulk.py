"""Driver-level bulk writes on SQLite and PostgreSQL: order, duplicates, chunking, and
values stored exactly as SQLAlchemy Core stores them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from parley.domain.messages import Message
from parley.store.bulk import bulk_insert, bulk_update, new_public_id
from parley.store.engine import writer_connection
from parley.store.schema import conversations, request_log
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


def _request_row(row_id: int, public_id: uuid.UUID, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {column.key: None for column in request_log.c}
    row.update(
        id=row_id,
        public_id=public_id,
        chain_id=uuid.UUID(int=7),
        attempt=1,
        endpoint="chat",
        client_protocol="openai",
        provider="up",
        model="m",
        model_requested="m",
        message_count=1,
        conversation_id=None,
    )
    row.update(values)
    return row


def test_bulk_insert_stores_each_value_as_core_insert_does(migrated_engine: sa.Engine) -> None:
    # Every kind of value the processors shortcut on SQLite: datetimes (with and without
    # microseconds, UTC and another offset), booleans, floats given as ints and floats.
    cases: list[dict[str, Any]] = [
        {
            "created_at": datetime(2026, 11, 24, 9, 30, 5, 123456, tzinfo=UTC),
            "finished_at": datetime(2026, 11, 24, 9, 30, 6, tzinfo=UTC),
            "success": True,
            "is_streaming": False,
            "usage_estimated": True,
            "response_time_ms": 5,
            "temperature": 0.7,
            "cost_usd": 0,
        },
        {
            "created_at": datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-5))),
            "finished_at": None,
            "success": False,
            "is_streaming": True,
            "usage_estimated": False,
            "response_time_ms": 1.5e-3,
            "top_p": 1,
            "tokens_per_second": None,
        },
    ]
    core_rows = [_request_row(n + 1, new_public_id(), **case) for n, case in enumerate(cases)]
    bulk_rows = [_request_row(n + 101, new_public_id(), **case) for n, case in enumerate(cases)]
    with writer_connection(migrated_engine) as conn, conn.begin():
        conn.execute(sa.insert(request_log), core_rows)
        bulk_insert(conn, request_log, bulk_rows)
    sqlite = migrated_engine.dialect.name == "sqlite"
    columns = [c.name for c in request_log.c if c.name not in {"id", "public_id"}]
    # On SQLite the storage class too: an int where Core stores a real would compare
    # equal in Python and still differ on disk.
    shown = ", ".join(f"typeof({c}), {c}" if sqlite else c for c in columns)
    with migrated_engine.connect() as conn:
        stored = conn.exec_driver_sql(f"SELECT {shown} FROM request_log ORDER BY id").all()
    assert len(stored) == 4
    assert stored[2:] == stored[:2]
    if sqlite:
        assert stored[0][columns.index("created_at") * 2 + 1] == "2026-11-24 09:30:05.123456"
        assert stored[0][columns.index("finished_at") * 2 + 1] == "2026-11-24 09:30:06.000000"
