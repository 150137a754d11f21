"""Prometheus metrics for ``GET /metrics``: counters and histograms of this process.

Invariants:
- one ``CollectorRegistry`` per app (no module-level state), so two apps in one process
  (tests) never share counters;
- labels are provider and model (and, for HTTP, the route template, method and status):
  never a user, key or raw path. Models come from upstreams and clients, so their number
  is bounded: past ``max_series`` distinct (provider, model) pairs, new models are counted
  as model ``"other"``;
- ``observe_attempts`` takes the request-log rows the writer committed, so Prometheus
  counts exactly what the store holds; it is called from the writer thread, and
  ``prometheus_client`` metrics are thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: from a fast cache hit to a long reasoning answer.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PrometheusMetrics:
    def __init__(self, *, max_series: int = 500) -> None:
        self.registry = CollectorRegistry()
        self._max_series = max_series
        self._seen: set[tuple[str, str]] = set()
        self._seen_lock = threading.Lock()
        r = self.registry
        model = ["provider", "model"]
        self.requests = Counter(
            "parley_upstream_requests", "Upstream attempts", [*model, "outcome"], registry=r
        )
        self.errors = Counter(
            "parley_upstream_errors", "Failed upstream attempts", [*model, "error_type"], registry=r
        )
        self.tokens = Counter(
            "parley_tokens", "Tokens used by upstream attempts", [*model, "kind"], registry=r
        )
        self.cost = Counter(
            "parley_cost_usd", "Cost of upstream attempts with a known price", model, registry=r
        )
        self.latency = Histogram(
            "parley_upstream_duration_seconds",
            "Upstream attempt duration",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "parley_time_to_first_token_seconds",
            "Time to the first token of streamed answers",
            model,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.http = Histogram(
            "parley_http_request_duration_seconds",
            "HTTP requests parley served, by route template",
            ["endpoint", "method", "status"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )

    def observe_attempts(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Count committed request-log rows (the writer's dicts)."""
        for row in rows:
            labels = self._labels(row["provider"], row["model"])
            success = bool(row["success"])
            self.requests.labels(*labels, "success" if success else "error").inc()
            if not success:
                self.errors.labels(*labels, row["error_type"] or "unknown").inc()
            for kind in ("prompt", "completion"):
                count = row[f"{kind}_tokens"]
                if count:
                    self.tokens.labels(*labels, kind).inc(count)
            if row["cost_usd"]:
                self.cost.labels(*labels).inc(row["cost_usd"])
            if row["response_time_ms"] is not None:
                self.latency.labels(*labels).observe(row["response_time_ms"] / 1000)
            if row["time_to_first_token_ms"] is not None:
                self.ttft.labels(*labels).observe(row["time_to_first_token_ms"] / 1000)

    def observe_http(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.http.labels(endpoint, method, str(status)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _labels(self, provider: str, model: str) -> tuple[str, str]:
        pair = (provider, model)
        if pair in self._seen:
            return pair
        with self._seen_lock:
            if len(self._seen) < self._max_series:
                self._seen.add(pair)
                return pair
        return provider, "other"
