"""Retention on SQLite and PostgreSQL: old request-log rows go in batches, history stays."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import Message
from parley.domain.usage import Usage
from parley.errors import ConfigError
from parley.ops.migrate import upgrade
from parley.ops.retention import run_retention
from parley.settings import Retention, Settings
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from parley.store.limits import LimitStore, minute_of

MakeSettings = Callable[..., Settings]
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def exchange(started: datetime, n: int, *, attempts: int = 2) -> Exchange:
    """One client request (its own conversation) that took ``attempts`` upstream tries,
    the last one answering: ``attempts`` request-log rows, two messages, one response."""
    tries = [
        Attempt(
            number,
            provider="openai",
            model_used="gpt-test",
            started_at=started + timedelta(seconds=number - 1),
            success=number == attempts,
            status_code=200 if number == attempts else 500,
            response_time_ms=100.0,
            usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        )
        for number in range(1, attempts + 1)
    ]
    return Exchange(
        model_requested="gpt-test",
        messages=(Message("user", f"question {n}"),),
        started_at=started,
        attempts=tries,
        choices=[Choice(0, f"answer {n}", finish_reason="stop")],
    )


def write(engine: sa.Engine, *exchanges: Exchange) -> None:
    with writer_connection(engine) as conn, conn.begin():
        write_batch(conn, exchanges)


def query(engine: sa.Engine, sql: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.exec_driver_sql(sql)]


def history(engine: sa.Engine) -> dict[str, list[dict[str, Any]]]:
    """Conversation history without its links to the request log."""
    return {
        "conversations": query(engine, "SELECT * FROM conversations ORDER BY id"),
        "messages": query(
            engine,
            "SELECT id, public_id, conversation_id, parent_id, role, content, payload, "
            "chain_hash, created_at FROM messages ORDER BY id",
        ),
        "responses": query(
            engine,
            "SELECT id, message_id, model_used, total_tokens, finish_reason, created_at "
            "FROM responses ORDER BY id",
        ),
    }


def prepared(settings: Settings) -> sa.Engine:
    upgrade(settings)
    return create_engine(settings)


def with_retention(settings: Settings, **fields: Any) -> Settings:
    return replace(settings, retention=Retention(**fields))


def test_old_rows_go_in_batches_and_history_stays_intact(settings: Settings) -> None:
    engine = prepared(settings)
    cutoff = NOW - 30 * DAY
    # Seven exchanges well past the cutoff, one a second past it, two a second inside
    # it, and three recent: 2 request rows each.
    old = [exchange(cutoff - (40 - n) * DAY, n) for n in range(7)]
    edge_old = exchange(cutoff - timedelta(seconds=3), 7)  # attempts at -3 s and -2 s
    edge_new = exchange(cutoff + timedelta(seconds=1), 8)
    new = [exchange(NOW - n * DAY, 10 + n) for n in range(3)]
    write(engine, *old, edge_old, edge_new, *new)
    before = history(engine)
    requests = query(engine, "SELECT id, public_id, created_at FROM request_log ORDER BY id")
    links = query(engine, "SELECT id, request_id FROM messages WHERE request_id IS NOT NULL")
    assert len(requests) == 24 and len(links) == 24  # question and answer each

    settings = with_retention(settings, request_log_days=30, batch_size=4)
    report = run_retention(settings, NOW, pause=0, pause_ratio=0)

    by_table = {t.table: t for t in report.tables}
    log = by_table["request_log"]
    assert (log.status, log.deleted, log.indexed) == ("pruned", 16, True)
    assert log.batches == 5  # four full batches of 4, then an empty one ends the run
    assert log.cutoff == cutoff
    assert (by_table["http_metrics"].status, by_table["http_metrics"].deleted) == ("pruned", 0)
    assert report.deleted == {"request_log": 16, "http_metrics": 0}

    kept = query(engine, "SELECT public_id FROM request_log ORDER BY id")
    assert [r["public_id"] for r in kept] == [r["public_id"] for r in requests[16:]]
    # Every conversation, message and response is still there, unchanged...
    assert history(engine) == before
    # ...and each answer that named a deleted attempt now names none; the rest still do.
    deleted_ids = {r["id"] for r in requests[:16]}
    after = {r["id"]: r["request_id"] for r in query(engine, "SELECT id, request_id FROM messages")}
    for link in links:
        expected = None if link["request_id"] in deleted_ids else link["request_id"]
        assert after[link["id"]] == expected
    answered = query(engine, "SELECT request_id FROM responses ORDER BY id")
    assert [r["request_id"] for r in answered] == [None] * 8 + [
        r["request_id"] for r in answered[8:]
    ]
    assert all(r["request_id"] is not None for r in answered[8:])
    engine.dispose()


def test_past_rate_limit_counters_go_and_the_current_minute_stays(settings: Settings) -> None:
    engine = prepared(settings)
    limits = LimitStore(engine)
    for minutes_ago in (0, 59, 61, 24 * 60):
        limits.count_request("key:1", minute_of(NOW - timedelta(minutes=minutes_ago)))
    run_retention(settings, NOW, pause=0, pause_ratio=0)
    assert query(engine, "SELECT count(*) AS n FROM rate_windows") == [{"n": 2}]
    # The kept counters go on counting (a second request in each of their minutes).
    for minutes_ago in (0, 59):
        assert limits.count_request("key:1", minute_of(NOW - timedelta(minutes=minutes_ago))) == 2
    engine.dispose()


def test_zero_days_keeps_every_row(settings: Settings) -> None:
    engine = prepared(settings)
    write(engine, *(exchange(NOW - 400 * DAY, n) for n in range(3)))
    report = run_retention(with_retention(settings, request_log_days=0), NOW)
    assert report.tables[0].status == "kept forever"
    assert report.deleted["request_log"] == 0
    assert query(engine, "SELECT count(*) AS n FROM request_log") == [{"n": 6}]
    engine.dispose()


def test_dry_run_counts_and_deletes_nothing(settings: Settings) -> None:
    engine = prepared(settings)
    write(engine, exchange(NOW - 90 * DAY, 1), exchange(NOW - DAY, 2))
    report = run_retention(with_retention(settings, request_log_days=30), NOW, dry_run=True)
    assert (report.tables[0].status, report.deleted["request_log"]) == ("dry run", 2)
    assert query(engine, "SELECT count(*) AS n FROM request_log") == [{"n": 4}]
    engine.dispose()


def test_without_an_index_it_walks_primary_key_windows(settings: Settings) -> None:
    engine = prepared(settings)
    write(engine, *(exchange(NOW - (60 - n) * DAY, n) for n in range(5)))
    write(engine, exchange(NOW - DAY, 9))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_request_log_created_at")
    report = run_retention(
        with_retention(settings, request_log_days=30, batch_size=3), NOW, pause=0, pause_ratio=0
    )
    log = report.tables[0]
    assert (log.status, log.deleted, log.indexed) == ("pruned", 10, False)
    assert log.batches == 4  # ids 1..12 in windows of 3
    assert query(engine, "SELECT count(*) AS n FROM request_log") == [{"n": 2}]
    assert query(engine, "SELECT count(*) AS n FROM messages") == [{"n": 12}]
    engine.dispose()


class _StopAfterFirstBatch(threading.Event):
    """A stop signal raised while the first pause is waited out (a server shutting down)."""

    def wait(self, timeout: float | None = None) -> bool:
        self.set()
        return True


def test_a_stop_ends_the_run_after_the_batch_in_progress(settings: Settings) -> None:
    engine = prepared(settings)
    write(engine, *(exchange(NOW - (90 - n) * DAY, n) for n in range(4)))
    stop = _StopAfterFirstBatch()
    report = run_retention(
        with_retention(settings, request_log_days=30, batch_size=3), NOW, stop=stop
    )
    log = report.tables[0]
    assert (log.status, log.deleted, log.batches) == ("stopped", 3, 1)
    assert report.tables[1].status == "stopped"
    remaining = query(engine, "SELECT id FROM request_log ORDER BY id")
    assert [r["id"] for r in remaining] == [4, 5, 6, 7, 8]  # the oldest went first
    engine.dispose()


def test_retention_and_the_writer_share_the_database(settings: Settings) -> None:
    """Batches and the writer's commits interleave: neither fails on a locked database."""
    engine = prepared(settings)
    write(engine, *(exchange(NOW - 60 * DAY + n * timedelta(minutes=1), n) for n in range(300)))
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        n = 1000
        try:
            while not done.is_set():
                write(engine, exchange(datetime.now(UTC), n))
                n += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        report = run_retention(
            with_retention(settings, request_log_days=30, batch_size=50), pause=0.001
        )
    finally:
        done.set()
        thread.join(30)
    assert errors == []
    assert report.deleted["request_log"] == 600
    old = query(engine, "SELECT count(*) AS n FROM request_log WHERE attempt = 1")
    written = old[0]["n"]
    assert written >= 1  # the writer kept committing while batches ran
    assert query(engine, "SELECT count(*) AS n FROM conversations")[0]["n"] == 300 + written
    engine.dispose()


def test_no_database_is_a_config_error(tmp_path: Path, make_settings: MakeSettings) -> None:
    settings = make_settings(tmp_path)
    with pytest.raises(ConfigError, match="no database at"):
        run_retention(with_retention(settings, request_log_days=1))
    assert not (tmp_path / "data" / "parley.db").exists()  # not created by asking
