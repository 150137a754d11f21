"""Reports from rollups: summaries and time series, grouped by any dimensions.

Input is what the rollup repository yields, ``(bucket start, Dims, Tally)``; output is
plain JSON-ready dicts. Grouping merges tallies (``Tally.merge``), so a 30-day summary
reads at most a day's row per series per day, never the raw log.

Percentiles are nearest-rank, read from the merged histograms: within
``histogram.RELATIVE_ERROR`` of the exact value (see ``domain.histogram``). Averages are
exact (sums over counts). A cost is the sum over requests with a known price; ``priced``
says how many that was, and a group with none has cost ``None``, not zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from parley.domain import histogram
from parley.domain.histogram import Histogram
from parley.domain.rollup import GROUPABLE, Dims, Tally

PERCENTILES = (50, 90, 99)

Row = tuple[datetime, Dims, Tally]


class Group:
    """A group's merged tally, and its errors by type."""

    __slots__ = ("errors", "tally")

    def __init__(self) -> None:
        self.tally = Tally()
        self.errors: dict[str, int] = {}

    def add(self, dims: Dims, tally: Tally) -> None:
        self.tally.merge(tally)  # adds into the group's own tally; ``tally`` is unchanged
        if not dims.success:
            kind = dims.error_type or "unknown"
            self.errors[kind] = self.errors.get(kind, 0) + tally.requests

    def stats(self) -> dict[str, Any]:
        t = self.tally
        errors = sum(self.errors.values())
        return {
            "requests": t.requests,
            "errors": errors,
            "error_rate": errors / t.requests if t.requests else None,
            "errors_by_type": dict(sorted(self.errors.items())),
            "latency_ms": _distribution(t.latency_ms, t.latency_ms_sum),
            "time_to_first_token_ms": _distribution(t.ttft_ms, t.ttft_ms_sum),
            "tokens_per_second": _distribution(t.tps, t.tps_sum),
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "total_tokens": t.total_tokens,
            "cost_usd": t.cost_usd if t.priced else None,
            "priced_requests": t.priced,
        }


def check_group_by(group_by: Sequence[str]) -> None:
    unknown = [name for name in group_by if name not in GROUPABLE]
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(unknown)}: choose from {', '.join(sorted(GROUPABLE))}"
        )


def summary(rows: Iterable[Row], group_by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One entry per group (one in all without ``group_by``), busiest first."""
    check_group_by(group_by)
    groups: dict[tuple[Any, ...], Group] = {}
    for _start, dims, tally in rows:
        key = tuple(getattr(dims, name) for name in group_by)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group()
        group.add(dims, tally)
    if not groups and not group_by:
        groups[()] = Group()
    out = [
        {"group": dict(zip(group_by, key, strict=True)), **group.stats()}
        for key, group in groups.items()
    ]
    out.sort(key=lambda entry: (-entry["requests"], repr(sorted(entry["group"].items()))))
    return out


def timeseries(
    rows: Iterable[Row],
    start: datetime,
    end: datetime,
    bucket: timedelta,
    group_by: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Buckets of ``bucket`` from ``start`` (every bucket, empty ones too), each with
    its groups' stats."""
    check_group_by(group_by)
    if bucket <= timedelta(0):
        raise ValueError("the bucket size must be positive")
    count = max(0, -(-(end - start) // bucket))
    buckets: list[dict[tuple[Any, ...], Group]] = [{} for _ in range(count)]
    for at, dims, tally in rows:
        index = (at - start) // bucket
        if not 0 <= index < count:
            continue
        key = tuple(getattr(dims, name) for name in group_by)
        group = buckets[index].get(key)
        if group is None:
            group = buckets[index][key] = Group()
        group.add(dims, tally)
    out = []
    for index, groups in enumerate(buckets):
        entries = [
            {"group": dict(zip(group_by, key, strict=True)), **group.stats()}
            for key, group in sorted(groups.items(), key=lambda kv: repr(kv[0]))
        ]
        if not group_by:
            entries = entries or [{"group": {}, **Group().stats()}]
        out.append({"start": _iso(start + index * bucket), "groups": entries})
    return out


def _distribution(values: Histogram, value_sum: float) -> dict[str, float | None]:
    n = histogram.total(values)
    out: dict[str, float | None] = {"count": n, "avg": value_sum / n if n else None}
    for p in PERCENTILES:
        out[f"p{p}"] = histogram.percentile(values, p)
    return out


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
