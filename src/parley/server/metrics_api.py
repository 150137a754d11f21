"""The metrics API: ``/api/metrics/*`` reports over the request log, and limits.

Routes (JSON; errors are OpenAI error JSON). Every report takes a window (``since`` and
``until`` as ISO 8601, or ``window`` such as ``24h``; default the last 24 hours), filters
(``model``, ``provider``, ``origin``, ``error_type``, ``success``, ``user``,
``api_key``) and ``group_by`` (a comma-separated list of those names):

- ``GET /api/metrics/summary``: per group, request and error counts (by error type),
  error rate, avg / p50 / p90 / p99 of latency, time to first token and tokens per second,
  tokens and cost;
- ``GET /api/metrics/timeseries``: the same per ``bucket`` (``1h`` default; buckets of
  whole hours or days lie on whole hours or days, from rollups, the first and last
  counting only the window's part of them; finer buckets from the raw log for windows up
  to 6 hours);
- ``GET /api/metrics/requests``: the raw request log, last recorded first, ``limit`` and
  ``cursor`` pagination;
- ``GET /api/metrics/anomalies``: episodes where a model's error rate or p90 latency left
  its trailing baseline (``metrics.anomalies``);
- ``GET /api/metrics/http``: parley's own endpoints: count, error rate and latency
  percentiles per route template and method.

Users see their own traffic; admins see everyone's. Reports count exactly the requests
in [since, until): whole hours and days from rollups, the parts of hours at the window's
edges from the raw log (``store.edges``); where retention pruned an edge's raw rows that
edge is rounded out to its whole hour, and ``since`` / ``until`` in the answer say the
window counted. Every repository call leaves the event loop.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from parley.domain import histogram
from parley.domain.rollup import HOUR, Dims, Tally, dims_of
from parley.domain.times import utc
from parley.errors import InvalidRequest
from parley.metrics import anomalies, report
from parley.server import identity
from parley.server import metrics_query as q
from parley.server.params import page_size
from parley.server.state import SERVICES
from parley.store.edges import floor_day, floor_hour
from parley.store.metrics import MetricsStore

_MAX_PAGE = 500
# Finer buckets than an hour are counted from raw rows: only over short windows.
_RAW_WINDOW = timedelta(hours=6)
_LOG_FIELDS = (
    "created_at",
    "finished_at",
    "success",
    "status_code",
    "response_time_ms",
    "endpoint",
    "client_protocol",
    "provider",
    "model",
    "model_requested",
    "origin",
    "is_streaming",
    "max_tokens",
    "temperature",
    "top_p",
    "message_count",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "finish_reason",
    "time_to_first_token_ms",
    "time_to_last_token_ms",
    "tokens_per_second",
    "error_type",
    "error_message",
    "cost_usd",
    "attempt",
)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/metrics/summary", summary)
    app.router.add_get("/api/metrics/timeseries", timeseries)
    app.router.add_get("/api/metrics/requests", requests)
    app.router.add_get("/api/metrics/anomalies", anomalies_report)
    app.router.add_get("/api/metrics/http", http_report)


async def summary(request: web.Request) -> web.Response:
    """Totals and distributions per group over a window."""
    store, caller = _store(request), identity.current(request)
    start, end = q.window(request, _now())
    group_by = q.group_by(request)
    filters = await q.filters(request, caller, store)
    counted = await asyncio.to_thread(store.window, start, end, filters, group_by)
    data = await q.publish(report.summary(counted.rows, group_by), store)
    return _json({"since": _iso(counted.start), "until": _iso(counted.end), "data": data})


async def timeseries(request: web.Request) -> web.Response:
    """The summary per time bucket (``bucket``: 15m, 1h, 1d...; every bucket listed)."""
    store, caller = _store(request), identity.current(request)
    start, end = q.window(request, _now())
    bucket = q.duration(request.query.get("bucket", "1h"), "bucket")
    group_by = q.group_by(request)
    filters = await q.filters(request, caller, store)
    if (end - start) / bucket > 2000:
        raise InvalidRequest("too many buckets: at most 2000 per series", "bucket")
    if bucket % timedelta(hours=1) == timedelta(0):
        days = bucket % timedelta(days=1) == timedelta(0)
        counted = await asyncio.to_thread(
            lambda: store.window(start, end, filters, group_by, days=days)
        )
        # Buckets on whole days or hours; the first and last count only the window's part.
        start, end = counted.start, counted.end
        grid, rows = (floor_day(start) if days else floor_hour(start)), counted.rows
    else:
        if end - start > _RAW_WINDOW:
            raise InvalidRequest(
                "buckets finer than an hour are counted from the raw log: the window may "
                "span at most 6 hours",
                "bucket",
            )
        _check_raw_kept(request, start)
        grid = start
        rows = await asyncio.to_thread(_raw_rows, store, start, end, filters)
    series = report.timeseries(rows, grid, end, bucket, group_by)
    data = await q.publish(series, store)
    return _json(
        {"since": _iso(start), "until": _iso(end), "bucket": q.duration_text(bucket), "data": data}
    )


async def requests(request: web.Request) -> web.Response:
    """The raw request log, last recorded (committed) first: ``limit`` (1-500, default 50)
    and ``cursor``."""
    store, caller = _store(request), identity.current(request)
    filters = await q.filters(request, caller, store)
    start = q.moment(request.query["since"], "since") if request.query.get("since") else None
    end = q.moment(request.query["until"], "until") if request.query.get("until") else None
    if start is None and request.query.get("window"):
        # As the reports take it; without since, until or window the listing is unbounded.
        start, end = q.window(request, _now())
    if start is not None and end is not None and start >= end:
        raise InvalidRequest("'since' must be before 'until'", "since")
    limit = page_size(request.query.get("limit"), _MAX_PAGE)
    cursor = q.cursor(request)
    page = await asyncio.to_thread(
        lambda: store.requests_page(filters, start=start, end=end, cursor=cursor, limit=limit)
    )
    user_ids = {r["user_id"] for r in page.rows if r["user_id"] is not None}
    key_ids = {r["api_key_id"] for r in page.rows if r["api_key_id"] is not None}
    users, keys = await asyncio.to_thread(store.public_ids, user_ids, key_ids)
    data = [
        {
            "id": str(r["public_id"]),
            "chain_id": str(r["chain_id"]),
            **{name: _value(r[name]) for name in _LOG_FIELDS},
            "user": str(users[r["user_id"]]) if r["user_id"] in users else None,
            "api_key": str(keys[r["api_key_id"]]) if r["api_key_id"] in keys else None,
        }
        for r in page.rows
    ]
    return _json({"data": data, "next_cursor": page.next_cursor})


async def anomalies_report(request: web.Request) -> web.Response:
    """Episodes in the window where a model's error rate or p90 latency rose above its
    trailing 24-hour baseline (mean + 3 standard deviations, with floors)."""
    store, caller = _store(request), identity.current(request)
    start, end = q.window(request, _now())
    filters = await q.filters(request, caller, store)
    since = floor_hour(start)
    rows = await asyncio.to_thread(
        store.period,
        HOUR,
        since - timedelta(hours=anomalies.BASELINE_HOURS),
        end,
        filters,
        ("provider", "model"),
    )
    found = anomalies.find(rows, since)
    return _json({"since": _iso(start), "until": _iso(end), "data": [e.to_json() for e in found]})


async def http_report(request: web.Request) -> web.Response:
    """parley's own endpoints over the window: per route template and method, the request
    count, the share of 5xx answers and latency avg / p50 / p90 / p99 (from the sampled
    HTTP metrics)."""
    store, caller = _store(request), identity.current(request)
    start, end = q.window(request, _now())
    user_id = None if caller.is_admin else caller.user_id
    rows = await asyncio.to_thread(store.http_tallies, start, end, user_id)
    groups: dict[tuple[str, str], list[Any]] = {}
    for row in rows:
        entry = groups.setdefault((row.endpoint, row.method), [0, 0, 0.0, {}])
        entry[0] += row.n
        entry[1] += row.server_errors
        entry[2] += row.total_ms
        entry[3][row.bin] = entry[3].get(row.bin, 0) + row.n
    data = [
        {
            "endpoint": endpoint,
            "method": method,
            "requests": n,
            "server_errors": errors,
            "error_rate": errors / n,
            "latency_ms": {
                "avg": total / n,
                **{f"p{p}": histogram.percentile(h, p) for p in report.PERCENTILES},
            },
        }
        for (endpoint, method), (n, errors, total, h) in sorted(
            groups.items(), key=lambda kv: -kv[1][0]
        )
    ]
    return _json({"since": _iso(start), "until": _iso(end), "data": data})


def _check_raw_kept(request: web.Request, start: datetime) -> None:
    """Refuse raw-log buckets where retention may have pruned the raw rows: counted from
    what is left, they would show a busy hour as a quiet one."""
    days = request.app[SERVICES].settings.retention.request_log_days
    if days > 0 and start < _now() - timedelta(days=days):
        raise InvalidRequest(
            f"buckets finer than an hour are counted from the raw log, which retention "
            f"keeps {days:g} day{'s' if days != 1 else ''}: this window starts before that; "
            f"use buckets of whole hours (from the rollups, kept forever)",
            "bucket",
        )


def _raw_rows(
    store: MetricsStore, start: datetime, end: datetime, filters: dict[str, Any]
) -> list[tuple[datetime, Dims, Tally]]:
    """Raw rows as one-row tallies at their own time: exact buckets of any size."""
    out = []
    for row in store.raw(start, end, filters):
        row["created_at"] = utc(row["created_at"])
        tally = Tally()
        tally.add_attempt(row)
        out.append((row["created_at"], dims_of(row), tally))
    return out


def _store(request: web.Request) -> MetricsStore:
    return MetricsStore(request.app[SERVICES].engine)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _value(value: Any) -> Any:
    return _iso(utc(value)) if isinstance(value, datetime) else value


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
