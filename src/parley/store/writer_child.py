"""The store writer's child process: ``python -m parley.store.writer_child FD``.

It has no event loop and no thread of its own (only the checkpointer's, on SQLite): it
reads whatever the server has sent, commits it as one batch with ``Writer``'s own batch
logic, and answers, so a batch grows while the previous one commits. The end of the
server's stream (``ProcessWriter.stop``, or the server killed) makes it commit what it
has and exit. See ``writer_process`` for the protocol and its invariants.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
from typing import Any

import sqlalchemy

from parley.collector import tune_for_serving
from parley.domain.rollup import tally_hours
from parley.settings import Settings
from parley.store.engine import create_engine
from parley.store.writer import Item, Outcome, Writer
from parley.store.writer_wire import (
    COMMIT,
    COUNTS,
    DONE,
    DRAIN,
    METRICS,
    READ_SIZE,
    TALLIES,
    frame,
    frames,
    read_frame,
    report,
    unpack_exchange,
)


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
        # Hours only: all that the Prometheus counters read.
        self.events.append((TALLIES, tally_hours(rows)))

    def _resolve(self, outcomes: list[tuple[Item, Outcome]]) -> None:
        for item, outcome in outcomes:
            exchanges = 0 if item.exchange is None else 1
            self.events.append((DONE, item.seq, report(outcome), exchanges))


def _serve(sock: socket.socket, writer: _InlineWriter, batch_max: int) -> None:
    """The child's loop: read what the parent sent, commit it as one batch, report."""
    inbox = bytearray()
    while True:
        data = sock.recv(READ_SIZE)
        ended = not data
        inbox += data
        # Whatever else already arrived joins this batch (group commit).
        while not ended:
            try:
                more = sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            ended = not more
            inbox += more
        batch: list[Item] = []
        for kind, seq, payload in frames(inbox):
            if kind == COMMIT:
                batch.append(Item(unpack_exchange(payload), None, None, seq=seq))
            elif kind == DRAIN:
                batch.append(Item(None, None, None, seq=seq))
            elif kind == METRICS:
                batch.append(Item(None, None, None, payload))
        for at in range(0, len(batch), batch_max):
            writer.commit(batch[at : at + batch_max])
        if batch:
            writer.events.append((COUNTS, writer.committed, writer.failed, writer.batches))
            events, writer.events = writer.events, []
            with contextlib.suppress(OSError):  # the parent is gone; nobody to tell
                sock.sendall(frame(events))
        if ended:
            return


def main() -> None:
    """The child: ``python -m parley.store.writer_child FD``."""
    # Ctrl-C in a terminal, and systemd's stop, signal every process of the server: the
    # server handles the stop, and this child ends when the server closes its socket,
    # after committing everything sent (or when the server is gone: end of stream).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    settings: Settings = read_frame(sock)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [writer]: %(message)s",
    )
    engine = create_engine(settings)
    writer = _InlineWriter(engine, settings.writer_batch_max)
    writer.open()
    tune_for_serving()
    try:
        sock.sendall(frame([(COUNTS, 0, 0, 0)]))
        _serve(sock, writer, settings.writer_batch_max)
    finally:
        writer.close()
        engine.dispose()
        sock.close()


if __name__ == "__main__":
    main()
