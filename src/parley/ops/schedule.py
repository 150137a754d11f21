"""Jobs a running server does on a schedule: backups, retention, maintenance, and the
anomaly watch (``metrics.watch``).

``server_jobs(settings)`` lists what the settings ask for; a ``Scheduler`` runs them on
the server's event loop for as long as the server lives (the app's lifespan starts and
stops it). Intervals are seconds here; settings give them in hours.

Invariants:
- a job runs in a thread of its own, never on the event loop: a backup or a VACUUM never
  holds up a request. The threads are daemons, so a job still running when the server
  exits (after ``stop`` gave up waiting for it) ends with the process rather than holding
  up the shutdown; the jobs are crash-safe (a backup is renamed into place only once
  complete, retention deletes in committed batches, SQLite rolls back an unfinished
  VACUUM);
- a job never overlaps itself: its next run is due only after the previous one returned
  (runs that would have started meanwhile are skipped, not queued up);
- a failing job is logged and runs again at its next slot: it never stops the server or
  the other jobs;
- the first run comes one interval after the start (migrations at start already take a
  backup when they change anything).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from parley.errors import ParleyError
from parley.metrics import watch
from parley.ops.backup import create_backup, prune_backups
from parley.ops.maintenance import run_maintenance
from parley.ops.retention import run_retention
from parley.settings import Settings

log = logging.getLogger(__name__)

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Job:
    """``run`` is called every ``interval`` seconds, in a thread."""

    name: str
    interval: float
    run: Callable[[], object]


def server_jobs(settings: Settings, stopping: threading.Event | None = None) -> list[Job]:
    """The jobs ``settings`` schedule: backups, retention and maintenance, each when its
    interval is above zero (retention also only when it has something to delete).
    ``stopping`` (the ``Scheduler``'s) ends a retention pass after its batch in progress."""
    retention = settings.retention
    prunes = retention.request_log_days > 0 or retention.http_metrics_days > 0
    wanted: tuple[tuple[str, float, Callable[[], object]], ...] = (
        ("backup", settings.backup.interval_hours, partial(scheduled_backup, settings)),
        (
            "retention",
            retention.interval_hours if prunes else 0.0,
            partial(scheduled_retention, settings, stopping),
        ),
        (
            "maintenance",
            settings.maintenance_interval_hours,
            partial(scheduled_maintenance, settings),
        ),
    )
    jobs = [Job(name, hours * HOUR, run) for name, hours, run in wanted if hours > 0]
    # Always on: one small read of the model-level rollups every few minutes.
    jobs.append(Job("anomalies", watch.INTERVAL, watch.AnomalyWatch(settings)))
    return jobs


def scheduled_backup(settings: Settings) -> None:
    """Take a backup, then keep only the newest ``settings.backup.keep``."""
    info = create_backup(settings)
    removed = prune_backups(settings, keep=settings.backup.keep)
    log.info("scheduled backup written to %s (%d old one(s) pruned)", info.path, len(removed))


def scheduled_retention(settings: Settings, stopping: threading.Event | None = None) -> None:
    report = run_retention(settings, stop=stopping)
    log.info("scheduled retention: %s", report)


def scheduled_maintenance(settings: Settings) -> None:
    report = run_maintenance(settings, scheduled=True)
    log.info("scheduled maintenance: %s", report)


class Scheduler:
    """Runs ``jobs`` on the current event loop between ``start`` and ``stop``."""

    def __init__(self, jobs: Sequence[Job], stopping: threading.Event | None = None) -> None:
        """``stopping`` is set when the scheduler stops, for jobs that can end early
        (``server_jobs`` gives it to retention)."""
        self.stopping = stopping or threading.Event()
        for job in jobs:
            if job.interval <= 0:
                raise ValueError(f"job {job.name}: the interval must be above zero")
        self.jobs = tuple(jobs)
        self._tasks: list[asyncio.Task[None]] = []
        # The run in progress of each job (at most one, by construction).
        self._running: dict[str, asyncio.Future[Any]] = {}
        # How many runs of each job ended, and how many of those failed.
        self.runs: dict[str, int] = {job.name: 0 for job in self.jobs}
        self.failures: dict[str, int] = {job.name: 0 for job in self.jobs}

    def start(self) -> None:
        if self._tasks:
            raise RuntimeError("a scheduler starts once")
        for job in self.jobs:
            log.info("scheduled %s every %s", job.name, _every(job.interval))
            self._tasks.append(asyncio.create_task(self._every(job), name=f"parley-{job.name}"))

    async def stop(self, wait: float) -> None:
        """Run nothing more; wait up to ``wait`` seconds for runs in progress. Calling it
        again waits again for what is still running."""
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = {name: f for name, f in self._running.items() if not f.done()}
        if running:
            log.info("waiting for scheduled %s to finish", ", ".join(sorted(running)))
            _, late = await asyncio.wait(running.values(), timeout=wait)
            for name, future in running.items():
                if future in late:
                    log.warning(
                        "scheduled %s still running after %gs; it ends with the process",
                        name,
                        wait,
                    )

    async def _every(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + job.interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            future = _in_thread(job)
            self._running[job.name] = future
            future.add_done_callback(partial(self._ended, job, time.monotonic()))
            # Waiting neither raises the run's error (``_ended`` logs it) nor, when the
            # schedule stops, cancels the run: ``stop`` waits for it.
            await asyncio.wait([future])
            # The next slot after now: runs missed while this one lasted are skipped.
            now = loop.time()
            due += job.interval
            if due <= now:
                due += job.interval * ((now - due) // job.interval + 1)

    def _ended(self, job: Job, started: float, future: asyncio.Future[Any]) -> None:
        self.runs[job.name] += 1
        error = future.exception()
        if error is None:
            log.debug("scheduled %s took %.2fs", job.name, time.monotonic() - started)
            return
        self.failures[job.name] += 1
        if isinstance(error, ParleyError):
            log.error("scheduled %s failed: %s", job.name, error.message)
        else:
            log.error("scheduled %s failed", job.name, exc_info=error)


def _in_thread(job: Job) -> asyncio.Future[Any]:
    """Run ``job.run`` in a daemon thread; its outcome settles the returned future."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            result = job.run()
        except BaseException as exc:  # handed to the loop, which logs it
            outcome: tuple[Any, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(_settle, future, *outcome)
        except RuntimeError:
            # The loop closed while the job ran (the process is exiting).
            log.debug("scheduled %s ended after the server stopped", job.name)

    threading.Thread(target=target, name=f"parley-{job.name}", daemon=True).start()
    return future


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _every(seconds: float) -> str:
    if seconds >= HOUR:
        return f"{seconds / HOUR:g}h"
    return f"{seconds:g}s"
