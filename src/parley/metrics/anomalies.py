"""Anomalies: hours where a model's error rate or p90 latency leaves its own baseline.

The rule, per (provider, model) and per hour ``h`` with at least ``MIN_REQUESTS`` requests:

- the baseline is the ``BASELINE_HOURS`` hours before ``h`` that had at least
  ``MIN_REQUESTS`` requests each; at least ``MIN_BASELINE_HOURS`` of them are needed;
- for the error rate and for the p90 latency (from the hour's histogram), take the
  baseline's mean ``m`` and standard deviation ``s``; the hour is anomalous when its value
  exceeds ``m + THRESHOLD * max(s, floor)``, where the floor is ``ERROR_RATE_FLOOR``
  (absolute) for the error rate and ``LATENCY_FLOOR`` times ``m`` for latency, so a
  perfectly steady baseline does not turn noise into alarms;
- consecutive anomalous hours of one model and metric form one episode.

Only rises are flagged: a model getting faster or more reliable is not an incident.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from parley.domain import histogram
from parley.domain.rollup import Dims, Tally

BASELINE_HOURS = 24
MIN_BASELINE_HOURS = 6
MIN_REQUESTS = 20
THRESHOLD = 3.0
ERROR_RATE_FLOOR = 0.02
LATENCY_FLOOR = 0.10
HOUR = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Episode:
    provider: str
    model: str
    metric: str  # "error_rate" | "latency_p90_ms"
    start: datetime
    end: datetime  # exclusive: the hour after the last anomalous one
    peak: float
    baseline: float

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "metric": self.metric,
            # As every report writes times: UTC, with a Z.
            "start": self.start.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "end": self.end.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "peak": self.peak,
            "baseline": self.baseline,
        }


@dataclass(slots=True)
class _Hour:
    requests: int = 0
    errors: int = 0
    latency: histogram.Histogram | None = None


def find(rows: Iterable[tuple[datetime, Dims, Tally]], since: datetime) -> list[Episode]:
    """Episodes starting at or after ``since`` in hourly rollup rows (which must reach
    ``BASELINE_HOURS`` further back, for the baseline)."""
    hours: dict[tuple[str, str], dict[datetime, _Hour]] = {}
    for start, dims, tally in rows:
        hour = hours.setdefault((dims.provider, dims.model), {}).setdefault(start, _Hour())
        hour.requests += tally.requests
        if not dims.success:
            hour.errors += tally.requests
        hour.latency = histogram.merge(hour.latency or {}, tally.latency_ms)
    episodes: list[Episode] = []
    for (provider, model), by_hour in sorted(hours.items()):
        for metric in ("error_rate", "latency_p90_ms"):
            episodes.extend(_episodes(provider, model, metric, by_hour, since))
    episodes.sort(key=lambda e: (e.start, e.provider, e.model, e.metric))
    return episodes


def _value(hour: _Hour, metric: str) -> float | None:
    if hour.requests < MIN_REQUESTS:
        return None
    if metric == "error_rate":
        return hour.errors / hour.requests
    return histogram.percentile(hour.latency or {}, 90)


def _episodes(
    provider: str, model: str, metric: str, by_hour: dict[datetime, _Hour], since: datetime
) -> list[Episode]:
    out: list[Episode] = []
    current: list[Any] | None = None  # [start, end, peak, baseline]
    for start in sorted(by_hour):
        value = _value(by_hour[start], metric)
        flagged = False
        if value is not None and start >= since:
            baseline = [
                v
                for v in (
                    _value(by_hour[start - k * HOUR], metric)
                    for k in range(1, BASELINE_HOURS + 1)
                    if start - k * HOUR in by_hour
                )
                if v is not None
            ]
            if len(baseline) >= MIN_BASELINE_HOURS:
                mean = statistics.fmean(baseline)
                spread = statistics.pstdev(baseline)
                floor = ERROR_RATE_FLOOR if metric == "error_rate" else LATENCY_FLOOR * mean
                if value > mean + THRESHOLD * max(spread, floor):
                    flagged = True
                    if current is not None and current[1] == start:
                        current[1] = start + HOUR
                        current[2] = max(current[2], value)
                    else:
                        if current is not None:
                            out.append(Episode(provider, model, metric, *current))
                        current = [start, start + HOUR, value, mean]
        if not flagged and current is not None and current[1] <= start:
            out.append(Episode(provider, model, metric, *current))
            current = None
    if current is not None:
        out.append(Episode(provider, model, metric, *current))
    return out
