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
  (it was never acknowledged), as it does a zero-filled tail. A damaged record with more
  records after it is no torn tail: the records before it are committed and the segment
  goes to ``failed/``;
- records carry their exchange's chain id (assigned here when it has none): replay skips
  every exchange whose chain id the request log already holds, so nothing is stored
  twice, whatever the writer committed before the crash;
- a segment is deleted only once all its records' commits succeeded; one whose commit
  failed stays for the next start's replay, and so does one whose replay could not
  commit (the database failed: the next start tries again). Only records no parley here
  can decode (another version's, or damaged ones) send a segment to ``failed/``, once
  the rest of it is committed;
- ``pending`` counts the records appended and not yet committed; ``kept``, those whose
  commit failed, which wait for the next start's replay (``/healthz`` reports both);
- each server holds an exclusive ``flock`` on the segments it writes, until it deletes
  them, and one on its owner file for its whole life, shared with its process writer's
  child: replay takes a segment only when it gets both locks, so never one whose server,
  or whose server's surviving writer, may still commit it. Several servers may share a
  data directory.

Only exchanges with attempts and without ``reply_to`` are journaled (the ``/v1``
traffic, and the chat API's title exchanges): the chat API reads its answers back after
the commit, so those wait as in durable mode. The journal's methods run on the event
loop.
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

from parley.domain.exchange import Exchange
from parley.errors import StoreError, StoreFull
from parley.store.bulk import PublicIds
from parley.store.exchange_lookups import stored_chains
from parley.store.writer import RecordWriter
from parley.store.writer_wire import pack_exchange, unpack_exchange

log = logging.getLogger(__name__)

# A segment is closed for new records past this size; it is deleted once they commit.
SEGMENT_BYTES = 4 << 20
# A segment a commit leaves with nothing pending is deleted (a new one begun) once it is
# this old.
SEGMENT_SECONDS = 10.0
SUFFIX = ".journal"
OWNER_SUFFIX = ".owner"
# Each record: the format, the payload's length and CRC-32, then the payload (the writer
# wire's exchange tuple, pickled). Another format (another parley version) is not decoded.
_FORMAT = 1
_HEAD = struct.Struct("!BII")


class _Segment:
    """One journal file: appended to by its server, locked by it until deleted."""

    __slots__ = ("fd", "keep", "opened", "path", "pending", "size")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _locked(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.pending = 0  # records appended and not yet committed
        self.size = 0
        self.keep = False  # a commit failed: left for the next start's replay
        self.opened = time.monotonic()

    def close(self, *, delete: bool) -> None:
        if self.fd < 0:
            return
        try:
            if delete:
                self.path.unlink(missing_ok=True)  # before the lock goes: nobody replays it
        finally:
            os.close(self.fd)
            self.fd = -1


class Journal:
    """This server's journal segments in ``directory``.

    ``owner_fd`` is locked for as long as anything of this server may still commit: a
    process writer's child inherits it (``ProcessWriter``'s ``inherit_fds``), so that a
    start does not replay segments whose records a surviving child is still committing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._owner = directory / f"{self._name}{OWNER_SUFFIX}"
        self.owner_fd = _locked(self._owner, os.O_WRONLY | os.O_CREAT)
        self._serial = 0
        self._current: _Segment | None = None
        self._closed: list[_Segment] = []  # full segments waiting for their commits
        self._ids = PublicIds()
        # Records appended whose commit is still to come (the writer's backlog)...
        self.pending = 0
        # ...and those whose commit failed: they wait for the next start's replay.
        self.kept = 0

    @staticmethod
    def takes(exchange: Exchange) -> bool:
        """Whether ``exchange`` is acknowledged on the journal: it has attempts (so a
        request-log row to find it by at replay) and no ``reply_to`` (the chat API reads
        its answers back, so it waits for their commit)."""
        return bool(exchange.attempts) and exchange.reply_to is None

    def append(self, exchange: Exchange) -> _Segment:
        """Write ``exchange``'s record; ``StoreError`` (``StoreFull``) if it could not be."""
        if exchange.chain_id is None:
            exchange.chain_id = self._ids.new()
        payload = pickle.dumps(pack_exchange(exchange), protocol=pickle.HIGHEST_PROTOCOL)
        record = _HEAD.pack(_FORMAT, len(payload), zlib.crc32(payload)) + payload
        try:
            segment = self._segment()
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
        if future.cancelled() or future.exception() is not None:
            self.failed(segment)
        else:
            self._done(segment)

    def failed(self, segment: _Segment) -> None:
        """A record of ``segment`` was not committed (or not even queued): it counts as
        ``kept`` until the next start replays it."""
        self.kept += 1
        if not segment.keep:
            log.error(
                "an acknowledged exchange could not be committed; its journal segment %s "
                "is kept and replayed at the next start",
                segment.path.name,
            )
        segment.keep = True
        self._done(segment)

    def close(self) -> None:
        """Release every segment; those with records not known to be committed stay on
        disk, for the next start's replay (which skips what was committed). Call it only
        once the writer has stopped: the owner lock goes with it."""
        self._retire()
        for segment in self._closed:
            segment.close(delete=segment.pending == 0 and not segment.keep)
        self._closed = []
        if self.owner_fd >= 0:
            if not any(self.directory.glob(f"{self._name}-*{SUFFIX}")):
                self._owner.unlink(missing_ok=True)
            os.close(self.owner_fd)
            self.owner_fd = -1

    def _done(self, segment: _Segment) -> None:
        segment.pending -= 1
        self.pending -= 1
        if segment is self._current:
            if segment.pending == 0 and time.monotonic() - segment.opened >= SEGMENT_SECONDS:
                self._retire()
        elif segment.pending == 0 and segment in self._closed:
            self._closed.remove(segment)
            segment.close(delete=not segment.keep)

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


def _locked(path: Path, flags: int) -> int:
    """``path`` opened and locked (exclusive); ``BlockingIOError`` when another holds it."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def replay(directory: Path, engine: sqlalchemy.Engine, writer: RecordWriter) -> int:
    """Commit the records of every segment in ``directory`` whose server is gone, skipping
    exchanges already stored; return how many were committed. Run it with ``writer``
    started, before the server answers. A segment that cannot be replayed now (the
    database failed) stays for the next start; one with records no parley here can decode
    moves to ``failed/`` once the rest are committed."""
    committed = 0
    for path in await asyncio.to_thread(_segments, directory):
        fds = await asyncio.to_thread(_take, path)
        if fds is None:
            continue  # its server (or that server's writer) still runs, or deleted it
        try:
            exchanges, unreadable = await asyncio.to_thread(_read, fds[-1], path)
            stored = await asyncio.to_thread(_stored, engine, exchanges)
            missing = [e for e in exchanges if e.chain_id not in stored]
            outcomes = await asyncio.gather(
                *(writer.submit(e) for e in missing), return_exceptions=True
            )
            failed = sum(isinstance(o, BaseException) for o in outcomes)
            await asyncio.to_thread(_done_with, path, failed, unreadable)
            committed += len(missing) - failed
            log.warning(
                "journal segment %s replayed: %d exchange(s) committed, %d already stored, "
                "%d not committed, %d not readable",
                path.name,
                len(missing) - failed,
                len(exchanges) - len(missing),
                failed,
                unreadable,
            )
        except Exception:
            log.exception("journal segment %s could not be replayed; it is kept", path.name)
        finally:
            for fd in fds:
                os.close(fd)
    await asyncio.to_thread(_forget_owners, directory)
    return committed


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []


def _owner_of(segment: Path) -> Path:
    return segment.with_name(segment.name.rsplit("-", 1)[0] + OWNER_SUFFIX)


def _take(path: Path) -> tuple[int, ...] | None:
    """Locks on the segment's owner (when its file is there) and on the segment, the
    segment's last; None when either is held: its server, or a writer of it, still runs."""
    taken: list[int] = []
    try:
        for lock in (_owner_of(path), path):
            try:
                taken.append(_locked(lock, os.O_RDONLY))
            except FileNotFoundError:
                if lock == path:
                    raise
    except (BlockingIOError, FileNotFoundError):
        for fd in taken:
            os.close(fd)
        return None
    return tuple(taken)


def _forget_owners(directory: Path) -> None:
    """Delete the owner files of servers that are gone and left no segment."""
    for owner in directory.glob(f"*{OWNER_SUFFIX}") if directory.is_dir() else []:
        name = owner.name.removesuffix(OWNER_SUFFIX)
        if any(directory.glob(f"{name}-*{SUFFIX}")):
            continue
        try:
            fd = _locked(owner, os.O_RDONLY)
        except (BlockingIOError, FileNotFoundError):
            continue
        try:
            owner.unlink(missing_ok=True)
        finally:
            os.close(fd)


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
        version, length, crc = _HEAD.unpack_from(data, at)
        end = at + _HEAD.size + length
        payload = data[at + _HEAD.size : end]
        if length == 0 or len(payload) < length or zlib.crc32(payload) != crc:
            # No record is empty: a zero length is a tail the crash left zero-filled.
            if length and len(payload) == length and data[end:].strip(b"\0"):
                # A whole record, damaged, with more after it: parley writes nothing
                # after a short write, so this is no torn tail but a damaged file. The
                # segment goes to ``failed/`` (after the records before it are committed).
                log.error(
                    "journal segment %s: a damaged record at byte %d, %d byte(s) after it not read",
                    path.name,
                    at,
                    len(data) - end,
                )
                return exchanges, unreadable + 1
            break
        at += _HEAD.size + length
        if version != _FORMAT:
            log.error(
                "journal segment %s: a record of format %d, not %d", path.name, version, _FORMAT
            )
            unreadable += 1
            continue
        try:
            exchanges.append(unpack_exchange(pickle.loads(payload)))
        except Exception:
            log.exception("journal segment %s: a record could not be decoded", path.name)
            unreadable += 1
    if at < len(data):
        # A write the crash cut short: it was never acknowledged.
        log.warning(
            "journal segment %s: a torn record (%d bytes) skipped", path.name, len(data) - at
        )
    return exchanges, unreadable


def _stored(engine: sqlalchemy.Engine, exchanges: list[Exchange]) -> set[uuid.UUID]:
    with engine.connect() as conn:
        return stored_chains(conn, exchanges)


def _done_with(path: Path, failed: int, unreadable: int) -> None:
    """Delete a replayed segment; keep it for the next start when commits failed; move it
    to ``failed/`` when only undecodable records are left in it."""
    # missing_ok: a server deleting its own segment may have been between unlink and
    # unlock when this replay took it.
    if failed:
        log.error(
            "%d exchange(s) of journal segment %s could not be committed; it is kept for "
            "the next start",
            failed,
            path.name,
        )
    elif unreadable:
        failed_dir = path.parent / "failed"
        failed_dir.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.rename(failed_dir / path.name)
        log.error(
            "%d record(s) of journal segment %s could not be decoded; it is kept in %s",
            unreadable,
            path.name,
            failed_dir,
        )
    else:
        path.unlink(missing_ok=True)
