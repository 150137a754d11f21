"""The group-commit writer on SQLite and PostgreSQL: every submission answered, once."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import Message
from parley.errors import StoreError, StoreFull
from parley.ops.migrate import upgrade
from parley.store.engine import Checkpointer, create_engine, sqlite_path, writer_connection
from parley.store.exchanges import Recorded, write_batch
from parley.store.writer import Writer
from tests.conftest import MakeSettings
from tests.small_disk import fill, small_database


def exchange(i: int, model_used: Any = "gpt-test-2024") -> Exchange:
    now = datetime.now(UTC)
    return Exchange(
        model_requested="gpt-test",
        messages=(Message("system", "Be brief."), Message("user", f"question {i}")),
        started_at=now,
        attempts=[Attempt(1, "openai", model_used, now, success=True, status_code=200)],
        choices=[Choice(0, f"answer {i}", finish_reason="stop")],
    )


def count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


@pytest.fixture
def writer(migrated_engine: sa.Engine) -> Iterator[Writer]:
    writer = Writer(migrated_engine, batch_max=256)
    yield writer
    writer.stop(timeout=30)


async def test_concurrent_submissions_share_commits(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    writer.start()

    async def client(i: int) -> Recorded:
        await asyncio.sleep(0)
        return await writer.submit(exchange(i))

    results = await asyncio.gather(*(client(i) for i in range(2000)))
    assert len({r.request_ids[0] for r in results}) == 2000
    assert writer.committed == 2000 and writer.failed == 0
    assert writer.batches < 2000 / 4  # group commit happened
    assert count(migrated_engine, "request_log") == 2000
    assert count(migrated_engine, "conversations") == 2000
    assert count(migrated_engine, "messages") == 6000
    assert count(migrated_engine, "responses") == 2000


async def test_a_poisoned_exchange_fails_alone(
    writer: Writer, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # Queued before the thread starts, so all ten land in the same batch.
    futures = [writer.submit(exchange(i, model_used=None if i == 4 else "m")) for i in range(10)]
    writer.start()
    with caplog.at_level(logging.ERROR, logger="parley.store.writer"):
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [isinstance(o, StoreError) for o in outcomes] == [i == 4 for i in range(10)]
    assert all(isinstance(o, Recorded) for i, o in enumerate(outcomes) if i != 4)
    assert (writer.committed, writer.failed) == (9, 1)
    assert count(migrated_engine, "request_log") == 9
    assert count(migrated_engine, "messages") == 27
    assert any("could not record exchange" in r.message for r in caplog.records)


def test_stop_commits_what_is_queued(writer: Writer, migrated_engine: sa.Engine) -> None:
    for i in range(300):
        writer.submit_nowait(exchange(i))
    writer.start()
    writer.stop(timeout=30)
    assert not writer.is_alive()
    assert count(migrated_engine, "request_log") == 300
    with pytest.raises(StoreError, match="stopped"):
        writer.submit_nowait(exchange(301))


def test_one_writer_serves_several_event_loops(writer: Writer, migrated_engine: sa.Engine) -> None:
    writer.start()

    async def record(i: int) -> Recorded:
        return await writer.submit(exchange(i))

    first = asyncio.run(record(1))
    second = asyncio.run(record(2))
    assert first.request_ids != second.request_ids
    assert count(migrated_engine, "request_log") == 2


async def test_drain_waits_for_fire_and_forget_records(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    writer.start()
    for i in range(50):
        writer.submit_nowait(exchange(i))
    await writer.drain()
    assert count(migrated_engine, "request_log") == 50


async def test_async_recording_waits_once_the_writer_is_behind(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    # Not started: nothing is taken off the queue, as with a writer that cannot keep up.
    assert [writer.submit_unless_behind(exchange(i), 3) for i in range(3)] == [None] * 3
    pending = writer.submit_unless_behind(exchange(3), 3)
    assert pending is not None
    await asyncio.sleep(0.05)
    assert not pending.done()
    writer.start()
    recorded = await asyncio.wait_for(pending, 30)
    assert recorded.request_ids
    await writer.drain()
    assert count(migrated_engine, "request_log") == 4


async def test_a_cancelled_waiter_still_gets_its_record(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    future = writer.submit(exchange(1))
    future.cancel()
    writer.start()
    await writer.drain()
    assert count(migrated_engine, "request_log") == 1


async def test_an_unreachable_database_fails_submissions_not_the_writer() -> None:
    broken = Writer(sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none"))
    broken.start()
    try:
        with pytest.raises(StoreError, match="unavailable"):
            await broken.submit(exchange(1))
        assert broken.is_alive() and broken.failed == 1
    finally:
        broken.stop(timeout=10)


async def test_stop_before_start_fails_what_was_queued(migrated_engine: sa.Engine) -> None:
    writer = Writer(migrated_engine)
    future = writer.submit(exchange(1))
    writer.stop()
    with pytest.raises(StoreError, match="stopped before it started"):
        await future
    assert count(migrated_engine, "request_log") == 0


@pytest.fixture(params=["sqlite", "postgresql"])
def small_store(
    request: pytest.FixtureRequest, tmp_path: Path, make_settings: MakeSettings
) -> Iterator[tuple[sa.Engine, Path]]:
    """A migrated engine on a database whose file system is small, and where to fill it."""
    with small_database(request.param, tmp_path) as (database_url, small):
        settings = make_settings(tmp_path, database_url)
        upgrade(settings)
        engine = create_engine(settings)
        try:
            yield engine, small
        finally:
            engine.dispose()


def big_exchange(i: int) -> Exchange:
    big = exchange(i)
    big.choices = [Choice(0, f"answer {i} " + "lorem ipsum " * 8000, finish_reason="stop")]
    return big


async def test_a_full_disk_fails_with_store_full_and_the_writer_carries_on(
    small_store: tuple[sa.Engine, Path], caplog: pytest.LogCaptureFixture
) -> None:
    engine, small = small_store
    writer = Writer(engine)
    writer.start()
    try:
        await writer.submit(exchange(0))
        filler = fill(small)
        committed, refused = 1, 0
        with caplog.at_level(logging.ERROR, logger="parley.store.writer"):
            for i in range(1, 80):
                try:
                    await writer.submit(big_exchange(i))
                    committed += 1
                except StoreFull as exc:
                    assert "disk is full" in exc.message and exc.status == 507
                    refused += 1
                    if refused == 3:
                        break
        assert refused == 3, "the disk never filled up"
        assert writer.is_alive()
        # One line per refusal, no traceback: expected until an operator frees space.
        full = [r for r in caplog.records if "disk is full" in r.getMessage()]
        assert full and all(r.exc_info is None for r in full)

        filler.unlink()
        await writer.submit(big_exchange(100))
        committed += 1
        # Whole exchanges only: one request row, one response row each.
        assert count(engine, "request_log") == committed
        assert count(engine, "responses") == committed
        assert writer.failed == refused
    finally:
        writer.stop(timeout=30)


# PostgreSQL only: a SQLite connection cannot be lost to a server restart.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_lost_connection_is_replaced(writer: Writer, migrated_engine: sa.Engine) -> None:
    writer.start()
    await writer.submit(exchange(0))
    with migrated_engine.connect() as conn:
        # What a PostgreSQL restart does to the writer's connection.
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    # The batch that meets the dead connection is retried on a new one: nothing fails.
    for i in range(1, 4):
        await writer.submit(exchange(i))
    assert (writer.committed, writer.failed) == (4, 0)
    assert count(migrated_engine, "request_log") == 4


async def test_a_batch_committed_despite_a_failed_commit_is_not_written_again(
    writer: Writer, migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection is lost as COMMIT returns: the server committed, the client cannot
    # know. The retry must find the batch stored, not write it a second time.
    dialect = migrated_engine.dialect
    commit = dialect.do_commit
    lost: list[bool] = []

    def commit_then_lose(dbapi_connection: Any) -> None:
        commit(dbapi_connection)
        if not lost:
            lost.append(True)
            raise dialect.loaded_dbapi.OperationalError("connection lost during COMMIT")

    monkeypatch.setattr(dialect, "do_commit", commit_then_lose)
    futures = [writer.submit(exchange(i)) for i in range(5)]  # one batch
    writer.start()
    outcomes = await asyncio.gather(*futures)
    assert lost and all(isinstance(o, Recorded) for o in outcomes)
    assert (writer.committed, writer.failed) == (5, 0)
    assert count(migrated_engine, "request_log") == 5
    assert count(migrated_engine, "messages") == 15
    with migrated_engine.connect() as conn:
        series = conn.exec_driver_sql(
            "SELECT period, series_key, sum(requests) FROM metric_rollups"
            " GROUP BY period, series_key"
        ).all()
    assert series and all(requests == 5 for _, _, requests in series)  # each counted once
    # And the writer carries on.
    await writer.submit(exchange(5))
    assert count(migrated_engine, "request_log") == 6


def metric(i: int) -> dict[str, Any]:
    return {
        "created_at": datetime.now(UTC),
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "status_code": 200,
        "response_time_ms": float(i),
        "user_agent": None,
        "client_ip": None,
        "tags": None,
        "error_message": None,
        "request_body": None,
        "user_id": None,
        "api_key_id": None,
    }


async def test_metric_rows_are_written_within_a_second_without_other_traffic(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    # Held on the submitting side (no writer wake-up per request) until the second is up.
    writer.start()
    for i in range(3):
        writer.submit_metric(lambda i=i: metric(i))
    assert count(migrated_engine, "http_metrics") == 0
    for _ in range(40):
        await asyncio.sleep(0.1)
        if count(migrated_engine, "http_metrics") == 3:
            break
    assert count(migrated_engine, "http_metrics") == 3


async def test_drain_and_stop_write_held_metric_rows(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    writer.start()
    writer.submit_metric(lambda: metric(1))
    await writer.drain()
    assert count(migrated_engine, "http_metrics") == 1
    writer.submit_metric(lambda: metric(2))
    writer.stop(timeout=30)
    assert count(migrated_engine, "http_metrics") == 2
    writer.submit_metric(lambda: metric(3))  # after stop: dropped, not queued forever
    assert count(migrated_engine, "http_metrics") == 2


async def test_a_full_hold_of_metric_rows_is_written_at_once(
    writer: Writer, migrated_engine: sa.Engine
) -> None:
    writer.start()
    await writer.submit(exchange(0))  # the writer is up and idle
    for i in range(256):
        writer.submit_metric(lambda i=i: metric(i))
    for _ in range(40):
        await asyncio.sleep(0.01)
        if count(migrated_engine, "http_metrics") == 256:
            break
    # Well inside the one-second deadline of a partial hold.
    assert count(migrated_engine, "http_metrics") == 256


def test_the_log_starts_over_under_steady_writes(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    """A checkpoint on another thread seldom catches a writer that never pauses, so the
    log would only grow (~100 MB here); the writer's connection folds in the last frames
    once it is long, and the next write starts the log over."""
    settings = make_settings(tmp_path)
    upgrade(settings)
    engine = create_engine(settings)
    checkpointer = Checkpointer(engine, interval=0.005, restart_frames=64)
    checkpointer.start()
    wal = Path(str(sqlite_path(settings)) + "-wal")
    try:
        with writer_connection(engine) as conn:
            conn.connection.driver_connection.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[union-attr]
            for i in range(800):
                with conn.begin():
                    write_batch(conn, [exchange(i)])
                checkpointer.committed(conn)
    finally:
        checkpointer.stop()
        size = wal.stat().st_size
        engine.dispose()
    # 800 commits of ~30 pages each make ~100 MB of log without a restart, ~2 MB on an
    # idle machine with them. The log's size is set by the longest stretch before a
    # restart, which a busy machine lengthens (24 MB once in CI, when the checkpoint
    # thread waited ~200 commits for its first turn): the bound leaves room for that.
    assert checkpointer.restarts > 0
    assert size < 40 * 1024 * 1024, size


def test_two_writers_on_one_database_take_turns_and_share_one_thread(
    migrated_engine: sa.Engine,
) -> None:
    # A conversation goes on, and its next turn is recorded by two servers' writers at
    # once (a client's retry through a load balancer): the second waits for the first's
    # commit, then finds the new turn stored instead of storing it again.
    with writer_connection(migrated_engine) as conn, conn.begin():
        write_batch(conn, [exchange(1)])
    history = (*exchange(1).messages, Message("assistant", "answer 1"), Message("user", "more"))
    first, second = exchange(2), exchange(2)
    first.messages = second.messages = history
    with writer_connection(migrated_engine) as one, one.begin():
        write_batch(one, [first])
        done = threading.Event()

        def other() -> None:
            with writer_connection(migrated_engine) as two, two.begin():
                write_batch(two, [second])
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert not done.wait(0.5), "the second writer did not wait for the first"
    thread.join(30)
    assert done.is_set()
    assert count(migrated_engine, "conversations") == 1
    with migrated_engine.connect() as conn:
        users = conn.exec_driver_sql("SELECT content FROM messages WHERE role = 'user'")
        assert sorted(users.scalars()) == ["more", "question 1"]
