"""The metrics reports over HTTP, on rows recorded at chosen times, on SQLite and PostgreSQL.

A real parley with a master key runs on a database filled through the store's own batch
writer (the request log and its rollups, as the writer commits them), so windows, users
and retention can be set up exactly; the reports are read over HTTP as a client reads them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from parley.domain import histogram
from parley.domain.messages import Message
from parley.ops.migrate import upgrade
from parley.store.engine import create_engine
from parley.store.schema import http_metrics, request_log
from parley.store.users import Users
from tests.harness import ParleyServer, settings_for, write_config
from tests.server.test_auth import MASTER, bearer
from tests.store.test_exchanges import attempt, chat, write

NOW = datetime.now(UTC)


@dataclass
class Site:
    server: ParleyServer
    engine: sa.Engine
    # user name -> (public id, plain API key, internal id)
    users: dict[str, tuple[str, str, int]]

    def get(self, path: str, key: str = MASTER, **params: Any) -> httpx.Response:
        return httpx.get(
            f"{self.server.root}{path}", params=params, headers=bearer(key), timeout=30
        )

    def ok(self, path: str, key: str = MASTER, **params: Any) -> Any:
        reply = self.get(path, key, **params)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def record(
        self, user: str | None, at: datetime, model: str = "m", n: int = 1, **fields: Any
    ) -> None:
        """``n`` requests of ``user`` started at ``at`` (``fields``: of their attempt)."""
        user_id = None if user is None else self.users[user][2]
        write(
            self.engine,
            *[
                chat(
                    [Message("user", f"{user} {model} {at} {i}")],
                    attempts=[attempt(started_at=at, model_used=model, **fields)],
                    user_id=user_id,
                )
                for i in range(n)
            ],
        )


@pytest.fixture
def site(tmp_path: Path, database_url: str) -> Iterator[Site]:
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": "http://127.0.0.1:9", "models": ["m"]}],
    )
    settings = settings_for(
        tmp_path, database_url, PARLEY_MASTER_KEY=MASTER, PARLEY_RETENTION_REQUEST_LOG_DAYS="1"
    )
    upgrade(settings)
    engine = create_engine(settings)
    users = Users(engine)
    made = {}
    for name in ("alice", "bob"):
        user = users.create_user(
            email=f"{name}@example.org", username=name, password="pw-long-enough"
        )
        _key, plain = users.create_key(user.id, "reports")
        made[name] = (str(user.public_id), plain, user.id)
    server = ParleyServer(settings).start()
    try:
        yield Site(server, engine, made)
    finally:
        server.stop()
        engine.dispose()


def _pages(site: Site, key: str, **params: Any) -> tuple[list[str], list[str]]:
    """Every row id of the listing, page by page, and the cursors it handed out."""
    ids: list[str] = []
    cursors: list[str] = []
    cursor = None
    while True:
        page = site.ok(
            "/api/metrics/requests", key, **params, **({"cursor": cursor} if cursor else {})
        )
        ids += [row["id"] for row in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, cursors
        cursors.append(cursor)


def test_a_listing_cursor_is_a_row_s_public_id_never_its_position_in_the_log(site: Site) -> None:
    # Bob's requests with others' traffic between them: before, each next_cursor was the
    # internal row id, so the gap between two of bob's cursors told him how many requests
    # everyone else had made in between.
    for i in range(5):
        site.record("bob", NOW - timedelta(minutes=30 - i))
        site.record("alice", NOW - timedelta(minutes=30 - i), n=7)
    bob_key = site.users["bob"][1]
    ids, cursors = _pages(site, bob_key, limit=1)
    assert len(ids) == len(set(ids)) == 5
    # Each cursor is the id of the row that ended its page.
    assert cursors == ids[:-1]
    assert all(str(uuid.UUID(cursor)) == cursor for cursor in cursors)

    # A cursor goes on from its row whatever the filters: another model's rows older than it.
    site.record(None, NOW - timedelta(minutes=10), model="other", n=3)
    site.record(None, NOW - timedelta(minutes=5), model="m", n=2)
    first = site.ok("/api/metrics/requests", model="m", limit=1)
    older = site.ok("/api/metrics/requests", model="other", cursor=first["next_cursor"])
    assert len(older["data"]) == 3

    # Anything that is not a page's cursor is a clear 400, never a 500 or a silent page.
    for tampered in (str(uuid.uuid4()), "12", "abc", "0" * 40, first["next_cursor"] + "0"):
        reply = site.get("/api/metrics/requests", cursor=tampered)
        assert reply.status_code == 400, (tampered, reply.text)
        error = reply.json()["error"]
        assert error["param"] == "cursor" and "next_cursor" in error["message"], error


def test_a_user_asking_for_another_user_s_traffic_gets_none_not_their_own(site: Site) -> None:
    alice_id, _alice_key, _ = site.users["alice"]
    bob_id, bob_key, _ = site.users["bob"]
    site.record("alice", NOW - timedelta(minutes=20), n=3)
    site.record("bob", NOW - timedelta(minutes=20), n=2)
    # Before: the user filter was replaced by bob's own, and bob's totals came back as
    # the answer to "alice's traffic".
    summary = site.ok("/api/metrics/summary", bob_key, user=alice_id)["data"]
    assert [e["requests"] for e in summary] == [0]
    series = site.ok("/api/metrics/timeseries", bob_key, user=alice_id, window="2h")["data"]
    assert sum(g["requests"] for bucket in series for g in bucket["groups"]) == 0
    assert site.ok("/api/metrics/requests", bob_key, user=alice_id)["data"] == []
    # His own id, or none, is his own traffic; an admin sees alice's.
    assert site.ok("/api/metrics/summary", bob_key, user=bob_id)["data"][0]["requests"] == 2
    assert site.ok("/api/metrics/summary", bob_key)["data"][0]["requests"] == 2
    assert site.ok("/api/metrics/summary", user=alice_id)["data"][0]["requests"] == 3


def test_fine_buckets_are_refused_where_retention_pruned_the_raw_rows(site: Site) -> None:
    # Retention keeps the raw log one day here. Traffic 40 hours ago is in the rollups
    # only: before, 30-minute buckets over it were counted from the (pruned) raw log and
    # came back as zeros, as if nothing had happened.
    hour = (NOW - timedelta(hours=40)).replace(minute=0, second=0, microsecond=0)
    site.record(None, hour + timedelta(minutes=10), n=4)
    site.record(None, NOW - timedelta(minutes=20), n=2)
    with site.engine.begin() as conn:
        conn.execute(
            sa.delete(request_log).where(request_log.c.created_at < NOW - timedelta(days=1))
        )
    window = {"since": _iso(hour), "until": _iso(hour + timedelta(hours=2))}
    reply = site.get("/api/metrics/timeseries", bucket="30m", **window)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "bucket" and "1 day" in error["message"], error
    # Whole hours come from the rollups, which retention never touches.
    hourly = site.ok("/api/metrics/timeseries", bucket="1h", **window)["data"]
    assert [b["groups"][0]["requests"] for b in hourly] == [4, 0]
    # Within the raw log's day, fine buckets are counted as before.
    recent = site.ok("/api/metrics/timeseries", bucket="10m", window="1h")["data"]
    assert sum(b["groups"][0]["requests"] for b in recent) == 2


def test_the_request_listing_refuses_a_reversed_window_as_the_reports_do(site: Site) -> None:
    site.record(None, NOW - timedelta(minutes=20))
    params = {"since": _iso(NOW), "until": _iso(NOW - timedelta(hours=1))}
    for report in ("summary", "requests"):
        reply = site.get(f"/api/metrics/{report}", **params)
        assert reply.status_code == 400, (report, reply.text)
        assert reply.json()["error"]["param"] == "since"


def test_an_offset_whose_plus_came_unencoded_in_the_url_is_still_an_offset(site: Site) -> None:
    site.record(None, NOW - timedelta(minutes=20))
    # `curl '...?since=2026-11-24T10:00:00+05:30'` sends the '+' as is, and a query string
    # reads it as a space: before, a 400 saying the time was not ISO 8601.
    since = (NOW - timedelta(hours=2)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    text = since.replace(microsecond=0).isoformat()
    assert "+05:30" in text
    for report in ("summary", "requests"):
        reply = httpx.get(
            f"{site.server.root}/api/metrics/{report}?since={text}", headers=bearer(MASTER)
        )
        assert reply.status_code == 200, (report, reply.text)
    summary = httpx.get(
        f"{site.server.root}/api/metrics/summary?since={text}", headers=bearer(MASTER)
    ).json()
    assert summary["since"] == _iso(since.replace(microsecond=0))
    assert summary["data"][0]["requests"] == 1


def test_report_answers_write_buckets_and_times_as_the_api_reads_them(site: Site) -> None:
    # A latency step two hours ago, after a steady day: one anomaly episode.
    step = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    for h in range(30, 0, -1):
        site.record(None, step - timedelta(hours=h), n=25, response_time_ms=100.0 + h % 3)
    site.record(None, step + timedelta(minutes=5), n=25, response_time_ms=900.0)
    [episode] = site.ok("/api/metrics/anomalies", window="3h")["data"]
    # Before: "+00:00" here, where every other time in the reports ends in Z.
    assert episode["metric"] == "latency_p90_ms" and episode["start"] == _iso(step)
    assert episode["end"] == _iso(step + timedelta(hours=1))
    # Before: Python's own spelling of the bucket ("1 day, 0:00:00").
    for asked, echoed, window in (
        ("30m", "30m", "2h"),
        ("90m", "90m", "6h"),
        ("120m", "2h", "1d"),
        ("1d", "1d", "3d"),
        ("86400s", "1d", "3d"),
    ):
        answer = site.ok("/api/metrics/timeseries", bucket=asked, window=window)
        assert answer["bucket"] == echoed, (asked, answer["bucket"])


MINUTE = timedelta(minutes=1)
# (minute from the first hour, user, requests, model): three hours of two users' traffic.
TRAFFIC = [
    (5, "alice", 3, "m"),
    (5, "bob", 1, "m"),
    (25, "alice", 2, "m2"),
    (50, "bob", 4, "m"),
    (70, "alice", 5, "m"),
    (100, "bob", 2, "m2"),
    (135, "alice", 1, "m"),
    (135, "bob", 3, "m"),
    (165, "bob", 2, "m2"),
    (170, "alice", 4, "m"),
]


def _traffic(site: Site) -> datetime:
    """Record ``TRAFFIC`` from three hours before this hour; its first hour."""
    hour = NOW.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    for minute, user, n, model in TRAFFIC:
        site.record(user, hour + minute * MINUTE, model=model, n=n)
    return hour


def _in(lo: int, hi: int, user: str | None = None, model: str | None = None) -> int:
    """Requests of ``TRAFFIC`` from minute ``lo`` to before ``hi``."""
    return sum(
        n for m, u, n, mod in TRAFFIC if lo <= m < hi and user in (None, u) and model in (None, mod)
    )


# Windows (minutes from the first hour) starting and ending inside hours, either side of
# half past (so both ways of reading an edge hour), and inside a single hour.
WINDOWS = [(20, 140), (45, 160), (55, 168), (10, 75), (30, 50), (62, 118)]


def test_a_window_inside_hours_counts_exactly_its_requests_for_admins_and_users(
    site: Site,
) -> None:
    hour = _traffic(site)
    bob_key = site.users["bob"][1]
    ids = {site.users[name][0]: name for name in ("alice", "bob")}
    for lo, hi in WINDOWS:
        window = {"since": _iso(hour + lo * MINUTE), "until": _iso(hour + hi * MINUTE)}
        # Before: rounded out to whole hours, (20, 140) counted from minute 0 to 180.
        body = site.ok("/api/metrics/summary", group_by="user,model", **window)
        assert (body["since"], body["until"]) == (window["since"], window["until"])
        got = {(ids[e["group"]["user"]], e["group"]["model"]): e["requests"] for e in body["data"]}
        expected = {
            (user, model): _in(lo, hi, user, model)
            for user in ("alice", "bob")
            for model in ("m", "m2")
            if _in(lo, hi, user, model)
        }
        assert got == expected, (lo, hi)
        # A user sees their own requests of the window, none of alice's at its edges.
        [mine] = site.ok("/api/metrics/summary", bob_key, **window)["data"]
        assert mine["requests"] == _in(lo, hi, "bob"), (lo, hi)
        filtered = site.ok("/api/metrics/summary", bob_key, model="m2", **window)["data"]
        assert filtered[0]["requests"] == _in(lo, hi, "bob", "m2"), (lo, hi)


def test_time_series_buckets_at_the_window_s_edges_count_only_its_part(site: Site) -> None:
    hour = _traffic(site)
    window = {"since": _iso(hour + 20 * MINUTE), "until": _iso(hour + 140 * MINUTE)}
    body = site.ok("/api/metrics/timeseries", bucket="1h", **window)
    assert (body["since"], body["until"]) == (window["since"], window["until"])
    # Buckets stay on whole hours; the first and last count the window's part of them.
    assert [b["start"] for b in body["data"]] == [_iso(hour + h * 60 * MINUTE) for h in range(3)]
    got = [b["groups"][0]["requests"] for b in body["data"]]
    assert got == [_in(20, 60), _in(60, 120), _in(120, 140)]  # before: [10, 7, 4]
    mine = site.ok("/api/metrics/timeseries", site.users["bob"][1], bucket="1h", **window)
    assert [b["groups"][0]["requests"] for b in mine["data"]] == [
        _in(20, 60, "bob"),
        _in(60, 120, "bob"),
        _in(120, 140, "bob"),
    ]
    # Day buckets: before, the first day was counted from its midnight.
    daily = site.ok("/api/metrics/timeseries", bucket="1d", **window)["data"]
    assert sum(b["groups"][0]["requests"] for b in daily) == _in(20, 140)


def test_an_edge_in_the_pruned_raw_log_is_rounded_out_and_says_so(site: Site) -> None:
    # Retention keeps the raw log one day here; 40 hours ago is in the rollups only.
    hour = (NOW - timedelta(hours=40)).replace(minute=0, second=0, microsecond=0)
    site.record(None, hour + 10 * MINUTE, n=4)
    site.record(None, hour + 50 * MINUTE, n=3)
    site.record(None, NOW - timedelta(minutes=20), n=2)
    site.record(None, NOW - timedelta(minutes=5), n=1)
    with site.engine.begin() as conn:
        conn.execute(
            sa.delete(request_log).where(request_log.c.created_at < NOW - timedelta(days=1))
        )
    until = NOW - timedelta(minutes=10)
    body = site.ok("/api/metrics/summary", since=_iso(hour + 30 * MINUTE), until=_iso(until))
    # The first hour counted whole, as its rollup has it, and the window says so; the
    # end, whose raw rows are kept, is exact.
    assert (body["since"], body["until"]) == (_iso(hour), _iso(until))
    assert body["data"][0]["requests"] == 4 + 3 + 2
    series = site.ok(
        "/api/metrics/timeseries", bucket="1d", since=_iso(hour + 30 * MINUTE), until=_iso(until)
    )
    assert series["since"] == _iso(hour)
    assert sum(b["groups"][0]["requests"] for b in series["data"]) == 9


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def test_the_http_report_adds_up_in_the_database_what_the_rows_hold(site: Site) -> None:
    """Counts, 5xx, averages and percentiles of ``/api/metrics/http`` against the rows
    themselves (percentiles by ``histogram.bin_of``: the database's bins must be
    Python's, on bin edges too); a user sees only their own requests."""
    start = (NOW - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    alice, bob = site.users["alice"][2], site.users["bob"][2]
    # Values on bin edges (powers of two), at the floor and below it, and in between.
    times = [0.0, 0.0005, 0.001, 1.0, 2.0, 3.7, 128.0, 128.5, 250.0, 1024.0, 4096.0]
    rows = [
        {
            "created_at": start + timedelta(minutes=i),
            "endpoint": endpoint,
            "method": method,
            "status_code": 503 if i % 4 == 0 else 200,
            "response_time_ms": ms * (1 + i % 3),
            "user_id": alice if i % 2 else bob,
        }
        for i, ms in enumerate(times * 3)
        for endpoint, method in (("/v1/chat/completions", "POST"), ("/api/conversations", "GET"))
    ]
    outside = {**rows[0], "created_at": start + timedelta(hours=1), "endpoint": "/late"}
    with site.engine.begin() as conn:
        conn.execute(sa.insert(http_metrics), [*rows, outside])

    def expected(user_id: int | None) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            if user_id is None or row["user_id"] == user_id:
                groups.setdefault((row["endpoint"], row["method"]), []).append(row)
        out = []
        for (endpoint, method), found in groups.items():
            values = [r["response_time_ms"] for r in found]
            bins: histogram.Histogram = {}
            for value in values:
                histogram.add(bins, value)
            errors = sum(r["status_code"] >= 500 for r in found)
            out.append(
                {
                    "endpoint": endpoint,
                    "method": method,
                    "requests": len(found),
                    "server_errors": errors,
                    "error_rate": errors / len(found),
                    "latency_ms": {
                        "avg": pytest.approx(sum(values) / len(values)),
                        **{f"p{p}": histogram.percentile(bins, p) for p in (50, 90, 99)},
                    },
                }
            )
        return sorted(out, key=lambda g: (g["endpoint"], g["method"]))

    window = {"since": start.isoformat(), "until": (start + timedelta(hours=1)).isoformat()}
    for key, user_id in ((MASTER, None), (site.users["alice"][1], alice)):
        data = site.ok("/api/metrics/http", key, **window)["data"]
        assert sorted(data, key=lambda g: (g["endpoint"], g["method"])) == expected(user_id)
