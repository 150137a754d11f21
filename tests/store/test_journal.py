"""Journal recording (``store.journal``) on SQLite and PostgreSQL: segments go once their
records commit, a dead server's segments are replayed without storing anything twice, a
torn tail is skipped, a running server's segments are left alone, failures are kept."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.domain.exchange import Exchange
from parley.domain.messages import Message
from parley.store import journal
from parley.store.journal import Journal, replay
from parley.store.writer import Writer
from tests.store.test_exchanges import attempt, chat, rows, write


def exchange(i: int, model_used: str | None = "gpt-test-2024") -> Exchange:
    return chat(
        [Message("user", f"journal question {i}")],
        answers=(f"journal answer {i}",),
        attempts=[attempt(model_used=model_used)],
    )


@pytest.fixture
def writer(migrated_engine: sa.Engine) -> Iterator[Writer]:
    writer = Writer(migrated_engine)
    writer.start()
    yield writer
    writer.stop(timeout=30)


def segments(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob(f"*{journal.SUFFIX}"))


def count(engine: sa.Engine) -> int:
    return int(rows(engine, "SELECT count(*) AS n FROM request_log")[0]["n"])


async def record(log: Journal, writer: Writer, item: Exchange) -> None:
    """What ``Services.record`` does in journal mode, then wait for the commit."""
    segment = log.append(item)
    pending = writer.submit(item)
    pending.add_done_callback(functools.partial(log.settled, segment))
    await asyncio.gather(pending, return_exceptions=True)
    await asyncio.sleep(0)  # the done callbacks run


async def test_segments_are_deleted_once_their_records_commit(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 1)  # every record fills its segment
    log = Journal(tmp_path / "journal")
    items = [exchange(i) for i in range(3)]
    handles = [log.append(item) for item in items]
    assert len(segments(log.directory)) == 3 and log.pending == 3
    futures = [writer.submit(item) for item in items]
    for handle, future in zip(handles, futures, strict=True):
        future.add_done_callback(functools.partial(log.settled, handle))
    await asyncio.gather(*futures)
    await asyncio.sleep(0)
    assert segments(log.directory) == [] and log.pending == 0
    assert count(migrated_engine) == 3

    # The current segment goes once idle for SEGMENT_SECONDS.
    monkeypatch.setattr(journal, "SEGMENT_BYTES", 1 << 20)
    monkeypatch.setattr(journal, "SEGMENT_SECONDS", 0.0)
    await record(log, writer, exchange(3))
    assert segments(log.directory) == []
    log.close()


async def test_a_dead_servers_segments_are_replayed_once(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "journal"
    dead = Journal(directory)
    items = [exchange(i) for i in range(5)]
    for item in items:
        dead.append(item)
    # Two of them reached the database before the crash (chain ids assigned on append).
    write(migrated_engine, items[0], items[3])
    dead.close()  # a crash as replay sees it: the segment stays, its lock is gone
    [name] = segments(directory)
    with (directory / name).open("ab") as torn:
        torn.write(b"\x00\x00\x01\x00partial")  # a record the crash cut short

    with caplog.at_level(logging.WARNING, logger="parley.store.journal"):
        assert await replay(directory, migrated_engine, writer) == 3
    assert segments(directory) == []
    assert count(migrated_engine) == 5
    answers = rows(migrated_engine, "SELECT content FROM messages WHERE role = 'assistant'")
    assert sorted(a["content"] for a in answers) == [f"journal answer {i}" for i in range(5)]
    assert any("torn record" in r.message for r in caplog.records)
    # Nothing left: a second start replays nothing.
    assert await replay(directory, migrated_engine, writer) == 0
    assert count(migrated_engine) == 5


async def test_a_running_servers_segment_is_left_alone(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine
) -> None:
    directory = tmp_path / "journal"
    alive = Journal(directory)
    alive.append(exchange(0))  # not committed yet, its server still holds the lock
    assert await replay(directory, migrated_engine, writer) == 0
    assert len(segments(directory)) == 1 and count(migrated_engine) == 0
    alive.close()
    assert await replay(directory, migrated_engine, writer) == 1
    assert count(migrated_engine) == 1


async def test_a_record_that_cannot_be_committed_is_kept_for_the_next_start(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine
) -> None:
    directory = tmp_path / "journal"
    log = Journal(directory)
    await record(log, writer, exchange(0))
    await record(log, writer, exchange(1, model_used=None))  # the store refuses this one
    assert (log.pending, log.kept) == (0, 1)
    log.close()
    assert len(segments(directory)) == 1  # kept: a commit failed
    assert count(migrated_engine) == 1
    # Replayed at each start: the good record was stored, the bad one fails again, and
    # the segment stays (a database that failed for a while must not lose records).
    for _start in range(2):
        assert await replay(directory, migrated_engine, writer) == 0
        assert len(segments(directory)) == 1 and not (directory / "failed").exists()
    assert count(migrated_engine) == 1


async def test_records_of_another_format_go_to_failed_once_the_rest_is_stored(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine
) -> None:
    directory = tmp_path / "journal"
    dead = Journal(directory)
    dead.append(exchange(0))
    dead.append(exchange(1))
    dead.close()
    [name] = segments(directory)
    data = bytearray((directory / name).read_bytes())
    data[0] = 99  # the first record's format: as if written by another parley version
    (directory / name).write_bytes(bytes(data))
    assert await replay(directory, migrated_engine, writer) == 1
    assert segments(directory) == [] and segments(directory / "failed") == [name]
    assert count(migrated_engine) == 1


def dead_segment(directory: Path, records: int) -> str:
    """The one segment a server that died left in ``directory``, with ``records`` records."""
    dead = Journal(directory)
    for i in range(records):
        dead.append(exchange(i))
    dead.close()
    [name] = segments(directory)
    return name


async def test_a_zero_filled_tail_is_a_torn_tail(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash can leave a file's end as zeros: no record, not another version's."""
    directory = tmp_path / "journal"
    name = dead_segment(directory, 3)
    with (directory / name).open("ab") as tail:
        tail.write(bytes(4096))
    with caplog.at_level(logging.WARNING, logger="parley.store.journal"):
        assert await replay(directory, migrated_engine, writer) == 3
    assert segments(directory) == [] and not (directory / "failed").exists()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_damaged_record_with_records_after_it_sends_the_segment_to_failed(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the last record can be torn (a short write ends its segment): one damaged
    before others is a damaged file, kept for a person, not deleted as a torn tail."""
    directory = tmp_path / "journal"
    name = dead_segment(directory, 5)
    data = bytearray((directory / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the third record's payload
    (directory / name).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="parley.store.journal"):
        assert await replay(directory, migrated_engine, writer) == 2
    assert segments(directory) == [] and segments(directory / "failed") == [name]
    assert any("damaged record" in r.message for r in caplog.records)


async def test_segments_stay_while_the_owner_lock_is_held(
    tmp_path: Path, writer: Writer, migrated_engine: sa.Engine
) -> None:
    # A process writer's child inherits the owner lock: its server is gone (segments
    # unlocked), it still commits what it was sent. Replay waits for it to go too.
    directory = tmp_path / "journal"
    dead = Journal(directory)
    dead.append(exchange(0))
    child = os.dup(dead.owner_fd)  # the same open file, as an inherited descriptor
    dead.close()
    assert await replay(directory, migrated_engine, writer) == 0
    assert len(segments(directory)) == 1
    os.close(child)
    assert await replay(directory, migrated_engine, writer) == 1
    assert segments(directory) == [] and count(migrated_engine) == 1
    assert list(directory.glob(f"*{journal.OWNER_SUFFIX}")) == []  # forgotten with it
