"""Retention: delete raw measurements older than their configured age, in small batches.

What is pruned is one list, ``TARGETS``: (table, timestamp column, ``Retention`` setting
holding its age in days). A table listed there that does not exist yet is skipped, so a
later schema adds its table and retention picks it up with no other change.

Invariants:
- a database without parley's schema, or at a revision a newer parley made (whose tables
  may point at the rows deleted here in ways this code does not know), is refused
  before anything is deleted;
- only the tables in ``TARGETS`` are touched, and the rate-limit counters of minutes
  past (``rate_windows``, kept an hour). Conversations, messages, responses, users,
  attachments and rollups never are: a message or response that pointed at a deleted
  request-log row keeps its content and gets ``request_id = NULL`` (the schema's
  ``ON DELETE SET NULL``, enforced by the database in the same statement);
- a setting of 0 days (or less) keeps that table forever;
- each batch is its own short transaction of at most ``settings.retention.batch_size``
  rows (oldest first, through the index on the timestamp column), followed by a pause
  of at least ``MIN_PAUSE_SECONDS`` and ``PAUSE_RATIO`` times the batch's duration. On
  SQLite a batch holds the write lock, which the group-commit writer waits for: the
  pause lets it in, so retention takes at most about a third of the lock's time, and
  the writer never waits longer than one batch (about 13 ms for 1,000 rows: measured
  with ``bench/retention_bench.py``, where /v1 p99 stayed within 1.2x of idle);
- on SQLite each batch is followed by a PASSIVE checkpoint on retention's connection,
  so the log it fills is folded in there, not by a commit a request is waiting on;
- every committed batch stays committed: a run stopped part-way (``stop`` set, or an
  error) has deleted only rows older than the cutoff, oldest first, and the next run
  carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from parley.domain.times import utc
from parley.errors import ConfigError, StoreError
from parley.ops.dbfile import check_database_file
from parley.ops.migrate import require_known
from parley.settings import Settings
from parley.store import retention as store
from parley.store.engine import (
    IMMEDIATE,
    cannot_connect,
    create_engine,
    driver_message,
    sqlite_path,
)
from parley.store.limits import LimitStore

log = logging.getLogger(__name__)

# After each batch, wait at least this long, and at least PAUSE_RATIO times as long as
# the batch took (see the module docstring; tuned with bench/retention_bench.py).
MIN_PAUSE_SECONDS = 0.05
PAUSE_RATIO = 2.0
# Rate-limit counters (``rate_windows``, one per subject and minute) older than this go.
RATE_WINDOWS_KEPT = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Target:
    """A table retention prunes: rows whose ``column`` is older than the number of days
    in ``settings.retention.<days_setting>`` are deleted."""

    table: str
    column: str
    days_setting: str


TARGETS: tuple[Target, ...] = (
    Target("request_log", "created_at", "request_log_days"),
    # Issue 6 adds this table; until then it is skipped as absent.
    Target("http_metrics", "created_at", "http_metrics_days"),
)


@dataclass(frozen=True, slots=True)
class TableReport:
    table: str
    days: float
    # None when the table is kept forever.
    cutoff: datetime | None
    # "pruned", "dry run" (``deleted`` is then what would go), "kept forever",
    # "no such table" or "stopped" (``stop`` was set part-way).
    status: str
    deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    # False: no index on the timestamp column, so batches walked primary-key windows.
    indexed: bool = True
    # The longest a batch held the write lock (its transaction, commit included).
    longest_batch: float = 0.0
    # All batches' transactions together: the write lock's time taken by retention.
    held_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class RetentionReport:
    tables: tuple[TableReport, ...]
    seconds: float
    dry_run: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def deleted(self) -> dict[str, int]:
        """Rows deleted (or, in a dry run, that would be) per table."""
        return {t.table: t.deleted for t in self.tables}

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "seconds": round(self.seconds, 3),
            "dry_run": self.dry_run,
            "tables": [
                {
                    "table": t.table,
                    "days": t.days,
                    "cutoff": None if t.cutoff is None else t.cutoff.isoformat(),
                    "status": t.status,
                    "deleted": t.deleted,
                    "batches": t.batches,
                    "seconds": round(t.seconds, 3),
                    "indexed": t.indexed,
                    "longest_batch": round(t.longest_batch, 4),
                    "held_seconds": round(t.held_seconds, 3),
                }
                for t in self.tables
            ],
        }


def run_retention(
    settings: Settings,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    targets: Sequence[Target] = TARGETS,
    pause: float = MIN_PAUSE_SECONDS,
    pause_ratio: float = PAUSE_RATIO,
    checkpoint: bool = True,
) -> RetentionReport:
    """Delete every target's rows older than its configured age; see the module docstring.

    ``dry_run`` only counts. ``stop``, when set (a server shutting down), ends the run
    after the batch in progress. ``pause`` and ``pause_ratio`` set the wait after each
    batch (at least ``pause`` seconds and ``pause_ratio`` times the batch's duration);
    ``checkpoint`` folds SQLite's log in after each batch (see ``store.retention``).
    Raises ``ConfigError`` when there is no database, or no parley schema, or one a newer
    parley migrated; and ``StoreError`` when the database fails part-way (batches already
    committed stay).
    """
    started_at = utc(now) if now is not None else datetime.now(UTC)
    clock = time.monotonic()
    path = sqlite_path(settings)
    if settings.is_sqlite and (path is None or not path.exists()):
        raise ConfigError(f"no database at {path or settings.database_url}: nothing to prune")
    check_database_file(settings)  # a file that is not SQLite's: refused before it is opened
    engine = create_engine(settings)
    reports: list[TableReport] = []
    pacing = _Pacing(settings.retention.batch_size, pause, pause_ratio, stop, checkpoint)
    try:
        _require_schema(engine, path)
        for target in targets:
            reports.append(_prune(engine, settings, target, started_at, dry_run, pacing))
        if not dry_run:
            _prune_rate_windows(engine, started_at)
    finally:
        engine.dispose()
    report = RetentionReport(tuple(reports), time.monotonic() - clock, dry_run, started_at)
    for t in report.tables:
        if t.status in ("pruned", "stopped"):
            log.info(
                "retention: %s rows deleted from %s older than %s in %s batches, %.1f s (%s)",
                t.deleted, t.table, t.cutoff, t.batches, t.seconds, t.status,
            )  # fmt: skip
    return report


def _require_schema(engine: sqlalchemy.Engine, path: Path | None) -> None:
    """Refuse a database without parley's schema, or migrated by a newer parley (whose
    tables may hold links to the rows this one would delete)."""
    try:
        with engine.connect() as conn:
            require_known(conn)
    except SQLAlchemyError as exc:
        raise cannot_connect(exc, path) from exc


def _prune_rate_windows(engine: sqlalchemy.Engine, now: datetime) -> None:
    """Drop the request counters of past minutes: limits read only the current one. One
    short statement (a row per limited key or user and minute since the last run)."""
    try:
        deleted = LimitStore(engine).prune_windows(now - RATE_WINDOWS_KEPT)
    except SQLAlchemyError as exc:
        raise StoreError(f"retention could not prune rate_windows: {driver_message(exc)}") from exc
    if deleted:
        log.info("retention: %s past rate-limit counters deleted", deleted)


@dataclass(frozen=True, slots=True)
class _Pacing:
    batch_size: int
    pause: float
    pause_ratio: float
    stop: threading.Event | None
    checkpoint: bool


def _prune(
    engine: sqlalchemy.Engine,
    settings: Settings,
    target: Target,
    now: datetime,
    dry_run: bool,
    pacing: _Pacing,
) -> TableReport:
    days = float(getattr(settings.retention, target.days_setting))
    if days <= 0:
        return TableReport(target.table, days, None, "kept forever")
    cutoff = now - timedelta(days=days)
    if pacing.stop is not None and pacing.stop.is_set():
        return TableReport(target.table, days, cutoff, "stopped")
    try:
        with engine.connect() as conn:
            if not store.table_exists(conn, target.table):
                return TableReport(target.table, days, cutoff, "no such table")
            indexed = store.indexed(conn, target.table, target.column)
            if dry_run:
                count = store.count_older(conn, target.table, target.column, cutoff)
                return TableReport(target.table, days, cutoff, "dry run", count, 0, 0.0, indexed)
    except SQLAlchemyError as exc:
        raise StoreError(f"retention could not read {target.table}: {driver_message(exc)}") from exc
    if not indexed:
        log.warning(
            "retention: no index on %s.%s, walking primary-key windows instead",
            target.table, target.column,
        )  # fmt: skip
    batches = _Batches(engine, target, cutoff, pacing)
    clock = time.monotonic()
    try:
        finished = batches.run_indexed() if indexed else batches.run_windows()
    except SQLAlchemyError as exc:
        raise StoreError(
            f"retention of {target.table} failed after {batches.deleted} rows in "
            f"{batches.count} batches (those stay deleted): {driver_message(exc)}"
        ) from exc
    return TableReport(
        target.table,
        days,
        cutoff,
        "pruned" if finished else "stopped",
        batches.deleted,
        batches.count,
        time.monotonic() - clock,
        indexed,
        batches.longest,
        batches.held,
    )


class _Batches:
    """The batch loop for one table: one short write transaction per batch, then a pause."""

    def __init__(
        self, engine: sqlalchemy.Engine, target: Target, cutoff: datetime, pacing: _Pacing
    ) -> None:
        self._engine = engine
        self._table = target.table
        self._column = target.column
        self._cutoff = cutoff
        self._size = pacing.batch_size
        self._pacing = pacing
        self._last = 0.0
        self.longest = 0.0
        self.held = 0.0
        self.deleted = 0
        self.count = 0

    def run_indexed(self) -> bool:
        """Oldest rows first until a batch comes back short; False if stopped."""
        with self._connect() as conn:
            while True:
                with self._batch(conn):
                    n = store.delete_older(
                        conn, self._table, self._column, self._cutoff, self._size
                    )
                    self.deleted += n
                if n < self._size:
                    return True
                if not self._pause():
                    return False

    def run_windows(self) -> bool:
        """Every window of ``batch_size`` ids from the smallest to the largest; False if
        stopped. Rows inserted after the start have newer ids and times: not needed."""
        with self._connect() as conn:
            with conn.begin():
                bounds = store.id_bounds(conn, self._table)
            start, last = bounds if bounds is not None else (1, 0)
            while start <= last:
                end = start + self._size
                with self._batch(conn):
                    self.deleted += store.delete_older_in_window(
                        conn, self._table, self._column, self._cutoff, start, end
                    )
                start = end
                if start <= last and not self._pause():
                    return False
            return True

    def _connect(self) -> sqlalchemy.Connection:
        # BEGIN IMMEDIATE on SQLite: the batch reads, then writes, and must wait for the
        # writer's lock (busy timeout) rather than fail on upgrading a read lock.
        return self._engine.connect().execution_options(**{IMMEDIATE: True})

    @contextmanager
    def _batch(self, conn: sqlalchemy.Connection) -> Iterator[None]:
        with conn.begin():
            # The write lock is ours from here (``begin`` waited for it): time what the
            # writer may wait on, not what we waited for.
            clock = time.monotonic()
            yield
        self._last = time.monotonic() - clock
        self.longest = max(self.longest, self._last)
        self.held += self._last
        self.count += 1
        if self._pacing.checkpoint:
            store.checkpoint(conn)

    def _pause(self) -> bool:
        """Let the writer in; False when asked to stop."""
        pause = max(self._pacing.pause, self._pacing.pause_ratio * self._last)
        if self._pacing.stop is None:
            time.sleep(pause)
            return True
        return not self._pacing.stop.wait(pause)
