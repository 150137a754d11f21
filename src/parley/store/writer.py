"""The group-commit writer: the one place exchanges are committed, many per transaction.

A dedicated thread owns one connection. Callers on event loops hand it exchanges through a
``queue.SimpleQueue`` (``submit`` costs a future and a put, nothing else). The thread
blocks for one item, takes whatever else is already queued (up to ``batch_max`` in all),
writes the lot in one transaction and commits, then resolves that batch's futures with a
single ``call_soon_threadsafe`` per event loop: one commit and one wake-up serve the
whole batch.

Invariants:
- a future resolves only after its exchange is committed, or with a ``StoreError``;
  nothing submitted is dropped without a result or a log line;
- one bad exchange cannot sink its batch: a failed batch is rolled back and retried one
  exchange per transaction, and only the exchanges that fail alone get the error;
- a batch whose COMMIT failed (a connection lost then: PostgreSQL may have committed it)
  is looked up by chain id before that retry, so an exchange is never stored twice;
- items are committed in submission order, so ``drain`` (a marker in the queue) resolves
  once everything submitted before it is committed;
- ``stop`` commits everything queued before it, then joins the thread; ``submit`` after
  ``stop`` raises ``StoreError``;
- a database that refuses writes for lack of space fails the batch with ``StoreFull``
  (the transaction is rolled back whole, so nothing is half-written) and the writer
  carries on: the next batch commits as soon as space is freed, without a restart;
- after a database-level failure (disk full, connection lost, lock timeout) the
  connection is discarded and the next batch opens a fresh one, so no batch inherits a
  connection left in a doubtful state.

The event loop is taken at submit time, so one writer may serve several loops over its
life (tests run one loop per test).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy
from sqlalchemy.exc import InterfaceError, OperationalError

from parley.domain.exchange import Exchange
from parley.errors import StoreError, StoreFull
from parley.store import rollups
from parley.store.bulk import bulk_insert
from parley.store.engine import (
    AUTOCHECKPOINT_PAGES,
    Checkpointer,
    is_disk_full,
    writer_connection,
)
from parley.store.exchange_lookups import stored_chains
from parley.store.exchanges import Recorded, write_batch
from parley.store.schema import http_metrics

log = logging.getLogger(__name__)

Outcome = Recorded | BaseException | None


@dataclass(slots=True)
class Item:
    # None marks a drain request: it resolves when everything before it is committed.
    exchange: Exchange | None
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None
    # HTTP metrics, each built (and redacted) on the writer thread, off the request's path.
    metrics: list[RowMaker] | None = None
    # The parent's number for an item that came from another process (writer_process).
    seq: int = 0


_STOP = object()
# Wakes an idle writer thread so that it starts the second of newly held metric rows.
_TICK = object()

# Held HTTP metric rows are written once this many are held, or this long after the
# first of them, whichever comes first (and always by ``drain`` and ``stop``).
METRICS_FLUSH_ROWS = 256
METRICS_FLUSH_SECONDS = 1.0


class RowMaker(Protocol):
    """Builds one ``http_metrics`` row on the writer's side (``metrics.http_row.HttpRow``)."""

    def __call__(self) -> dict[str, Any]: ...


class RecordWriter(Protocol):
    """What the server needs of a writer: ``Writer`` (a thread of this process) or
    ``writer_process.ProcessWriter`` (a child process); ``Settings.writer`` chooses."""

    committed: int
    failed: int
    batches: int

    def start(self) -> None: ...

    def submit(self, exchange: Exchange) -> asyncio.Future[Any]: ...

    def submit_nowait(self, exchange: Exchange) -> None: ...

    def submit_unless_behind(
        self, exchange: Exchange, backlog_max: int
    ) -> asyncio.Future[Any] | None: ...

    def submit_metric(self, make_row: RowMaker) -> None: ...

    async def drain(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class Writer:
    """Commits exchanges in batches from one thread; see the module docstring."""

    def __init__(
        self,
        engine: sqlalchemy.Engine,
        *,
        batch_max: int = 512,
        on_commit: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        self._engine = engine
        self._batch_max = batch_max
        # Called on the writer thread with the request-log rows of each committed batch
        # (the Prometheus collectors); an error in it is logged, never fails the batch.
        self._on_commit = on_commit
        # HTTP metric rows (their makers), written together every few hundred rows or
        # every second: a commit of their own per request cost more than the row. They
        # are held on the submitting side (under ``_lock``) until then, so a request costs
        # the writer thread no wake-up of its own.
        self._held: list[RowMaker] = []
        self._held_since = 0.0
        # Rollup rows this thread's connection wrote (SQLite): merged without a read.
        self._rollups = rollups.RollupCache()
        # SQLite: checkpoints run on a thread of their own, never inside a commit.
        self._checkpointer: Checkpointer | None = None
        self._queue: queue.SimpleQueue[Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Guards "not stopping" + put against stop's put of the stop marker, so nothing
        # can be queued behind the marker and wait forever.
        self._lock = threading.Lock()
        self._stopping = False
        # Written only by the writer thread; read anywhere (ints are safe to read).
        self.committed = 0
        self.failed = 0
        self.batches = 0

    def start(self) -> None:
        if self._thread is not None or self._stopping:
            raise RuntimeError("a writer starts once")
        self._start_checkpointer()
        self._thread = threading.Thread(target=self._run, name="parley-writer", daemon=True)
        self._thread.start()

    def _start_checkpointer(self) -> None:
        if self._engine.dialect.name == "sqlite":
            self._checkpointer = Checkpointer(self._engine)
            self._checkpointer.start()

    def submit(self, exchange: Exchange) -> asyncio.Future[Recorded]:
        """Queue ``exchange``; the future resolves once it is committed (or failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Recorded] = loop.create_future()
        self._put(Item(exchange, future, loop))
        return future

    def submit_nowait(self, exchange: Exchange) -> None:
        """Queue ``exchange`` without waiting for it (a failure is logged)."""
        self._put(Item(exchange, None, None))

    def submit_unless_behind(
        self, exchange: Exchange, backlog_max: int
    ) -> asyncio.Future[Recorded] | None:
        """Queue ``exchange`` without waiting (None), or, with ``backlog_max`` items already
        queued and not yet taken by the thread, as ``submit`` does: the future of its commit.

        Async recording's bound: a writer that falls behind slows its clients down instead
        of filling memory with records a crash would lose.
        """
        if self._queue.qsize() < backlog_max:
            self.submit_nowait(exchange)
            return None
        return self.submit(exchange)

    def submit_metric(self, make_row: RowMaker) -> None:
        """Queue an ``http_metrics`` row, built by ``make_row`` on the writer thread.

        Best effort: metric rows are held here, handed to the thread together
        (``METRICS_FLUSH_ROWS`` / ``METRICS_FLUSH_SECONDS``; ``drain`` and ``stop`` take
        them at once) and commit in a transaction of their own, after the exchanges of
        their batch; a failure is logged and drops them, never an exchange. A stopped
        writer drops new ones silently. Measured: a queue item per request cost the
        writer thread a wake-up and the event loop a GIL hand-over each, ~60 us of CPU
        per request between them at concurrency 16.
        """
        with self._lock:
            if self._stopping:
                return
            self._held.append(make_row)
            if len(self._held) == 1:
                self._held_since = time.monotonic()
                self._queue.put(_TICK)
            elif len(self._held) >= METRICS_FLUSH_ROWS:
                self._hand_over_held()

    def submit_metric_batch(self, makers: list[RowMaker]) -> None:
        """Queue metric rows that were held elsewhere (``ProcessWriter``) as one item."""
        with self._lock:
            if not self._stopping and makers:
                self._queue.put(Item(None, None, None, makers))

    def _hand_over_held(self) -> None:
        """Queue the held metric rows as one item (the caller holds ``_lock``)."""
        if self._held:
            self._queue.put(Item(None, None, None, self._held))
            self._held = []

    async def drain(self) -> None:
        """Return once everything submitted before this call is committed (or failed)."""
        if not self.is_alive():
            raise StoreError("the store writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._put(Item(None, future, loop))
        await future

    def stop(self, timeout: float | None = None) -> None:
        """Commit everything queued, then end the thread.

        Blocks: from an event loop, call it through ``asyncio.to_thread``.
        """
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._hand_over_held()
                self._queue.put(_STOP)
        thread = self._thread
        if thread is None:
            self._fail_queued(StoreError("the store writer was stopped before it started"))
            return
        thread.join(timeout)
        if thread.is_alive():
            raise StoreError(f"the store writer did not finish within {timeout}s")
        if self._checkpointer is not None:
            self._checkpointer.stop()

    def is_alive(self) -> bool:
        """Whether the writer thread is running (health checks report it)."""
        return self._thread is not None and self._thread.is_alive()

    def _put(self, item: Item) -> None:
        with self._lock:
            if self._stopping:
                raise StoreError("the store writer is stopped")
            if item.exchange is None:
                self._hand_over_held()  # a drain waits for the metric rows before it
            self._queue.put(item)

    def _run(self) -> None:
        conn: sqlalchemy.Connection | None = None
        batch: list[Item] = []
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    conn = self._commit(conn, batch)
                batch = []
                if stop:
                    return
        except BaseException as exc:
            # Nothing may be left waiting forever if the thread itself dies.
            log.critical("store writer stopped on an unexpected error", exc_info=exc)
            with self._lock:
                self._stopping = True
            error = StoreError(f"the store writer stopped: {type(exc).__name__}")
            self._resolve([(item, error) for item in batch])
            self._fail_queued(error)
            raise
        finally:
            self._close(conn)

    def _commit(
        self, conn: sqlalchemy.Connection | None, batch: list[Item]
    ) -> sqlalchemy.Connection | None:
        """Commit ``batch`` and resolve its items; the connection for the next batch."""
        # Connected lazily, so a database that is down at start (or goes away) fails
        # batches, not the writer.
        if conn is None or conn.closed:
            conn = self._connect(batch)
        if conn is not None and not self._process(conn, batch):
            _discard(conn)
            conn = None
        if self._checkpointer is not None and conn is not None:
            self._checkpointer.committed(conn)
        return conn

    def _close(self, conn: sqlalchemy.Connection | None) -> None:
        if conn is not None:
            if self._checkpointer is not None and not conn.invalidated:
                # Back to the pool as it came: other users checkpoint as they commit.
                _set_autocheckpoint(conn, AUTOCHECKPOINT_PAGES)
            conn.close()

    def _connect(self, batch: list[Item]) -> sqlalchemy.Connection | None:
        try:
            conn = writer_connection(self._engine)
            if self._checkpointer is not None:
                _set_autocheckpoint(conn, 0)
            return conn
        except Exception as exc:
            error = _store_error(exc, f"the database is unavailable: {type(exc).__name__}")
            if isinstance(error, StoreFull):
                log.error("store writer cannot connect: %s", exc)
            else:
                log.error("store writer cannot connect to the database", exc_info=exc)
            self.failed += sum(1 for item in batch if item.exchange is not None)
            self._resolve([(item, error) for item in batch])
            return None

    def _next_batch(self) -> tuple[list[Item], bool]:
        batch: list[Item] = []
        with self._lock:
            due = self._held_since + METRICS_FLUSH_SECONDS if self._held else None
        try:
            # With metric rows held, wake up in time to write them.
            wait = None if due is None else max(due - time.monotonic(), 0.0)
            item = self._queue.get(timeout=wait)
        except queue.Empty:
            item = _TICK
        while True:
            if item is _STOP:
                return batch, True
            if item is not _TICK:
                assert isinstance(item, Item)
                batch.append(item)
                if len(batch) >= self._batch_max:
                    break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        with self._lock:
            held = self._held
            if held and time.monotonic() >= self._held_since + METRICS_FLUSH_SECONDS:
                self._held = []
                batch.append(Item(None, None, None, held))
        return batch, False

    def _process(self, conn: sqlalchemy.Connection, batch: list[Item]) -> bool:
        """Commit ``batch``; return whether ``conn`` may be used for the next one."""
        healthy = True
        # Metric rows arrive only when due (a full hold, their second up, drain, stop).
        metrics = [m for item in batch if item.metrics is not None for m in item.metrics]
        batch = [item for item in batch if item.metrics is None]
        work = [item for item in batch if item.exchange is not None]
        exchanges = [item.exchange for item in work if item.exchange is not None]
        outcomes: list[Outcome] = []
        if exchanges:
            try:
                with conn.begin():
                    outcomes = list(write_batch(conn, exchanges, self._rollups))
                self._rollups.settle()
                self.batches += 1
                self.committed += len(exchanges)
            except Exception as exc:
                log.warning(
                    "store batch of %d failed (%s); retrying one by one", len(exchanges), exc
                )
                # Outcomes here mean the rows were written and the COMMIT itself failed:
                # on a lost connection it may have committed all the same.
                outcomes = self._one_by_one(conn, exchanges, outcomes)
                healthy = not any(_database_failed(outcome) for outcome in outcomes)
        if metrics:
            # Before the results: a drain marker waits for the rows queued before it.
            self._write_metrics(conn, metrics)
        results = dict(zip(map(id, work), outcomes, strict=True))
        self._resolve([(item, results.get(id(item))) for item in batch])
        self._observe(outcomes)
        return healthy and not conn.invalidated

    def _write_metrics(self, conn: sqlalchemy.Connection, makers: list[RowMaker]) -> None:
        try:
            rows = [make() for make in makers]
            with conn.begin():
                bulk_insert(conn, http_metrics, rows)
        except Exception:
            log.exception("%d HTTP metric rows could not be recorded", len(makers))

    def _observe(self, outcomes: list[Outcome]) -> None:
        if self._on_commit is None:
            return
        rows = [row for o in outcomes if isinstance(o, Recorded) for row in o.attempt_rows]
        if rows:
            try:
                self._on_commit(rows)
            except Exception:
                log.exception("an observer of committed exchanges failed")

    def _one_by_one(
        self,
        conn: sqlalchemy.Connection,
        exchanges: list[Exchange],
        written: list[Outcome],
    ) -> list[Outcome]:
        """Retry a failed batch's exchanges one at a time. ``written`` (in batch order) are
        the outcomes of a batch whose COMMIT failed: those it committed after all are not
        written twice."""
        stored = _committed_anyway(conn, exchanges) if written else set()
        outcomes: list[Outcome] = []
        for i, exchange in enumerate(exchanges):
            if exchange.chain_id in stored:
                self.committed += 1
                outcomes.append(written[i])
                continue
            outcome = self._one(conn, exchange)
            outcomes.append(outcome)
            if _database_failed(outcome):
                # The database failed, not this record (locked past the busy timeout,
                # gone, disk full): retrying the rest would wait that long for each one.
                assert isinstance(outcome, StoreError)
                rest = len(exchanges) - i - 1
                self.failed += rest
                outcomes.extend(type(outcome)(outcome.message) for _ in range(rest))
                break
        return outcomes

    def _one(self, conn: sqlalchemy.Connection, exchange: Exchange) -> Outcome:
        try:
            with conn.begin():
                (recorded,) = write_batch(conn, [exchange], self._rollups)
        except Exception as exc:
            self.failed += 1
            error = _store_error(exc, f"could not record the exchange: {type(exc).__name__}")
            if isinstance(error, StoreFull):
                # Expected until an operator frees space: one line, no traceback.
                log.error("could not record exchange %s: %s", exchange.chain_id, error.message)
            else:
                log.error(
                    "could not record exchange %s (model %r)",
                    exchange.chain_id,
                    exchange.model_requested,
                    exc_info=exc,
                )
            return error
        self._rollups.settle()
        self.batches += 1
        self.committed += 1
        return recorded

    def _resolve(self, outcomes: list[tuple[Item, Outcome]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], object]]]
        by_loop = {}
        for item, outcome in outcomes:
            if item.future is not None and item.loop is not None:
                by_loop.setdefault(item.loop, []).append((item.future, outcome))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(settle, pairs)
            except RuntimeError:
                # The loop closed while its exchanges were being written; they are
                # committed (or logged), there is just nobody left to tell.
                log.debug("event loop closed before %d results were delivered", len(pairs))

    def _fail_queued(self, error: StoreError) -> None:
        pending: list[tuple[Item, Outcome]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Item):
                pending.append((item, error))
        self._resolve(pending)


def _committed_anyway(conn: sqlalchemy.Connection, exchanges: list[Exchange]) -> set[uuid.UUID]:
    """``stored_chains`` after a failed COMMIT; empty when the database cannot say."""
    try:
        with conn.begin():
            return stored_chains(conn, exchanges)
    except Exception as exc:
        log.warning("could not tell which exchanges of the failed batch committed: %s", exc)
        return set()


def _set_autocheckpoint(conn: sqlalchemy.Connection, pages: int) -> None:
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    # On the driver connection: through SQLAlchemy it would open a transaction.
    dbapi_connection.execute(f"PRAGMA wal_autocheckpoint={pages}")


def _discard(conn: sqlalchemy.Connection) -> None:
    """Close a connection the database failed on; a close that fails too is only logged."""
    try:
        conn.invalidate()
        conn.close()
    except Exception as exc:
        log.warning("could not close the store writer's failed connection: %s", exc)


def _store_error(exc: BaseException, message: str) -> StoreError:
    """The error a caller gets for ``exc``: ``StoreFull`` when the disk is full."""
    error: StoreError
    if is_disk_full(exc):
        error = StoreFull(
            "the database's disk is full: the exchange was not recorded; "
            "recording resumes once space is freed"
        )
    else:
        error = StoreError(message)
    error.__cause__ = exc
    return error


def _database_failed(outcome: Outcome) -> bool:
    """Whether ``outcome`` is the database failing (rather than one bad record)."""
    return isinstance(outcome, StoreError) and isinstance(
        outcome.__cause__, OperationalError | InterfaceError
    )


def settle(pairs: list[tuple[asyncio.Future[Any], object]]) -> None:
    """Runs on the submitting loop: hand every future its result."""
    for future, outcome in pairs:
        if future.done():  # cancelled by its caller; the record is committed anyway
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
