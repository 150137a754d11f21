"""The anomaly watch: a scheduled job that logs each new anomaly episode once.

Every run reads the model-level hourly rollups of the last ``LOOKBACK`` hours (plus the
baseline before them), finds episodes with ``metrics.anomalies`` and logs a warning for
each episode it has not logged before. An episode is known by (provider, model, metric)
and its hours: one that goes on over several runs is logged when it starts, not again,
even once the runs' window has moved past its first hour (a run then sees it start
later); one that starts after an hour back to normal is new. The memory is this
process's: several processes on one database each log it once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from parley.domain.rollup import HOUR
from parley.metrics import anomalies
from parley.settings import Settings
from parley.store.engine import create_engine
from parley.store.metrics import MetricsStore, floor_hour

log = logging.getLogger(__name__)

LOOKBACK = timedelta(hours=3)
# The job's interval (seconds): often enough to log an episode within its first hour.
INTERVAL = 300.0


class AnomalyWatch:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # (provider, model, metric) -> the end of the last episode logged for it.
        self._logged: dict[tuple[str, str, str], datetime] = {}

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
        finally:
            engine.dispose()
        new = []
        for episode in anomalies.find(rows, since):
            key = (episode.provider, episode.model, episode.metric)
            logged_end = self._logged.get(key)
            self._logged[key] = max(episode.end, logged_end or episode.end)
            if logged_end is not None and episode.start <= logged_end:
                continue  # the logged episode, still going on
            new.append(episode)
            log.warning(
                "anomaly: %s/%s %s is %.4g since %s (its baseline: %.4g)",
                episode.provider,
                episode.model,
                episode.metric,
                episode.peak,
                episode.start.isoformat(),
                episode.baseline,
            )
        # Episodes that ended long ago can no longer come back: forget them.
        forget = since - timedelta(days=1)
        self._logged = {key: end for key, end in self._logged.items() if end >= forget}
        return new
