"""The store writer in a process of its own (``PARLEY_WRITER=process``), so that planning
and committing rows never take the server's interpreter lock.

With the writer on a thread, the event loop and the writer shared one GIL: at
concurrency 16 the server used one core in all, ~45% of it in the writer. Here a child
process (``writer_child``) does the writing and the two talk over one socketpair in
frames (``writer_wire``: a 4-byte length, then a pickle):

- parent to child: the ``Settings`` first, then one command per frame: an exchange to
  commit (as plain tuples, ``pack_exchange``), with a sequence number when somebody
  waits for it; a drain marker; a batch of HTTP metric rows;
- child to parent: lists of events: "committed or failed" per sequence number, the
  Prometheus tallies of each committed batch, and the writer's counters.

Measured choices (docs/benchmarks.md, seventh pass): the child has no event loop and no
writer thread; it reads whatever has arrived, commits it as one batch with ``Writer``'s
own batch logic, and answers, so a batch grows while the previous one
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
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from parley.domain.exchange import Exchange
from parley.errors import StoreError
from parley.settings import Settings
from parley.store.writer import METRICS_FLUSH_ROWS, METRICS_FLUSH_SECONDS, RowMaker, settle
from parley.store.writer_wire import (
    COMMIT,
    COUNTS,
    DONE,
    DRAIN,
    METRICS,
    READ_SIZE,
    TALLIES,
    Tallies,
    frame,
    frames,
    pack_exchange,
    read_frame,
    reported_error,
)

log = logging.getLogger(__name__)

# The child's start (interpreter, SQLAlchemy, the engine) on a loaded machine.
START_TIMEOUT = 60.0

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
        inherit_fds: tuple[int, ...] = (),
    ) -> None:
        self._settings = settings
        self._on_commit = on_commit
        # Kept open in the child for its whole life (a journal's owner lock).
        self._inherit_fds = inherit_fds
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
        # A send of the outbox is scheduled (this turn of the loop) or waits for room.
        self._flushing = False
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
                [sys.executable, "-m", "parley.store.writer_child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(), *self._inherit_fds),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(START_TIMEOUT)
        try:
            ours.sendall(frame(self._settings))
            # The child's counters: its writer runs.
            self._on_events(read_frame(ours))
        except (EOFError, OSError) as exc:
            self._process.kill()
            self._process.wait()
            ours.close()
            self._ended.set()
            raise StoreError(f"the store writer process did not start: {exc}") from None
        ours.setblocking(False)

    def submit(self, exchange: Exchange) -> _Waiter:
        """Send ``exchange``; the future resolves once it is committed (or failed)."""
        future = self._attach().create_future()
        self._send(COMMIT, pack_exchange(exchange), future)
        return future

    def submit_nowait(self, exchange: Exchange) -> None:
        """Send ``exchange`` without waiting for it (the child logs a failure)."""
        self._attach()
        self._send(COMMIT, pack_exchange(exchange), None)

    def submit_unless_behind(self, exchange: Exchange, backlog_max: int) -> _Waiter | None:
        """As ``Writer.submit_unless_behind``, counting exchanges sent and not reported."""
        if self._in_flight < backlog_max:
            self.submit_nowait(exchange)
            return None
        return self.submit(exchange)

    def submit_metric(self, make_row: RowMaker) -> None:
        """Hold an ``http_metrics`` row maker (picklable: ``metrics.http_row.HttpRow``);
        held rows go to the child together, as ``Writer.submit_metric`` hands them over.
        Best effort, as there: dropped once the writer is stopped or its child is gone."""
        if self._stopping or self._ended.is_set():
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
        self._send(DRAIN, None, future)
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
        """Whether the child runs and its reports are read (health checks, and every
        durable request). Once the loop reads the socket, the end of the child's stream
        is what tells (no system call per request); before that, the process itself."""
        if self._ended.is_set() or self._process is None:
            return False
        return self._loop is not None or self._process.poll() is None

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
        if kind == COMMIT:
            self._in_flight += 1
        self._write(frame((kind, seq, payload)))

    def _send_held(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        if self._held and self._sock is not None and not self._ended.is_set():
            held, self._held = self._held, []
            self._write(frame((METRICS, 0, held)))

    def _write(self, data: bytes) -> None:
        """Queue ``data`` for the child. On the loop, everything written in one turn of
        it goes in one send (answers that came back together are committed together,
        and the child wakes once for them); without a loop, it is sent right away."""
        self._outbox += data
        if self._flushing:
            return
        if self._loop is None:
            self._flush()
        else:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        sock = self._sock
        if sock is None or not self._outbox or self._ended.is_set():
            return
        try:
            sent = sock.send(self._outbox)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the child is gone: the reader reports it
        del self._outbox[:sent]
        if not self._outbox:
            if self._stopping:
                self._shut()
        elif self._loop is not None:
            # The child is behind: the rest goes when the socket can take it.
            self._flushing = True
            self._loop.add_writer(sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        assert self._loop is not None and self._sock is not None
        self._loop.remove_writer(self._sock.fileno())
        self._flush()

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
                    data = sock.recv(READ_SIZE)
                except OSError:
                    data = b""
                self._received(data)
        elif not self._outbox:
            self._shut()
        # Otherwise the scheduled send shuts our end once the outbox is empty.

    def _shut(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._received(data)

    def _received(self, data: bytes) -> None:
        if data:
            self._inbox += data
            for events in frames(self._inbox):
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
        error = StoreError("the store writer stopped")
        _settle([(future, error) for future in lost.values()])
        if not self._stopping:
            log.critical("the store writer process ended: recording has stopped")
        self._ended.set()

    def _on_events(self, events: list[tuple[Any, ...]]) -> None:
        done: list[tuple[_Waiter, object]] = []
        for event in events:
            kind = event[0]
            if kind == DONE:
                _, seq, error, exchanges = event
                self._in_flight -= exchanges
                future = self._pending.pop(seq, None) if seq else None
                if future is not None:
                    done.append((future, None if error is None else reported_error(*error)))
            elif kind == COUNTS:
                _, self.committed, self.failed, self.batches = event
            elif kind == TALLIES and self._on_commit is not None:
                try:
                    self._on_commit(event[1])
                except Exception:
                    log.exception("a commit observer failed")
        _settle(done)


def _settle(done: list[tuple[_Waiter, object]]) -> None:
    """``writer.settle``, on the loop's thread or, after ``stop`` without a loop, on a
    loop that ended: nobody is left to tell then, and its futures cannot run callbacks."""
    with contextlib.suppress(RuntimeError):
        settle(done)
