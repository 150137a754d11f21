"""Rollup values: what the request log adds up to per hour or day and per series.

A series is one combination of the dimensions reports group by (``Dims``). A ``Tally``
holds a series' totals over a bucket of time: counts and sums add, and the latency, time
to first token and tokens-per-second distributions are histograms (``domain.histogram``),
which add too. So any set of tallies (hours into a day, series into a model) merges into
one without going back to raw rows, and percentiles read from the merge carry only the
histogram's documented bin error.

Pure values: the store fills them from rows, reports read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from parley.domain import histogram
from parley.domain.histogram import Histogram

HOUR = "hour"
DAY = "day"
# The same tallies kept by model alone (no user, key or origin): fleet-wide reports read
# these, a few rows per model per bucket instead of one per user, key and origin.
MODEL_HOUR = "mhour"
MODEL_DAY = "mday"
MODEL_DIMENSIONS = frozenset({"provider", "model", "success", "error_type"})


def by_model(period: str) -> str:
    """The model-level twin of ``HOUR`` or ``DAY``."""
    return MODEL_HOUR if period == HOUR else MODEL_DAY


def model_level(names: Iterable[str]) -> bool:
    """Whether a report grouped or filtered by ``names`` can read the model-level rows."""
    return set(names) <= MODEL_DIMENSIONS


class Dims(NamedTuple):
    """The dimensions a rollup row is kept by (None: not known / not applicable)."""

    user_id: int | None
    api_key_id: int | None
    provider: str
    model: str
    origin: str | None
    success: bool
    error_type: str | None

    def key(self) -> str:
        """A fixed-width key for the unique index (several dimensions may be NULL,
        and NULLs never collide in a unique index)."""
        return hashlib.blake2b(repr(tuple(self)).encode(), digest_size=16).hexdigest()


GROUPABLE = frozenset(Dims._fields)


def bucket_start(at: datetime, period: str) -> datetime:
    hour = at.replace(minute=0, second=0, microsecond=0)
    return hour if period in (HOUR, MODEL_HOUR) else hour.replace(hour=0)


@dataclass(slots=True)
class Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0
    # Requests with a known cost: a cost sum over unpriced requests is not a total.
    priced: int = 0
    latency_ms_sum: float = 0.0
    ttft_ms_sum: float = 0.0
    tps_sum: float = 0.0
    latency_ms: Histogram = field(default_factory=dict)
    ttft_ms: Histogram = field(default_factory=dict)
    tps: Histogram = field(default_factory=dict)

    def add_attempt(self, row: dict[str, Any]) -> None:
        """Count one request-log row (the writer's dict for it)."""
        self.requests += 1
        self.prompt_tokens += row["prompt_tokens"] or 0
        self.completion_tokens += row["completion_tokens"] or 0
        self.total_tokens += row["total_tokens"] or 0
        cost = row["cost_usd"]
        if cost is not None:
            self.cost_usd += cost
            self.priced += 1
        latency = row["response_time_ms"]
        if latency is not None:
            self.latency_ms_sum += latency
            histogram.add(self.latency_ms, latency)
        ttft = row["time_to_first_token_ms"]
        if ttft is not None:
            self.ttft_ms_sum += ttft
            histogram.add(self.ttft_ms, ttft)
        tps = row["tokens_per_second"]
        if tps is not None:
            self.tps_sum += tps
            histogram.add(self.tps, tps)

    def merge(self, other: Tally) -> Tally:
        """Add ``other`` into this tally (which must be one's own: see ``plus``)."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost_usd += other.cost_usd
        self.priced += other.priced
        self.latency_ms_sum += other.latency_ms_sum
        self.ttft_ms_sum += other.ttft_ms_sum
        self.tps_sum += other.tps_sum
        histogram.merge(self.latency_ms, other.latency_ms)
        histogram.merge(self.ttft_ms, other.ttft_ms)
        histogram.merge(self.tps, other.tps)
        return self

    def subtract(self, other: Tally) -> Tally:
        """Take ``other`` (a part of this tally's requests) out of this tally, which must
        be one's own: an hour's rollup less the rows of that hour outside a window.
        Counts and histogram bins subtract exactly; a bin left empty is dropped."""
        self.requests -= other.requests
        self.prompt_tokens -= other.prompt_tokens
        self.completion_tokens -= other.completion_tokens
        self.total_tokens -= other.total_tokens
        self.cost_usd -= other.cost_usd
        self.priced -= other.priced
        self.latency_ms_sum -= other.latency_ms_sum
        self.ttft_ms_sum -= other.ttft_ms_sum
        self.tps_sum -= other.tps_sum
        histogram.take(self.latency_ms, other.latency_ms)
        histogram.take(self.ttft_ms, other.ttft_ms)
        histogram.take(self.tps, other.tps)
        return self

    def plus(self, other: Tally) -> Tally:
        """A new tally of both; neither changes. A histogram that only one of them has
        is shared, not copied (the writer adds a few rows to large stored histograms
        on every commit), so a result of ``plus`` or ``tally_rows`` is read, or merged
        into a tally of one's own, never changed in place."""
        return Tally(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.cost_usd + other.cost_usd,
            self.priced + other.priced,
            self.latency_ms_sum + other.latency_ms_sum,
            self.ttft_ms_sum + other.ttft_ms_sum,
            self.tps_sum + other.tps_sum,
            histogram.added(self.latency_ms, other.latency_ms),
            histogram.added(self.ttft_ms, other.ttft_ms),
            histogram.added(self.tps, other.tps),
        )


def dims_of(row: dict[str, Any]) -> Dims:
    return Dims(
        row["user_id"],
        row["api_key_id"],
        row["provider"],
        row["model"],
        row["origin"],
        bool(row["success"]),
        row["error_type"],
    )


def tally_hours(rows: list[dict[str, Any]]) -> dict[tuple[str, datetime, Dims], Tally]:
    """Request-log rows (as the writer builds them) added up per hour and series (every
    dimension): what ``tally_rows`` derives the other periods from, and all that the
    Prometheus counters need."""
    hours: dict[tuple[str, datetime, Dims], Tally] = {}
    for row in rows:
        key = (HOUR, bucket_start(row["created_at"], HOUR), dims_of(row))
        tally = hours.get(key)
        if tally is None:
            tally = hours[key] = Tally()
        tally.add_attempt(row)
    return hours


def tally_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, datetime, Dims], Tally]:
    """Request-log rows added up per period, bucket and series, at both levels (every
    dimension, and by model alone). Tallies may be shared between keys (see ``plus``)."""
    hours = tally_hours(rows)
    # The other three from these: one merge per hour and series, not a pass per row.
    out = dict(hours)
    for (_, start, dims), tally in hours.items():
        model = dims._replace(user_id=None, api_key_id=None, origin=None)
        for key in (
            (DAY, start.replace(hour=0), dims),
            (MODEL_HOUR, start, model),
            (MODEL_DAY, start.replace(hour=0), model),
        ):
            found = out.get(key)
            out[key] = tally if found is None else found.plus(tally)
    return out
