"""The recording journal: ``journal`` recording mode's durable acknowledgement.

In ``journal`` mode a gateway exchange is appended to a journal segment (one ``write(2)``
of a framed, checksummed record) and then acknowledged; the writer commits it in its
group commit as in ``async`` mode, without the client waiting for that commit. A segment
is deleted once every record in it is committed. At start, before the server answers,
the segments left behind by a server that died are replayed into the database.

Durability: an acknowledged exchange survives the server's crash (kill -9, the OOM
killer): the record is in the kernel's page cache once ``write`` returns. It does not
survive the host's crash, as SQLite's ``synchronous = NORMAL`` commits do not; durable
mode with ``FULL`` (or PostgreSQL) is the choice for that.

Invariants:
- a record is acknowledged only after its ``write`` returned whole; a crash during the
  write leaves a torn tail, which replay recognises by its length or checksum and skips
  (it was never acknowledged);
- records carry their exchange's chain id (assigned here when it has none): replay skips
  every exchange whose chain id the request log already holds, so nothing is stored
  twice, whatever the writer committed before the crash;
- a segment is deleted only once all its records' commits succeeded; one whose commit
  failed stays for the next start's replay (a segment whose replay fails too moves to
  ``failed/``, where an operator can look at it);
- each server holds an exclusive ``flock`` on the segments it writes, until it deletes
  them: replay takes only the segments whose lock it gets, those of a server that is gone.
  Several servers may share a data directory.

Only exchanges with attempts and without ``reply_to`` are journaled (``/v1`` traffic):
the chat API reads its answer back after the commit, so its exchanges wait as in durable
mode. The journal's methods run on the event loop, except ``replay`` (a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pickle
import struct
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import select

from parley.domain.exchange import Exchange
from parley.errors import StoreError, StoreFull
from parley.store.bulk import PublicIds
from parley.store.schema import request_log
from parley.store.writer import RecordWriter
from parley.store.writer_wire import pack_exchange, unpack_exchange

log = logging.getLogger(__name__)

# A segment is closed for new records past this size; it is deleted once they commit.
SEGMENT_BYTES = 4 << 20
# An idle segment (every record committed) older than this is deleted, a new one begun.
SEGMENT_SECONDS = 10.0
SUFFIX = ".journal"
# Each record: its payload's length and CRC-32, then the payload (a pickled exchange tuple).
_HEAD = struct.Struct("!II")
# Chain ids looked up per query during replay.
_LOOKUP = 500


class _Segment:
    __slots__ = ("fd", "keep", "opened", "path", "pending", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.pending = 0  # records appended and not yet committed
        self.size = 0
        self.keep = False  # a commit failed: left for the next start's replay
        self.opened = time.monotonic()

    def close(self, *, delete: bool) -> None:
        if self.fd < 0:
            return
        if delete:
            self.path.unlink(missing_ok=True)  # before the lock goes: nobody replays it
        os.close(self.fd)
        self.fd = -1


class Journal:
    """This server's journal segments in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._serial = 0
        self._current: _Segment | None = None
        self._closed: list[_Segment] = []  # full segments waiting for their commits
        self._ids = PublicIds()
        self.pending = 0

    @staticmethod
    def takes(exchange: Exchange) -> bool:
        """Whether ``exchange`` is acknowledged on the journal (see the module docstring)."""
        return bool(exchange.attempts) and exchange.reply_to is None

    def append(self, exchange: Exchange) -> _Segment:
        """Write ``exchange``'s record; ``StoreError`` (``StoreFull``) if it could not be."""
        if exchange.chain_id is None:
            exchange.chain_id = self._ids.new()
        payload = pickle.dumps(pack_exchange(exchange), protocol=pickle.HIGHEST_PROTOCOL)
        record = _HEAD.pack(len(payload), zlib.crc32(payload)) + payload
        segment = self._segment()
        try:
            written = os.write(segment.fd, record)
        except OSError as exc:
            self._retire()  # whatever part of it landed ends that segment
            if exc.errno == errno.ENOSPC:
                raise StoreFull("the journal's disk is full") from exc
            raise StoreError(f"the journal could not be written: {exc.strerror}") from exc
        if written != len(record):
            self._retire()
            raise StoreFull("the journal's disk is full")
        segment.size += written
        segment.pending += 1
        self.pending += 1
        if segment.size >= SEGMENT_BYTES:
            self._retire()
        return segment

    def settled(self, segment: _Segment, future: asyncio.Future[Any]) -> None:
        """The writer's outcome for a record of ``segment`` (a done callback)."""
        segment.pending -= 1
        self.pending -= 1
        if future.cancelled() or future.exception() is not None:
            if not segment.keep:
                log.error(
                    "an acknowledged exchange could not be committed; its journal segment "
                    "%s is kept and replayed at the next start",
                    segment.path.name,
                )
            segment.keep = True
        if segment is self._current:
            if segment.pending == 0 and time.monotonic() - segment.opened >= SEGMENT_SECONDS:
                self._retire()
        elif segment.pending == 0 and segment in self._closed:
            self._closed.remove(segment)
            segment.close(delete=not segment.keep)

    def close(self) -> None:
        """Release every segment; those with records not known to be committed stay on
        disk, for the next start's replay (which skips what was committed)."""
        self._retire()
        for segment in self._closed:
            segment.close(delete=segment.pending == 0 and not segment.keep)
        self._closed = []

    def _segment(self) -> _Segment:
        if self._current is None:
            self._serial += 1
            path = self.directory / f"{self._name}-{self._serial:06d}{SUFFIX}"
            self._current = _Segment(path)
        return self._current

    def _retire(self) -> None:
        segment, self._current = self._current, None
        if segment is None:
            return
        if segment.pending == 0:
            segment.close(delete=not segment.keep)
        else:
            self._closed.append(segment)


async def replay(directory: Path, engine: sqlalchemy.Engine, writer: RecordWriter) -> int:
    """Commit the records of every segment in ``directory`` that no running server holds,
    skipping exchanges already stored; return how many were committed. Run it with
    ``writer`` started, before the server answers."""
    committed = 0
    for path in await asyncio.to_thread(_segments, directory):
        fd = await asyncio.to_thread(_take, path)
        if fd is None:
            continue  # a running server's (or deleted by it meanwhile)
        try:
            exchanges, unreadable = await asyncio.to_thread(_read, fd, path)
            stored = await asyncio.to_thread(_stored_chains, engine, exchanges)
            missing = [e for e in exchanges if e.chain_id not in stored]
            outcomes = await asyncio.gather(
                *(writer.submit(e) for e in missing), return_exceptions=True
            )
            failed = unreadable + sum(isinstance(o, BaseException) for o in outcomes)
            await asyncio.to_thread(_done_with, path, failed)
        finally:
            os.close(fd)
        committed += len(missing) - (failed - unreadable)
        log.warning(
            "journal segment %s replayed: %d exchange(s) committed, %d already stored, %d failed",
            path.name,
            len(missing) - (failed - unreadable),
            len(exchanges) - len(missing),
            failed,
        )
    return committed


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []


def _take(path: Path) -> int | None:
    """The segment opened and locked, or None when its server still holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read(fd: int, path: Path) -> tuple[list[Exchange], int]:
    """The segment's exchanges, and how many records could not be decoded."""
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    data = b"".join(chunks)
    exchanges: list[Exchange] = []
    unreadable = 0
    at = 0
    while at + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, at)
        payload = data[at + _HEAD.size : at + _HEAD.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        at += _HEAD.size + length
        try:
            exchanges.append(unpack_exchange(pickle.loads(payload)))
        except Exception:
            # Written by another version of parley (a crash, then an upgrade).
            log.exception("journal segment %s: a record could not be decoded", path.name)
            unreadable += 1
    if at < len(data):
        # A write the crash cut short: it was never acknowledged.
        log.warning(
            "journal segment %s: a torn record (%d bytes) skipped", path.name, len(data) - at
        )
    return exchanges, unreadable


def _stored_chains(engine: sqlalchemy.Engine, exchanges: list[Exchange]) -> set[uuid.UUID]:
    chains = [e.chain_id for e in exchanges if e.chain_id is not None]
    found: set[uuid.UUID] = set()
    with engine.connect() as conn:
        for start in range(0, len(chains), _LOOKUP):
            part = chains[start : start + _LOOKUP]
            query = select(request_log.c.chain_id).where(request_log.c.chain_id.in_(part))
            found.update(conn.execute(query).scalars())
    return found


def _done_with(path: Path, failed: int) -> None:
    """Delete a replayed segment, or move it to ``failed/`` when records of it failed."""
    # missing_ok: a server deleting its own segment may have been between unlink and
    # unlock when this replay took it.
    if not failed:
        path.unlink(missing_ok=True)
        return
    failed_dir = path.parent / "failed"
    failed_dir.mkdir(exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.rename(failed_dir / path.name)
    log.error(
        "%d exchange(s) of journal segment %s could not be committed; it is kept in %s",
        failed,
        path.name,
        failed_dir,
    )
