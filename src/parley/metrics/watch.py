"""The anomaly watch: a scheduled job that logs each new anomaly episode once.

Every run reads the model-level hourly rollups of the last ``LOOKBACK`` hours (plus the
baseline before them), finds episodes with ``metrics.anomalies`` and logs a warning for
each episode no run logged before. An episode is known by (provider, model, metric) and
its hours: one that goes on over several runs is logged when it starts, not again, even
once the runs' window has moved past its first hour (a run then sees it start later);
one that starts after an hour back to normal is new. What was logged is kept in the
database (``store.anomaly_log``), so several processes on one database, and a restarted
one, log each episode once between them.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import sqlalchemy

from parley.domain.rollup import HOUR
from parley.errors import StoreBusy
from parley.metrics import anomalies
from parley.settings import Settings
from parley.store import anomaly_log
from parley.store.anomaly_log import Seen
from parley.store.edges import floor_hour
from parley.store.engine import create_engine
from parley.store.metrics import MetricsStore

log = logging.getLogger(__name__)

LOOKBACK = timedelta(hours=3)
# The job's interval (seconds): often enough to log an episode within its first hour.
INTERVAL = 300.0


class AnomalyWatch:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def __call__(self, now: datetime | None = None) -> list[anomalies.Episode]:
        """One run; returns the episodes logged by it."""
        now = now or datetime.now(UTC)
        since = floor_hour(now - LOOKBACK)
        engine = create_engine(self._settings)
        try:
            rows = MetricsStore(engine).period(
                HOUR,
                since - timedelta(hours=anomalies.BASELINE_HOURS),
                now,
                {},
                ("provider", "model"),
            )
            found = anomalies.find(rows, since)
            claimed = self._claim(engine, found, since) if found else []
        finally:
            engine.dispose()
        new = [episode for episode, mine in zip(found, claimed, strict=True) if mine]
        for episode in new:
            log.warning(
                "anomaly: %s/%s %s is %.4g since %s (its baseline: %.4g)",
                episode.provider,
                episode.model,
                episode.metric,
                episode.peak,
                episode.start.isoformat(),
                episode.baseline,
            )
        return new

    @staticmethod
    def _claim(
        engine: sqlalchemy.Engine, found: list[anomalies.Episode], since: datetime
    ) -> list[bool]:
        try:
            return anomaly_log.claim(
                engine,
                [Seen(e.provider, e.model, e.metric, e.start, e.end) for e in found],
                # Episodes that ended long ago can no longer come back: forgotten.
                forget_before=since - timedelta(days=1),
            )
        except StoreBusy as exc:
            # Nothing was claimed, so the next run finds the same episodes new.
            log.warning("anomaly watch: %s; nothing claimed, trying again next run", exc.message)
            return [False] * len(found)
