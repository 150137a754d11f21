"""Maintenance: give space back, refresh statistics, and report on the store's integrity.

Two modes, because a live server must never wait long on it:

- **online** (``scheduled=True``, the server's own schedule, or ``vacuum=False``): only
  what never holds the write lock for long. SQLite: a PASSIVE checkpoint, the integrity
  report (read-only; ``quick_check`` when scheduled), and a sampled ANALYZE
  (``analysis_limit``: milliseconds whatever the size). PostgreSQL: plain
  ``VACUUM (ANALYZE)``, which does not block reads or writes (ANALYZE alone with
  ``vacuum=False``).
- **offline** (``scheduled=False``, the default of ``parley maintenance``): holds the
  database against servers (``ops.presence.exclusive``; refused while one runs) and
  also VACUUMs. SQLite: a TRUNCATE checkpoint, ``integrity_check``, then VACUUM in
  place, or for a file of ``swap_threshold`` bytes or more, VACUUM INTO a new file
  next to it that is integrity-checked, fsynced and renamed over the database; then a
  full ANALYZE. PostgreSQL: ``VACUUM (FULL, ANALYZE)``, which locks each table.

Invariants:
- no row is ever changed or deleted (orphan blob *files* are removed only when asked,
  through ``BlobStore.sweep``, which is safe against a concurrent upload);
- a database whose SQLite integrity check fails is never vacuumed (a copy could carry
  or spread the damage): the report says so and the operator restores a backup;
- the swap happens only after every connection of ours is closed and SQLite's log is
  gone (another process with the file open keeps it); otherwise the database is left
  as it was and the step fails;
- the report lists each step and each check; ``MaintenanceReport.problems`` are the
  checks that found something wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from parley.errors import ConfigError, StoreError, VectorStoreUnusable
from parley.ops.dbfile import check_database_file
from parley.ops.maintenance_checks import Check, integrity_checks
from parley.ops.presence import exclusive
from parley.settings import Settings
from parley.store import maintenance as store
from parley.store.blobs import BlobStore
from parley.store.engine import create_engine, driver_message, sqlite_path
from parley.store.schema import metadata

log = logging.getLogger(__name__)

# At or above this size an offline VACUUM writes a new file and renames it into place
# (one write of the live pages, in the database's own directory) instead of VACUUM in
# place (a copy in the temporary directory, then every page again through the log).
SWAP_THRESHOLD_BYTES = 256 * 1024 * 1024
# Rows per index a scheduled ANALYZE samples (SQLite's recommended range is 100-1000).
ONLINE_ANALYSIS_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    # "done", "skipped" (not applicable, or not asked for) or "failed".
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass(slots=True)
class MaintenanceReport:
    backend: str
    # "offline" or "online" (see the module docstring).
    mode: str
    steps: list[Step] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    # Bytes on disk (SQLite: the file and its log; PostgreSQL: the database).
    size_before: int | None = None
    size_after: int | None = None
    seconds: float = 0.0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def problems(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    @property
    def failed_steps(self) -> list[Step]:
        return [step for step in self.steps if step.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "mode": self.mode,
            "started_at": self.started_at.isoformat(),
            "seconds": round(self.seconds, 3),
            "size_before": self.size_before,
            "size_after": self.size_after,
            "ok": not self.problems and not self.failed_steps,
            "steps": [{**vars_of(step), "seconds": round(step.seconds, 3)} for step in self.steps],
            "checks": [vars_of(check) for check in self.checks],
        }


def vars_of(value: Any) -> dict[str, Any]:
    """A slotted dataclass's fields as a dict (tuples as lists, for JSON)."""
    out = {name: getattr(value, name) for name in value.__dataclass_fields__}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def run_maintenance(
    settings: Settings,
    *,
    scheduled: bool = False,
    vacuum: bool = True,
    remove_orphan_blobs: bool = False,
    swap_threshold: int = SWAP_THRESHOLD_BYTES,
) -> MaintenanceReport:
    """Run maintenance (see the module docstring) and return its report.

    Offline (``scheduled=False`` and ``vacuum=True``) raises ``ConfigError`` while a
    server holds the database. Raises ``ConfigError`` when there is no database and
    ``StoreError`` when the database fails.
    """
    path = sqlite_path(settings)
    if settings.is_sqlite and (path is None or not path.exists()):
        raise ConfigError(f"no database at {path or settings.database_url}")
    check_database_file(settings)  # a file that is not SQLite's: refused, not "maintained"
    offline = vacuum and not scheduled
    backend = "sqlite" if settings.is_sqlite else "postgresql"
    report = MaintenanceReport(backend, "offline" if offline else "online")
    clock = time.monotonic()
    holding = exclusive(settings) if offline else contextlib.nullcontext()
    with holding:
        run = _Run(settings, report, path, scheduled=scheduled, offline=offline)
        try:
            run.all(remove_orphan_blobs, swap_threshold)
        except SQLAlchemyError as exc:
            raise StoreError(f"maintenance failed: {driver_message(exc)}") from exc
        finally:
            run.close()
    report.seconds = time.monotonic() - clock
    log.info(
        "maintenance (%s) done in %.1f s: %d problem(s), %d failed step(s)",
        report.mode, report.seconds, len(report.problems), len(report.failed_steps),
    )  # fmt: skip
    return report


class _Run:
    """One maintenance run; owns the engine (replaced after a file swap)."""

    def __init__(
        self,
        settings: Settings,
        report: MaintenanceReport,
        path: Path | None,
        *,
        scheduled: bool,
        offline: bool,
    ) -> None:
        self.settings = settings
        self.report = report
        self.path = path
        self.scheduled = scheduled
        self.offline = offline
        self._engine: sqlalchemy.Engine | None = None

    @property
    def engine(self) -> sqlalchemy.Engine:
        if self._engine is None:
            self._engine = create_engine(self.settings)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def all(self, remove_orphan_blobs: bool, swap_threshold: int) -> None:
        sqlite = self.settings.is_sqlite
        self.report.size_before = self._size()
        if sqlite:
            self._step("checkpoint", self._checkpoint)
        self.report.checks = integrity_checks(
            self.settings,
            self.engine,
            quick=self.scheduled,
            remove_orphan_blobs=remove_orphan_blobs,
        )
        damaged = any(c.name == "database" and not c.ok for c in self.report.checks)
        if sqlite:
            if not self.offline:
                self._skip("vacuum", "online: VACUUM needs the server stopped")
            elif damaged:
                self._fail("vacuum", "not run on a database that failed its integrity check")
            else:
                self._step("vacuum", lambda: self._sqlite_vacuum(swap_threshold))
            if damaged:
                self._skip("analyze", "not run on a database that failed its integrity check")
            else:
                self._step("analyze", self._sqlite_analyze)
        else:
            self._step("vacuum", self._pg_vacuum)
        self._step("vector store", lambda: _vector_store(self.settings))
        self._step("temporary uploads", self._clean_temporary)
        if sqlite and self.offline and not damaged:
            # VACUUM and ANALYZE went through the log: fold it in, so the size is the file's.
            self._step("final checkpoint", self._checkpoint)
        self.report.size_after = self._size()

    def _step(self, name: str, action: Callable[[], str | Step]) -> None:
        clock = time.monotonic()
        try:
            outcome = action()
        except StoreError as exc:
            self._fail(name, exc.message, time.monotonic() - clock)
            return
        except SQLAlchemyError as exc:
            self._fail(name, driver_message(exc), time.monotonic() - clock)
            return
        if isinstance(outcome, Step):
            self.report.steps.append(outcome)
        else:
            self.report.steps.append(Step(name, "done", outcome, time.monotonic() - clock))

    def _skip(self, name: str, detail: str) -> None:
        self.report.steps.append(Step(name, "skipped", detail))

    def _fail(self, name: str, detail: str, seconds: float = 0.0) -> None:
        if self.scheduled:  # `parley maintenance` prints it in its report, once
            log.error("maintenance step %s failed: %s", name, detail)
        self.report.steps.append(Step(name, "failed", detail, seconds))

    def _size(self) -> int | None:
        if self.path is not None:
            wal = self.path.with_name(self.path.name + "-wal")
            return sum(p.stat().st_size for p in (self.path, wal) if p.exists())
        if not self.settings.is_sqlite:
            return store.pg_database_size(self.engine)
        return None

    def _checkpoint(self) -> str:
        mode = "TRUNCATE" if self.offline else "PASSIVE"
        busy, frames, done = store.sqlite_checkpoint(self.engine, mode)
        if busy:
            return f"{mode}: {done} of {frames} log pages copied (a reader kept the rest)"
        return f"{mode}: {done} of {frames} log pages copied"

    def _sqlite_vacuum(self, swap_threshold: int) -> str:
        assert self.path is not None
        # Copies left by a swap that crashed before its rename (we hold the database
        # exclusively, so no other run is writing one now).
        for stale in self.path.parent.glob(f".{self.path.name}.vacuum-*"):
            stale.unlink(missing_ok=True)
        page_size, pages, free = store.sqlite_pages(self.engine)
        needed = (pages - free) * page_size
        available = shutil.disk_usage(self.path.parent).free
        if available < needed + needed // 10:
            raise StoreError(
                f"not enough free space next to the database for VACUUM (needs about "
                f"{_mib(needed)}, {_mib(available)} free); the database was left as it was"
            )
        if pages * page_size >= swap_threshold:
            self._swap(self.path)
            return f"VACUUM INTO a new file, renamed into place ({free} free pages dropped)"
        store.sqlite_vacuum(self.engine)
        return f"VACUUM in place ({free} free pages dropped)"

    def _swap(self, database: Path) -> None:
        fresh = database.with_name(f".{database.name}.vacuum-{secrets.token_hex(6)}")
        try:
            store.sqlite_vacuum_into(self.engine, fresh)
            damage = store.sqlite_prepare_copy(fresh)
            if damage:
                raise StoreError(
                    f"the vacuumed copy failed its integrity check ({damage[0]}); "
                    "the database was left as it was"
                )
            os.chmod(fresh, stat.S_IMODE(database.stat().st_mode))
            _fsync(fresh)
            self.close()  # the last connection to close removes the -wal file
            for suffix in ("-wal", "-journal"):
                if database.with_name(database.name + suffix).exists():
                    raise StoreError(
                        f"another process has {database} open (its {suffix} file is still "
                        "there); the database was left as it was: stop it and run again"
                    )
            os.replace(fresh, database)
            database.with_name(database.name + "-shm").unlink(missing_ok=True)
            _fsync(database.parent)
        finally:
            fresh.unlink(missing_ok=True)
            for suffix in ("-wal", "-shm"):
                fresh.with_name(fresh.name + suffix).unlink(missing_ok=True)

    def _sqlite_analyze(self) -> str:
        if self.offline:
            store.sqlite_analyze(self.engine)
            return "full ANALYZE"
        store.sqlite_analyze(self.engine, limit=ONLINE_ANALYSIS_LIMIT)
        return f"ANALYZE sampling {ONLINE_ANALYSIS_LIMIT} rows per index"

    def _pg_vacuum(self) -> str:
        tables = store.existing_tables(self.engine) & (set(metadata.tables) | {"alembic_version"})
        if self.offline:
            store.pg_vacuum(self.engine, tables, full=True)
            return f"VACUUM (FULL, ANALYZE) of {len(tables)} tables"
        if self.scheduled:
            store.pg_vacuum(self.engine, tables, full=False)
            return f"VACUUM (ANALYZE) of {len(tables)} tables"
        store.pg_analyze(self.engine, tables)
        return f"ANALYZE of {len(tables)} tables (no VACUUM asked for)"

    def _clean_temporary(self) -> str | Step:
        if not self.settings.blob_dir.exists():
            return Step("temporary uploads", "skipped", "no blob directory")
        removed = BlobStore(self.settings.blob_dir).clean_temporary()
        return f"{removed} stale temporary upload file(s) removed"


def _vector_store(settings: Settings) -> str | Step:
    """Compact the vector store, fold new vectors into (or build) its ANN index, rewrite
    a table whose deleted rows are still in its files, and drop old versions with their
    files (``VectorStore.optimize``); online-safe: searches keep their snapshot.

    ``search.vectors`` (with ``vector_rows`` and ``vector_lock``) is a storage adapter that
    imports nothing else of parley, hence imported here from below the ``search`` layer."""
    from parley.search.vectors import VectorStore

    uri = settings.vector_uri
    if "://" not in uri and not Path(uri).exists():
        return Step("vector store", "skipped", "no vector store")
    try:
        vectors = VectorStore.open(uri)
        if vectors.model is None:
            return Step("vector store", "skipped", "the vector store is empty")
        return vectors.optimize(settings.search.ann_min_rows)
    except VectorStoreUnusable as exc:
        raise StoreError(exc.message) from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mib(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MiB"
