"""Scheduled jobs: on time, in a thread, never overlapping themselves, failures logged and
survived, stopped with the server; and a real server taking backups on schedule."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from parley.errors import BackupError
from parley.ops.backup import list_backups, verify_backup
from parley.ops.schedule import HOUR, Job, Scheduler, server_jobs
from parley.settings import Backups, Retention, Settings
from tests.conftest import MakeSettings
from tests.harness import ParleyServer, settings_for, write_config
from tests.ops.test_retention import exchange, prepared, query, with_retention, write
from tests.server.crash_support import DripOpenAI, backup_env


class Recorder:
    """A job body that notes when and where it ran, and how many runs overlapped."""

    def __init__(self, duration: float = 0.0, fail: int = 0) -> None:
        self.duration = duration
        self.fail = fail
        self.lock = threading.Lock()
        self.starts: list[float] = []
        self.threads: set[int] = set()
        self.active = 0
        self.most_active = 0
        self.entered = threading.Event()

    def __call__(self) -> None:
        with self.lock:
            self.starts.append(time.monotonic())
            self.threads.add(threading.get_ident())
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.set()
        try:
            time.sleep(self.duration)
            if len(self.starts) <= self.fail:
                raise ValueError(f"failure {len(self.starts)}")
        finally:
            with self.lock:
                self.active -= 1


async def test_a_job_runs_every_interval_in_a_thread() -> None:
    job = Recorder()
    scheduler = Scheduler([Job("tick", 0.1, job)])
    started = time.monotonic()
    scheduler.start()
    await asyncio.sleep(0.75)
    await scheduler.stop(5)
    # About 7 runs; a busy machine may lose some, never gain any.
    assert 3 <= len(job.starts) <= 7, job.starts
    assert job.starts[0] - started >= 0.09  # the first run waits one interval
    assert threading.get_ident() not in job.threads
    assert scheduler.runs["tick"] == len(job.starts) and scheduler.failures["tick"] == 0
    # Stopped means stopped.
    await asyncio.sleep(0.3)
    assert scheduler.runs["tick"] == len(job.starts)


async def test_a_job_never_overlaps_itself_and_skips_missed_slots() -> None:
    job = Recorder(duration=0.35)
    other = Recorder()
    scheduler = Scheduler([Job("slow", 0.05, job), Job("quick", 0.05, other)])
    scheduler.start()
    await asyncio.sleep(1.2)
    await scheduler.stop(5)
    assert job.most_active == 1
    gaps = [b - a for a, b in zip(job.starts, job.starts[1:], strict=False)]
    assert gaps and min(gaps) >= 0.34, gaps
    # Not queued up behind the slow runs: 1.2 s holds at most 4 of them.
    assert len(job.starts) <= 4
    # The slow job holds up neither the event loop nor the other job.
    assert len(other.starts) >= 8


async def test_a_failing_job_is_logged_and_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    job = Recorder(fail=2)

    def refuses() -> None:
        raise BackupError("no backup directory could be written: /nowhere")

    scheduler = Scheduler([Job("flaky", 0.05, job), Job("backup", 0.05, refuses)])
    with caplog.at_level(logging.ERROR, logger="parley.ops.schedule"):
        scheduler.start()
        await asyncio.sleep(0.6)
        await scheduler.stop(5)
    assert scheduler.failures["flaky"] == 2
    assert scheduler.runs["flaky"] >= 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m == "scheduled flaky failed" for m in messages) == 2
    # parley's own errors are one clear line, without a traceback.
    backup_lines = [r for r in caplog.records if r.getMessage().startswith("scheduled backup")]
    assert backup_lines and all(r.exc_info is None for r in backup_lines)
    assert backup_lines[0].getMessage() == (
        "scheduled backup failed: no backup directory could be written: /nowhere"
    )


async def test_stop_waits_for_a_run_in_progress() -> None:
    job = Recorder(duration=0.5)
    scheduler = Scheduler([Job("slow", 0.05, job)])
    scheduler.start()
    assert await asyncio.to_thread(job.entered.wait, 10)
    await scheduler.stop(10)
    assert job.active == 0 and scheduler.runs["slow"] == 1


async def test_stop_gives_up_on_a_run_that_outlasts_its_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(30)

    scheduler = Scheduler([Job("stuck", 0.05, stuck)])
    scheduler.start()
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="parley.ops.schedule"):
            await scheduler.stop(0.3)
        assert time.monotonic() - began < 2
        assert any("still running" in r.getMessage() for r in caplog.records)
    finally:
        release.set()


async def test_a_stopping_scheduler_ends_a_retention_pass_after_its_batch(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    # 600 request-log rows past a 30-day age, deleted 10 at a time (a pause after each):
    # the pass is still going when the scheduler stops, and must end with it.
    settings = with_retention(
        make_settings(tmp_path), request_log_days=30, batch_size=10, interval_hours=0.05 / HOUR
    )
    engine = prepared(settings)
    old = datetime.now(UTC) - timedelta(days=100)
    write(engine, *(exchange(old + timedelta(minutes=n), n) for n in range(300)))

    def left() -> int:
        return int(query(engine, "SELECT count(*) AS n FROM request_log")[0]["n"])

    stopping = threading.Event()
    [job] = [j for j in server_jobs(settings, stopping) if j.name == "retention"]
    scheduler = Scheduler([job], stopping)
    scheduler.start()
    for _ in range(1000):  # until its first batches are gone
        if left() < 600:
            break
        await asyncio.sleep(0.02)
    await scheduler.stop(10)
    stopped_at = left()
    assert scheduler.runs["retention"] == 1 and scheduler.failures["retention"] == 0
    await asyncio.sleep(0.5)
    assert left() == stopped_at and 0 < stopped_at < 600
    engine.dispose()


def test_server_jobs_follow_the_settings(tmp_path: Path, make_settings: MakeSettings) -> None:
    base = make_settings(tmp_path)

    def jobs(settings: Settings) -> dict[str, float]:
        return {job.name: job.interval for job in server_jobs(settings)}

    backups = Backups(dir=tmp_path / "b", fallback_dir=tmp_path / "f")
    nothing = dataclasses.replace(
        base,
        backups=backups,
        retention=Retention(request_log_days=0, http_metrics_days=0, interval_hours=1),
        maintenance_interval_hours=0,
    )
    assert jobs(nothing) == {"anomalies": 300.0}  # always watched
    everything = dataclasses.replace(
        nothing,
        backups=dataclasses.replace(backups, interval_hours=6),
        retention=Retention(request_log_days=90, http_metrics_days=0, interval_hours=0.5),
        maintenance_interval_hours=24,
    )
    assert jobs(everything) == {
        "backup": 6 * HOUR,
        "retention": 0.5 * HOUR,
        "maintenance": 24 * HOUR,
        "anomalies": 300.0,
    }
    # Retention with nothing to delete, or no interval, is not scheduled.
    idle = dataclasses.replace(everything, retention=Retention(0, 0, interval_hours=1))
    assert "retention" not in jobs(idle)
    unscheduled = dataclasses.replace(everything, retention=Retention(90, 30, interval_hours=0))
    assert "retention" not in jobs(unscheduled)


@pytest.mark.slow
def test_a_running_server_takes_and_prunes_backups_on_schedule(
    tmp_path: Path, database_url: str
) -> None:
    with DripOpenAI() as upstream:
        write_config(tmp_path, [{"name": "up", "kind": "openai", "base_url": upstream.base_url}])
        settings = settings_for(
            tmp_path,
            database_url,
            PARLEY_BACKUP_INTERVAL_HOURS=str(0.4 / HOUR),
            PARLEY_BACKUP_KEEP="2",
            **backup_env(tmp_path),
        )
        with ParleyServer(settings) as server:
            answer = httpx.post(
                f"{server.base_url}/chat/completions",
                json={"model": "up/quick", "messages": [{"role": "user", "content": "keep me"}]},
                timeout=30,
            )
            assert answer.status_code == 200
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while len(seen) < 4 and time.monotonic() < deadline:
                current = list_backups(settings)
                seen.update(info.path.name for info in current)
                time.sleep(0.05)
            # The server keeps answering while it backs up.
            health = httpx.get(f"{server.root}/healthz", timeout=10)
            assert health.status_code == 200
    assert len(seen) >= 4, f"only {len(seen)} scheduled backups in 30 s"
    kept = list_backups(settings)
    assert len(kept) == 2, "old backups were not pruned"
    newest = kept[0]
    assert newest.path.parent == tmp_path / "backups"
    manifest = verify_backup(newest.path, settings)
    assert manifest
