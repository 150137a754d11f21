"""Prometheus metrics for ``GET /metrics``: this process's totals since it started.

Invariants:
- nothing on the request path calls into ``prometheus_client``: the writer hands over the
  hourly tallies of each committed batch (``observe_tallies``),
  and the HTTP middleware adds to a small per-route tally; both are folded into plain
  dictionaries under a lock, and turned into metric families only when scraped;
- labels are provider and model (for HTTP: the route template, method and status class),
  never a user, key or raw path. Models come from upstreams and clients, so their number is
  bounded: past ``max_series`` distinct (provider, model) pairs, new ones are counted as
  model ``"other"``;
- histogram buckets are read from the log-bucketed histograms (``domain.histogram``): a
  value is counted under the first bound at or above its bin's midpoint, so a count may
  sit one bucket off for values within 4.4% of a bound;
- one collector per app (no module-level state): two apps in one process never share
  counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from parley.domain import histogram
from parley.domain.histogram import Histogram
from parley.domain.rollup import Dims, Tally, tally_hours

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a fast cache hit to a long reasoning answer.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Upstream:
    __slots__ = ("errors", "outcomes", "tally")

    def __init__(self) -> None:
        self.tally = Tally()
        self.outcomes = {"success": 0, "error": 0}
        self.errors: dict[str, int] = {}


class PrometheusMetrics(Collector):
    def __init__(self, *, max_series: int = 500) -> None:
        self.registry = CollectorRegistry()
        self._max_series = max_series
        self._lock = threading.Lock()
        self._upstream: dict[tuple[str, str], _Upstream] = {}
        self._http: dict[tuple[str, str, str], tuple[int, float, Histogram]] = {}
        self.registry.register(self)

    def observe_tallies(self, tallies: Mapping[tuple[str, datetime, Dims], Tally]) -> None:
        """Count a committed batch, given its hourly tallies (``tally_hours``)."""
        with self._lock:
            for (_period, _start, dims), tally in tallies.items():
                entry = self._entry(dims.provider, dims.model)
                entry.tally.merge(tally)
                entry.outcomes["success" if dims.success else "error"] += tally.requests
                if not dims.success:
                    kind = dims.error_type or "unknown"
                    entry.errors[kind] = entry.errors.get(kind, 0) + tally.requests

    def observe_rows(self, rows: list[dict[str, Any]]) -> None:
        """Count committed request-log rows (the writer's dicts; called after commit)."""
        self.observe_tallies(tally_hours(rows))

    def observe_http(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method, f"{status // 100}xx")
        with self._lock:
            count, total, bins = self._http.get(key) or (0, 0.0, {})
            histogram.add(bins, seconds * 1000)
            self._http[key] = (count + 1, total + seconds, bins)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        with self._lock:
            upstream = [
                (key, _copy(entry.tally), dict(entry.outcomes), dict(entry.errors))
                for key, entry in self._upstream.items()
            ]
            http = [
                (key, count, total, dict(bins)) for key, (count, total, bins) in self._http.items()
            ]
        labels = ["provider", "model"]
        requests = CounterMetricFamily(
            "parley_upstream_requests", "Upstream attempts recorded", labels=[*labels, "outcome"]
        )
        errors = CounterMetricFamily(
            "parley_upstream_errors", "Failed upstream attempts", labels=[*labels, "error_type"]
        )
        tokens = CounterMetricFamily(
            "parley_tokens", "Tokens of recorded upstream attempts", labels=[*labels, "kind"]
        )
        cost = CounterMetricFamily(
            "parley_cost_usd", "Cost of recorded attempts with a known price", labels=labels
        )
        latency = HistogramMetricFamily(
            "parley_upstream_duration_seconds", "Upstream attempt duration", labels=labels
        )
        ttft = HistogramMetricFamily(
            "parley_time_to_first_token_seconds",
            "Time to the first token of streamed answers",
            labels=labels,
        )
        for (provider, model), tally, outcomes, by_type in upstream:
            names = [provider, model]
            for outcome, count in outcomes.items():
                requests.add_metric([*names, outcome], count)
            for kind, count in by_type.items():
                errors.add_metric([*names, kind], count)
            tokens.add_metric([*names, "prompt"], tally.prompt_tokens)
            tokens.add_metric([*names, "completion"], tally.completion_tokens)
            cost.add_metric(names, tally.cost_usd)
            latency.add_metric(
                names, _buckets(tally.latency_ms, LATENCY_BUCKETS), tally.latency_ms_sum / 1000
            )
            ttft.add_metric(names, _buckets(tally.ttft_ms, TTFT_BUCKETS), tally.ttft_ms_sum / 1000)
        served = HistogramMetricFamily(
            "parley_http_request_duration_seconds",
            "HTTP requests parley served, by route template",
            labels=["endpoint", "method", "status"],
        )
        for key, _count, total, bins in http:
            served.add_metric(list(key), _buckets(bins, HTTP_BUCKETS), total)
        yield from (requests, errors, tokens, cost, latency, ttft, served)

    def _entry(self, provider: str, model: str) -> _Upstream:
        entry = self._upstream.get((provider, model))
        if entry is not None:
            return entry
        if len(self._upstream) >= self._max_series:
            model = "other"
        return self._upstream.setdefault((provider, model), _Upstream())


def _buckets(values: Histogram, bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets (seconds) from a histogram of milliseconds."""
    counts = [0] * (len(bounds) + 1)
    for bin_, count in values.items():
        seconds = histogram.value_of(bin_) / 1000
        index = next((i for i, bound in enumerate(bounds) if seconds <= bound), len(bounds))
        counts[index] += count
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        running += count
        out.append((bound, running))
    return out


def _copy(tally: Tally) -> Tally:
    return Tally().merge(tally)
