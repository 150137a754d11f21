"""The store writer in a child process (``PARLEY_WRITER=process``), on both databases.

The server-level kill -9 and SIGTERM tests run it too (``tests/server/test_crash_safety``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message, ToolCall
from parley.domain.usage import Usage
from parley.errors import StoreError
from parley.metrics.http_row import HttpRow
from parley.settings import Settings
from parley.store.writer_process import ProcessWriter
from parley.store.writer_wire import pack_exchange, unpack_exchange
from tests.store.test_writer import count, exchange

CANARY = "sk-canary-writer-process-0123456789"


def every_field_set() -> Exchange:
    """An exchange in which no field keeps its default, nested values included."""
    call = ToolCall("call_1", "lookup", '{"q": 1}', "function")
    now = datetime.now(UTC)
    return Exchange(
        model_requested="up/m",
        messages=(
            Message("user", ({"type": "text", "text": "hi"},), "ann", (), None),
            Message("assistant", None, None, (call,), None),
            Message("tool", "42", None, (), "call_1"),
        ),
        started_at=now,
        is_streaming=True,
        endpoint="messages",
        client_protocol="anthropic",
        origin="10.0.0.1",
        max_tokens=100,
        temperature=0.5,
        top_p=0.9,
        attempts=[
            Attempt(
                2,
                "up",
                "m-1",
                now,
                True,
                200,
                12.5,
                3.5,
                11.0,
                40.0,
                "stop",
                "x",
                "y",
                Usage(1, 2, 3, 4, 5),
                0.25,
                "up-id",
                True,
            )
        ],
        choices=[Choice(1, "text", "thought", (call,), "tool_calls")],
        user_id=7,
        api_key_id=8,
        chain_id=uuid.uuid4(),
        reply_to=ReplyTo(
            1, uuid.uuid4(), 2, "hash", (uuid.uuid4(),), leaf_at_start=3, notice="no documents"
        ),
    )


def test_the_wire_form_carries_every_field() -> None:
    original = every_field_set()
    for cls, value in ((Exchange, original), (Attempt, original.attempts[0])):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        assert all(getattr(value, n) != d for n, d in defaults.items()), cls
    packed = pack_exchange(original)
    assert len(packed) == len(dataclasses.fields(Exchange))
    assert len(packed[10][0]) == len(dataclasses.fields(Attempt))
    assert unpack_exchange(packed) == original


@pytest.fixture
def writer(settings: Settings, migrated_engine: sa.Engine) -> Iterator[ProcessWriter]:
    writer = ProcessWriter(dataclasses.replace(settings, writer_batch_max=64))
    writer.start()
    yield writer
    writer.stop(timeout=30)


async def test_exchanges_commit_in_shared_batches_and_survive_the_trip(
    writer: ProcessWriter, migrated_engine: sa.Engine
) -> None:
    await asyncio.gather(*(writer.submit(exchange(i)) for i in range(300)))
    assert writer.committed == 300 and writer.failed == 0
    assert writer.batches < 300 / 2  # group commit happened across the processes
    assert count(migrated_engine, "request_log") == 300
    assert count(migrated_engine, "messages") == 900
    with migrated_engine.connect() as conn:
        texts = {r[0] for r in conn.exec_driver_sql("SELECT content FROM messages")}
    assert {"question 0", "answer 299"} <= texts


async def test_what_one_turn_of_the_loop_submits_goes_in_one_send_and_one_batch(
    writer: ProcessWriter, migrated_engine: sa.Engine
) -> None:
    await writer.submit(exchange(0))  # the child is up and has answered once
    before = writer.batches
    # Answers that come back together are submitted in one turn of the loop.
    await asyncio.gather(*(writer.submit(exchange(i)) for i in range(1, 41)))
    assert writer.batches == before + 1
    assert count(migrated_engine, "request_log") == 41


async def test_drain_waits_for_fire_and_forget_records_and_metric_rows(
    writer: ProcessWriter, migrated_engine: sa.Engine
) -> None:
    for i in range(20):
        writer.submit_nowait(exchange(i))
    body = b'{"api_key": "' + CANARY.encode() + b'", "q": 1}'
    row = HttpRow(
        datetime.now(UTC),
        "/v1/x",
        "POST",
        200,
        0.01,
        "ua",
        "127.0.0.1",
        None,
        None,
        body,
        "application/json",
        None,
        None,
        (CANARY,),
        4096,
    )
    writer.submit_metric(row)
    await writer.drain()
    assert count(migrated_engine, "request_log") == 20
    with migrated_engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT request_body FROM http_metrics").scalar_one()
    assert CANARY not in stored and '"q": 1' in stored.replace('"q":1', '"q": 1')


async def test_a_poisoned_exchange_fails_alone_with_a_store_error(
    writer: ProcessWriter, migrated_engine: sa.Engine
) -> None:
    futures = [writer.submit(exchange(i, model_used=None if i == 4 else "m")) for i in range(10)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [isinstance(o, StoreError) for o in outcomes] == [i == 4 for i in range(10)]
    assert "could not be recorded" in str(outcomes[4]) or "record" in str(outcomes[4])
    assert (writer.committed, writer.failed) == (9, 1)
    assert count(migrated_engine, "request_log") == 9


async def test_a_dead_child_fails_what_waits_and_refuses_more(
    settings: Settings, migrated_engine: sa.Engine
) -> None:
    writer = ProcessWriter(settings)
    writer.start()
    await writer.submit(exchange(0))
    assert writer.is_alive()
    assert writer._process is not None
    os.kill(writer._process.pid, signal.SIGKILL)
    for _ in range(100):
        if not writer.is_alive():
            break
        await asyncio.sleep(0.05)
    assert not writer.is_alive()
    with pytest.raises(StoreError):
        await writer.submit(exchange(1))
    # HTTP metric rows are best effort: dropped, never an error for the request they measure.
    writer.submit_metric(lambda: {})
    with pytest.raises(StoreError, match="exit code -9"):
        writer.stop(timeout=30)  # an unclean end is reported (the server logs it)


def test_stop_commits_everything_sent_and_ends_the_child(
    settings: Settings, migrated_engine: sa.Engine
) -> None:
    writer = ProcessWriter(settings)
    writer.start()

    async def send() -> None:
        for i in range(50):
            writer.submit_nowait(exchange(i))

    asyncio.run(send())  # the loop is gone: stop finishes on this thread
    writer.stop(timeout=30)
    assert count(migrated_engine, "request_log") == 50
    assert writer._process is not None and writer._process.returncode == 0
    with pytest.raises(StoreError):
        writer.submit_nowait(exchange(51))
