"""The store writer in a process of its own (``PARLEY_WRITER=process``), so that planning
and committing rows never take the server's interpreter lock.

With the writer on a thread, the event loop and the writer shared one GIL: at
concurrency 16 the server used one core in all, ~45% of it in the writer. Here a child
process (``python -m parley.store.writer_process FD``) does the writing and the two talk
over one socketpair in frames (a 4-byte length, then a pickle):

- parent to child: the ``Settings`` first, then one command per frame: an exchange to
  commit (as plain tuples, ``pack_exchange``), with a sequence number when somebody
  waits for it; a drain marker; a batch of HTTP metric rows;
- child to parent: lists of events: "committed or failed" per sequence number, the
  Prometheus tallies of each committed batch, and the writer's counters.

Measured choices (docs/benchmarks.md, seventh pass): the child has no event loop and no
writer thread; it reads whatever has arrived, commits it as one batch with ``Writer``'s
own batch logic (``_InlineWriter``), and answers, so a batch grows while the previous one
commits. The parent reads and writes the socket from its event loop, with no thread of
its own. A first version with an event loop and a thread on each side cost the child
~900 us per exchange and the parent's loop ~250 us more per request: no gain.

Invariants:
- a future resolves only after the child reported its exchange committed, or with a
  ``StoreError``; if the child dies, every pending future fails with one and
  ``is_alive()`` turns false (``/healthz`` says so; durable requests get 503);
- commands reach the child in submission order (one socket, one loop), so a drain
  resolves after everything sent before it;
- the parent's end closing (``stop``, or the parent killed, even with SIGKILL) is the
  child's signal to commit everything it was sent and exit: an exchange already sent is
  never dropped, acknowledged or not;
- the child logs its own failures (its stderr is the parent's); the parent gets only
  ``StoreError``/``StoreFull`` and their messages, never a driver exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import operator
import pickle
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message, ToolCall
from parley.domain.rollup import Dims, Tally, tally_rows
from parley.domain.usage import Usage
from parley.errors import StoreError, StoreFull
from parley.settings import Settings
from parley.store.writer import (
    METRICS_FLUSH_ROWS,
    METRICS_FLUSH_SECONDS,
    Item,
    Outcome,
    RowMaker,
    Writer,
)

log = logging.getLogger(__name__)

Tallies = Mapping[tuple[str, datetime, Dims], Tally]

_HEAD = struct.Struct("!I")

# Commands (parent to child): (kind, sequence number or 0, payload).
_COMMIT = "x"  # an exchange; its sequence number is 0 when nobody waits for it
_DRAIN = "d"
_METRICS = "m"
# Events (child to parent).
_DONE = "a"  # (kind, seq, None | (error class name, message))
_TALLIES = "t"  # (kind, tallies)
_COUNTS = "s"  # (kind, committed, failed, batches)

# The child's start (interpreter, SQLAlchemy, the engine) on a loaded machine.
START_TIMEOUT = 60.0


# -- exchanges on the wire ----------------------------------------------------------------
# Plain tuples, datetimes as POSIX timestamps and UUIDs as integers: pickling the slotted
# dataclasses themselves cost ~45 us per exchange (their ``__getstate__`` is Python, and
# a datetime alone costs ~7 us), this ~7 us. ``tests/store/test_writer_process.py``
# checks that every field of every class below is carried.


def _when(value: datetime) -> float | datetime:
    # Aware datetimes round-trip exactly through a float at microsecond precision.
    return value.timestamp() if value.tzinfo is UTC else value


def _then(value: float | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC)


def _uuid_out(value: uuid.UUID | None) -> int | None:
    return None if value is None else value.int


def _uuid_in(value: int | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(int=value)


_usage = operator.attrgetter(*(f.name for f in dataclasses.fields(Usage)))
_tool_call = operator.attrgetter(*(f.name for f in dataclasses.fields(ToolCall)))


def _calls_out(calls: tuple[ToolCall, ...]) -> tuple[tuple[Any, ...], ...]:
    return tuple(_tool_call(c) for c in calls)


def _calls_in(calls: tuple[tuple[Any, ...], ...]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(*c) for c in calls)


def pack_exchange(ex: Exchange) -> tuple[Any, ...]:
    """``ex`` as plain values (``unpack_exchange`` is the inverse)."""
    reply = ex.reply_to
    return (
        ex.model_requested,
        tuple(
            (m.role, m.content, m.name, _calls_out(m.tool_calls), m.tool_call_id)
            for m in ex.messages
        ),
        _when(ex.started_at),
        ex.is_streaming,
        ex.endpoint,
        ex.client_protocol,
        ex.origin,
        ex.max_tokens,
        ex.temperature,
        ex.top_p,
        [
            (
                a.attempt,
                a.provider,
                a.model_used,
                _when(a.started_at),
                a.success,
                a.status_code,
                a.response_time_ms,
                a.time_to_first_token_ms,
                a.time_to_last_token_ms,
                a.tokens_per_second,
                a.finish_reason,
                a.error_type,
                a.error_message,
                _usage(a.usage),
                a.cost_usd,
                a.upstream_id,
            )
            for a in ex.attempts
        ],
        [
            (c.index, c.text, c.reasoning, _calls_out(c.tool_calls), c.finish_reason)
            for c in ex.choices
        ],
        ex.user_id,
        ex.api_key_id,
        _uuid_out(ex.chain_id),
        None
        if reply is None
        else (
            reply.conversation_id,
            reply.conversation_public_id.int,
            reply.parent_message_id,
            reply.parent_chain_hash,
            tuple(u.int for u in reply.answer_public_ids),
        ),
    )


def unpack_exchange(v: tuple[Any, ...]) -> Exchange:
    reply = v[15]
    return Exchange(
        model_requested=v[0],
        messages=tuple(Message(m[0], m[1], m[2], _calls_in(m[3]), m[4]) for m in v[1]),
        started_at=_then(v[2]),
        is_streaming=v[3],
        endpoint=v[4],
        client_protocol=v[5],
        origin=v[6],
        max_tokens=v[7],
        temperature=v[8],
        top_p=v[9],
        attempts=[
            Attempt(
                attempt=a[0],
                provider=a[1],
                model_used=a[2],
                started_at=_then(a[3]),
                success=a[4],
                status_code=a[5],
                response_time_ms=a[6],
                time_to_first_token_ms=a[7],
                time_to_last_token_ms=a[8],
                tokens_per_second=a[9],
                finish_reason=a[10],
                error_type=a[11],
                error_message=a[12],
                usage=Usage(*a[13]),
                cost_usd=a[14],
                upstream_id=a[15],
            )
            for a in v[10]
        ],
        choices=[Choice(c[0], c[1], c[2], _calls_in(c[3]), c[4]) for c in v[11]],
        user_id=v[12],
        api_key_id=v[13],
        chain_id=_uuid_in(v[14]),
        reply_to=None
        if reply is None
        else ReplyTo(
            reply[0],
            uuid.UUID(int=reply[1]),
            reply[2],
            reply[3],
            tuple(uuid.UUID(int=u) for u in reply[4]),
        ),
    )


def _frame(payload: object) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data)) + data


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return bytes(buffer)


def _frames(buffer: bytearray) -> list[Any]:
    """The payloads of the complete frames at the start of ``buffer``, removed from it."""
    out: list[Any] = []
    at = 0
    size = len(buffer)
    while size - at >= _HEAD.size:
        (length,) = _HEAD.unpack_from(buffer, at)
        end = at + _HEAD.size + length
        if end > size:
            break
        out.append(pickle.loads(memoryview(buffer)[at + _HEAD.size : end]))
        at = end
    del buffer[:at]
    return out


_Waiter = asyncio.Future[Any]


class ProcessWriter:
    """``Writer``'s interface, with the writing done by a child process; see the module
    docstring. ``on_commit`` gets the Prometheus tallies of each committed batch.

    The socket is read and written by the event loop of the first ``submit`` (no thread
    of its own: a reader thread's wake-ups cost the loop the GIL); ``stop`` may be called
    from any other thread while that loop runs, or from anywhere once it has ended.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        on_commit: Callable[[Tallies], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_commit = on_commit
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._ended = threading.Event()
        self._seq = 0
        self._pending: dict[int, _Waiter] = {}
        # Exchanges sent and not yet reported on (the async-recording bound).
        self._in_flight = 0
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._held: list[RowMaker] = []
        self._held_timer: asyncio.TimerHandle | None = None
        self.committed = 0
        self.failed = 0
        self.batches = 0

    def start(self) -> None:
        """Start the child and wait until its writer runs. Blocks."""
        if self._process is not None or self._stopping:
            raise RuntimeError("a writer starts once")
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "parley.store.writer_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(START_TIMEOUT)
        try:
            ours.sendall(_frame(self._settings))
            hello = bytearray()
            while not (events := _frames(hello)):
                data = ours.recv(1 << 16)
                if not data:
                    raise EOFError("the child ended")
                hello += data
        except (EOFError, OSError) as exc:
            self._process.kill()
            self._process.wait()
            ours.close()
            self._ended.set()
            raise StoreError(f"the store writer process did not start: {exc}") from None
        ours.setblocking(False)
        for event in events:
            self._on_events(event)

    def submit(self, exchange: Exchange) -> _Waiter:
        """Send ``exchange``; the future resolves once it is committed (or failed)."""
        future = self._attach().create_future()
        self._send(_COMMIT, pack_exchange(exchange), future)
        return future

    def submit_nowait(self, exchange: Exchange) -> None:
        """Send ``exchange`` without waiting for it (the child logs a failure)."""
        self._attach()
        self._send(_COMMIT, pack_exchange(exchange), None)

    def submit_unless_behind(self, exchange: Exchange, backlog_max: int) -> _Waiter | None:
        """As ``Writer.submit_unless_behind``, counting exchanges sent and not reported."""
        if self._in_flight < backlog_max:
            self.submit_nowait(exchange)
            return None
        return self.submit(exchange)

    def submit_metric(self, make_row: RowMaker) -> None:
        """Hold an ``http_metrics`` row maker (picklable: ``metrics.http_row.HttpRow``);
        held rows go to the child together, as ``Writer.submit_metric`` hands them over."""
        if self._stopping:
            return
        loop = self._attach()
        self._held.append(make_row)
        if len(self._held) >= METRICS_FLUSH_ROWS:
            self._send_held()
        elif len(self._held) == 1:
            self._held_timer = loop.call_later(METRICS_FLUSH_SECONDS, self._send_held)

    async def drain(self) -> None:
        """Return once everything sent before this call is committed (or failed)."""
        if not self.is_alive():
            raise StoreError("the store writer is not running")
        future = self._attach().create_future()
        self._send_held()
        self._send(_DRAIN, None, future)
        await future

    def stop(self, timeout: float | None = None) -> None:
        """Have the child commit everything sent, then end it. Blocks: call it from
        another thread than the loop's (``asyncio.to_thread``)."""
        loop = self._loop
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is not None and loop is not here and loop.is_running():
            loop.call_soon_threadsafe(self._finish)
        else:
            # No loop serves the socket (or this is its thread): finish right here.
            self._finish(blocking=True)
        if self._process is None:
            return
        if not self._ended.wait(timeout):
            raise StoreError(f"the store writer did not finish within {timeout}s")
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StoreError(f"the store writer did not finish within {timeout}s") from None
        if code != 0:
            raise StoreError(f"the store writer process ended with exit code {code}")

    def is_alive(self) -> bool:
        """Whether the child runs and its reports are read (health checks)."""
        return (
            not self._ended.is_set() and self._process is not None and self._process.poll() is None
        )

    # -- on the loop ----------------------------------------------------------------------

    def _attach(self) -> asyncio.AbstractEventLoop:
        if self._stopping or self._ended.is_set():
            raise StoreError("the store writer is stopped")
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("a process writer serves one event loop")
        if self._sock is None or self._ended.is_set():
            raise StoreError("the store writer is not running")
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._on_readable)
        return loop

    def _send(self, kind: str, payload: object, future: _Waiter | None) -> None:
        if self._stopping or self._sock is None or self._ended.is_set():
            raise StoreError("the store writer is stopped")
        seq = 0
        if future is not None:
            self._seq += 1
            seq = self._seq
            self._pending[seq] = future
        if kind == _COMMIT:
            self._in_flight += 1
        self._write(_frame((kind, seq, payload)))

    def _send_held(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if self._held and self._sock is not None and not self._ended.is_set():
            held, self._held = self._held, []
            self._write(_frame((_METRICS, 0, held)))

    def _write(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        if not self._outbox:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return  # the child is gone: the reader reports it
            if sent == len(data):
                return
            data = data[sent:]
            if self._loop is not None:
                self._loop.add_writer(sock.fileno(), self._on_writable)
        self._outbox += data

    def _on_writable(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sent = sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._outbox)
        del self._outbox[:sent]
        if not self._outbox:
            assert self._loop is not None
            self._loop.remove_writer(sock.fileno())
            if self._stopping:
                self._shut()

    def _finish(self, blocking: bool = False) -> None:
        """Send what is held and close our end: the child commits it all and exits."""
        if self._stopping:
            return
        self._stopping = True
        self._send_held()
        sock = self._sock
        if sock is None or self._ended.is_set():
            self._ended.set()
            return
        if blocking:
            # No loop: the rest of the stream, then the child's last reports, here.
            sock.setblocking(True)
            if self._outbox:
                sock.sendall(self._outbox)
                self._outbox.clear()
            self._shut()
            while not self._ended.is_set():
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    data = b""
                self._received(data)
        elif not self._outbox:
            self._shut()

    def _shut(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._received(data)

    def _received(self, data: bytes) -> None:
        if data:
            self._inbox += data
            for events in _frames(self._inbox):
                self._on_events(events)
            return
        # The end of the stream: the child exited (or died).
        sock = self._sock
        assert sock is not None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            if self._outbox:
                self._loop.remove_writer(sock.fileno())
        sock.close()
        lost, self._pending = self._pending, {}
        for future in lost.values():
            _settle(future, StoreError("the store writer stopped"))
        if not self._stopping:
            log.critical("the store writer process ended: recording has stopped")
        self._ended.set()

    def _on_events(self, events: list[tuple[Any, ...]]) -> None:
        for event in events:
            kind = event[0]
            if kind == _DONE:
                _, seq, error, exchanges = event
                self._in_flight -= exchanges
                future = self._pending.pop(seq, None) if seq else None
                if future is not None:
                    _settle(future, None if error is None else _error(*error))
            elif kind == _COUNTS:
                _, self.committed, self.failed, self.batches = event
            elif kind == _TALLIES and self._on_commit is not None:
                try:
                    self._on_commit(event[1])
                except Exception:
                    log.exception("a commit observer failed")


def _settle(future: _Waiter, error: StoreError | None) -> None:
    if future.done():  # cancelled by its caller; the record is committed anyway
        return
    # A loop that already ended cannot run the callbacks: nobody is left to tell.
    with contextlib.suppress(RuntimeError):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def _error(kind: str, message: str) -> StoreError:
    return StoreFull(message) if kind == "StoreFull" else StoreError(message)


def _report(error: object) -> tuple[str, str] | None:
    if not isinstance(error, BaseException):
        return None
    if isinstance(error, StoreError):
        return (type(error).__name__, error.message)
    return ("StoreError", f"the exchange could not be recorded: {type(error).__name__}")


class _InlineWriter(Writer):
    """The child's writer: each batch is committed on the calling thread, and its
    outcomes are collected for the parent instead of resolving futures."""

    def __init__(self, engine: sqlalchemy.Engine, batch_max: int) -> None:
        super().__init__(engine, batch_max=batch_max, on_commit=self._observe_rows)
        self.events: list[tuple[Any, ...]] = []
        self._conn: sqlalchemy.Connection | None = None

    def open(self) -> None:
        self._start_checkpointer()

    def commit(self, batch: list[Item]) -> None:
        self._conn = self._commit(self._conn, batch)

    def close(self) -> None:
        self._close(self._conn)
        self._conn = None
        if self._checkpointer is not None:
            self._checkpointer.stop()

    def _observe_rows(self, rows: list[dict[str, Any]]) -> None:
        self.events.append((_TALLIES, tally_rows(rows)))

    def _resolve(self, outcomes: list[tuple[Item, Outcome]]) -> None:
        for item, outcome in outcomes:
            exchanges = 0 if item.exchange is None else 1
            self.events.append((_DONE, item.seq, _report(outcome), exchanges))


def _serve(sock: socket.socket, writer: _InlineWriter, batch_max: int) -> None:
    """The child's loop: read what the parent sent, commit it as one batch, report."""
    inbox = bytearray()
    while True:
        sock.setblocking(True)
        data = sock.recv(1 << 20)
        ended = not data
        inbox += data
        # Whatever else already arrived joins this batch (group commit).
        sock.setblocking(False)
        while not ended:
            try:
                more = sock.recv(1 << 20)
            except BlockingIOError:
                break
            ended = not more
            inbox += more
        batch: list[Item] = []
        for kind, seq, payload in _frames(inbox):
            if kind == _COMMIT:
                batch.append(Item(unpack_exchange(payload), None, None, seq=seq))
            elif kind == _DRAIN:
                batch.append(Item(None, None, None, seq=seq))
            elif kind == _METRICS:
                batch.append(Item(None, None, None, payload))
        for at in range(0, len(batch), batch_max):
            writer.commit(batch[at : at + batch_max])
        if batch:
            writer.events.append((_COUNTS, writer.committed, writer.failed, writer.batches))
            events, writer.events = writer.events, []
            sock.setblocking(True)
            with contextlib.suppress(OSError):  # the parent is gone; nobody to tell
                sock.sendall(_frame(events))
        if ended:
            return


def main() -> None:
    """The child: ``python -m parley.store.writer_process FD``."""
    from parley.store.engine import create_engine

    sock = socket.socket(fileno=int(sys.argv[1]))
    settings: Settings = pickle.loads(
        _read_exactly(sock, _HEAD.unpack(_read_exactly(sock, _HEAD.size))[0])
    )
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [writer]: %(message)s",
    )
    engine = create_engine(settings)
    writer = _InlineWriter(engine, settings.writer_batch_max)
    writer.open()
    try:
        sock.sendall(_frame([(_COUNTS, 0, 0, 0)]))
        _serve(sock, writer, settings.writer_batch_max)
    finally:
        writer.close()
        engine.dispose()
        sock.close()


if __name__ == "__main__":
    main()
