"""The anomaly watch on real rollups: an injected latency step is logged once, by one of
several processes, and not again after a restart."""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.domain.messages import Message
from parley.metrics.watch import AnomalyWatch
from parley.ops.migrate import upgrade
from parley.settings import Settings
from parley.store.engine import create_engine, writer_connection
from tests.conftest import MakeSettings
from tests.store.test_exchanges import attempt, chat, write

NOW = datetime.now(UTC).replace(minute=50, second=0, microsecond=0)


def _latency_step(engine: sa.Engine) -> None:
    """30 hours of traffic on model m, the last two three times slower."""
    rng = random.Random(5)
    exchanges = []
    for hours_ago in range(30, -1, -1):
        slow = hours_ago <= 1  # the last two hours are three times slower
        for _ in range(25):
            at = NOW - timedelta(hours=hours_ago, minutes=rng.uniform(0, 50))
            latency = rng.lognormvariate(5.5, 0.2) * (3 if slow else 1)
            exchanges.append(
                chat(
                    [Message("user", "q")],
                    attempts=[attempt(started_at=at, model_used="m", response_time_ms=latency)],
                )
            )
    write(engine, *exchanges)


def test_a_latency_step_is_logged_once_per_episode(
    settings: Settings, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _latency_step(migrated_engine)
    watch = AnomalyWatch(settings)
    caplog.set_level(logging.WARNING, logger="parley.metrics.watch")
    first = watch(NOW)
    assert [(e.model, e.metric) for e in first] == [("m", "latency_p90_ms")]
    assert first[0].start == NOW.replace(minute=0) - timedelta(hours=1)
    assert watch(NOW + timedelta(minutes=5)) == []  # the same episode: not again
    # Later, the runs' window starts inside the episode: still the same one, not again.
    assert watch(NOW + timedelta(hours=2, minutes=15)) == []
    assert caplog.text.count("anomaly: openai/m latency_p90_ms") == 1


def test_watches_sharing_a_database_log_an_episode_once_between_them(
    settings: Settings, migrated_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    _latency_step(migrated_engine)
    caplog.set_level(logging.WARNING, logger="parley.metrics.watch")
    # Four processes' watches run at once: one of them logs the episode.
    watches = [AnomalyWatch(settings) for _ in range(4)]
    with ThreadPoolExecutor(len(watches)) as pool:
        logged = list(pool.map(lambda watch: watch(NOW), watches))
    assert sorted(len(episodes) for episodes in logged) == [0, 0, 0, 1]
    # A restarted process (a new watch) knows it was logged.
    assert AnomalyWatch(settings)(NOW + timedelta(minutes=5)) == []
    assert caplog.text.count("anomaly: openai/m latency_p90_ms") == 1


def test_a_busy_sqlite_writer_delays_a_new_episode_and_never_an_old_one(
    tmp_path: Path, make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite only: its write lock is what a busy writer holds.
    settings = make_settings(tmp_path)
    upgrade(settings)
    migrated_engine = create_engine(settings)
    _latency_step(migrated_engine)
    caplog.set_level(logging.WARNING, logger="parley.metrics.watch")
    watch = AnomalyWatch(settings)
    # Another connection holds the write lock for longer than the busy timeout, as the
    # group-commit writer can under a heavy load.
    with writer_connection(migrated_engine) as holder, holder.begin():
        assert watch(NOW) == []  # not claimed: no episode logged, and no traceback
        assert "stayed locked past the busy timeout; nothing claimed" in caplog.text
    assert len(watch(NOW + timedelta(minutes=5))) == 1  # the next run claims it
    with writer_connection(migrated_engine) as holder, holder.begin():
        started = time.monotonic()
        # Already logged, still going on: decided without the write lock.
        assert watch(NOW + timedelta(minutes=10)) == []
        assert time.monotonic() - started < 2
    assert caplog.text.count("anomaly: openai/m latency_p90_ms") == 1
    migrated_engine.dispose()
