"""The metrics API, Prometheus and limits end to end, on SQLite and PostgreSQL.

A real parley with a master key runs in front of the fake OpenAI upstream; traffic goes
through the official openai SDK with users' API keys, and the reports are read over HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from parley.domain import histogram
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import (
    ParleyServer,
    leave_after_first_chunk,
    rows,
    settings_for,
    wait_for,
    write_config,
)
from tests.server.test_auth import MASTER, Browser, bearer, make_user

PRICING = """
[pricing."up/gpt-4o-mini"]
input = 1000000.0
output = 1000000.0
"""


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["gpt-4o-mini", "other"],
            }
        ],
        extra=PRICING,
    )
    running = ParleyServer(settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER)).start()
    try:
        yield running
    finally:
        running.stop()


def _user_with_key(server: ParleyServer, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    user = make_user(server, name)
    browser = Browser(server, f"{name}@example.org")
    try:
        return user, browser.new_key()
    finally:
        browser.close()


def _chat(server: ParleyServer, key: str, model: str = "up/gpt-4o-mini", n: int = 1) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    for i in range(n):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"hello number {i}"}]
        )


def _get(server: ParleyServer, path: str, key: str = MASTER, **params: Any) -> Any:
    reply = httpx.get(f"{server.root}{path}", params=params, headers=bearer(key), timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_summary_timeseries_and_request_log_match_the_traffic(
    server: ParleyServer, database_url: str
) -> None:
    alice, alice_key = _user_with_key(server, "alice")
    _bob, bob_key = _user_with_key(server, "bob")
    _chat(server, alice_key["key"], n=3)
    _chat(server, alice_key["key"], model="up/other", n=2)
    _chat(server, bob_key["key"], n=4)

    summary = _get(server, "/api/metrics/summary", group_by="model,user")["data"]
    by = {(e["group"]["model"], e["group"]["user"]): e for e in summary}
    assert by[("gpt-4o-mini", alice["id"])]["requests"] == 3
    assert by[("other", alice["id"])]["requests"] == 2
    assert len(by) == 3 and sum(e["requests"] for e in summary) == 9
    raw = rows(database_url, "SELECT response_time_ms, total_tokens FROM request_log")
    total = _get(server, "/api/metrics/summary")["data"][0]
    assert total["total_tokens"] == sum(r["total_tokens"] for r in raw)
    exact = histogram.exact_percentile([r["response_time_ms"] for r in raw], 90)
    assert exact is not None
    assert abs(total["latency_ms"]["p90"] - exact) / exact <= histogram.RELATIVE_ERROR + 1e-9
    assert total["cost_usd"] > 0 and total["error_rate"] == 0

    # Users see their own traffic only, whatever they ask for.
    mine = _get(server, "/api/metrics/summary", key=bob_key["key"], group_by="user")["data"]
    assert [(e["group"]["user"], e["requests"]) for e in mine] == [(mine[0]["group"]["user"], 4)]

    series = _get(server, "/api/metrics/timeseries", window="3h", bucket="1h")["data"]
    assert len(series) in (3, 4) and sum(b["groups"][0]["requests"] for b in series) == 9
    fine = _get(server, "/api/metrics/timeseries", window="30m", bucket="5m")["data"]
    assert sum(b["groups"][0]["requests"] for b in fine) == 9

    first = _get(server, "/api/metrics/requests", limit=5)
    second = _get(server, "/api/metrics/requests", limit=5, cursor=first["next_cursor"])
    ids = [r["id"] for r in first["data"] + second["data"]]
    assert len(ids) == len(set(ids)) == 9 and second["next_cursor"] is None
    # The listing takes a window as the reports do: the traffic is minutes old.
    assert len(_get(server, "/api/metrics/requests", window="1h")["data"]) == 9
    assert (
        _get(server, "/api/metrics/requests", window="1s", until="2000-01-01T00:00:00Z")["data"]
        == []
    )
    assert {r["user"] for r in first["data"] + second["data"]} >= {alice["id"]}
    for r in first["data"]:  # an attempt ends its response time after it started
        started, finished = (datetime.fromisoformat(r[f]) for f in ("created_at", "finished_at"))
        assert abs((finished - started).total_seconds() * 1000 - r["response_time_ms"]) < 1


def test_bad_metrics_queries_get_openai_errors(server: ParleyServer) -> None:
    for params in ({"group_by": "password"}, {"window": "forever"}, {"since": "yesterday"}):
        for report in ("summary", "requests"):
            if report == "requests" and "group_by" in params:
                continue  # the listing has no grouping
            reply = httpx.get(
                f"{server.root}/api/metrics/{report}", params=params, headers=bearer(MASTER)
            )
            assert reply.status_code == 400, (report, params)
            assert reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.get(
        f"{server.root}/api/metrics/timeseries",
        params={"window": "2d", "bucket": "5m"},
        headers=bearer(MASTER),
    )
    assert reply.status_code == 400 and "6 hours" in reply.json()["error"]["message"]
    # Each once gave a 500: an overflow in the date arithmetic, a cursor past PostgreSQL's
    # INTEGER, or a NUL that PostgreSQL text cannot hold.
    for report, params, param in (
        ("summary", {"window": "99999999d"}, "window"),
        ("http", {"window": "99999999d"}, "window"),
        ("anomalies", {"window": "99999999d"}, "window"),
        ("requests", {"window": "99999999d"}, "window"),
        ("summary", {"window": "3661d"}, "window"),
        ("summary", {"window": "9" * 5000 + "d"}, "window"),
        ("timeseries", {"bucket": "99999999999999d"}, "bucket"),
        ("summary", {"until": "9999-12-31T23:59:59Z"}, "until"),
        ("summary", {"until": "9999-12-31T23:59:59-01:00"}, "until"),
        ("anomalies", {"since": "0001-01-01T00:00:00Z"}, "since"),
        ("requests", {"until": "9999-12-31T23:59:59Z"}, "until"),
        ("requests", {"cursor": "99999999999999999999999"}, "cursor"),
        ("requests", {"cursor": str(2**31)}, "cursor"),
        ("requests", {"cursor": "-5"}, "cursor"),
        ("summary", {"model": "\x00"}, "model"),
        ("summary", {"error_type": "x\x00y"}, "error_type"),
        ("requests", {"model": "\x00"}, "model"),
        ("timeseries", {"provider": "a,b\x00"}, "provider"),
    ):
        reply = httpx.get(
            f"{server.root}/api/metrics/{report}", params=params, headers=bearer(MASTER)
        )
        assert reply.status_code == 400, (report, params, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    # The limits themselves are accepted.
    for report, params in (
        ("summary", {"window": "3660d"}),
        ("timeseries", {"window": "3660d", "bucket": "3660d"}),
        ("summary", {"until": "9998-12-31T23:59:59Z"}),
        ("anomalies", {"since": "1000-01-01T00:00:00Z", "until": "1000-01-02T00:00:00Z"}),
    ):
        reply = httpx.get(
            f"{server.root}/api/metrics/{report}", params=params, headers=bearer(MASTER)
        )
        assert reply.status_code == 200, (report, params, reply.text)


def test_prometheus_counts_what_was_recorded(server: ParleyServer) -> None:
    _user, key = _user_with_key(server, "carol")
    _chat(server, key["key"], n=3)
    reply = httpx.get(f"{server.root}/metrics", headers=bearer(MASTER))
    assert reply.status_code == 200
    text = reply.text
    assert (
        'parley_upstream_requests_total{model="gpt-4o-mini",outcome="success",provider="up"} 3.0'
        in text
    )
    assert 'parley_upstream_duration_seconds_count{model="gpt-4o-mini",provider="up"} 3.0' in text
    assert "parley_http_request_duration_seconds" in text
    assert "carol" not in text and key["key"] not in text
    assert httpx.get(f"{server.root}/metrics", headers=bearer(key["key"])).status_code == 404


def test_a_request_limit_refuses_with_retry_after_and_usage_shows_it(
    server: ParleyServer,
) -> None:
    _user, key = _user_with_key(server, "dave")
    if datetime.now(UTC).second > 50:  # keep the burst inside one minute
        time.sleep(61 - datetime.now(UTC).second)
    reply = httpx.put(
        f"{server.root}/api/admin/limits/keys/{key['id']}",
        json={"requests_per_minute": 3},
        headers=bearer(MASTER),
    )
    assert reply.status_code == 200, reply.text
    _chat(server, key["key"], n=3)
    client = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="up/gpt-4o-mini", messages=[{"role": "user", "content": "one more"}]
        )
    assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 60
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    usage = _get(server, "/api/me/usage", key=key["key"])["data"]
    assert usage[0]["limits"]["requests_per_minute"] == 3
    # The refused request is not counted: it used up nothing.
    assert usage[0]["usage"]["requests_this_minute"] == 3
    listed = _get(server, "/api/admin/limits")["data"]
    assert listed == [
        {
            "user": None,
            "api_key": key["id"],
            "requests_per_minute": 3,
            "tokens_per_minute": None,
            "usd_per_day": None,
            "usd_per_month": None,
        }
    ]


def test_a_spend_budget_stops_the_key_once_spent(server: ParleyServer) -> None:
    key, refused = _spend(server, "erin", {"usd_per_day": 5})
    assert refused.body["code"] == "insufficient_quota"  # type: ignore[index]
    bad = httpx.put(
        f"{server.root}/api/admin/limits/keys/{key['id']}",
        json={"usd_per_day": -1},
        headers=bearer(MASTER),
    )
    assert bad.status_code == 400


def test_of_two_spent_budgets_retry_after_waits_for_the_later(server: ParleyServer) -> None:
    _key, refused = _spend(server, "fay", {"usd_per_day": 5, "usd_per_month": 5})
    # Both are spent: the month's budget frees up last (at the next month, UTC).
    now = datetime.now(UTC)
    next_month = (now.replace(day=1) + timedelta(days=32)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    retry_after = int(refused.response.headers["Retry-After"])
    assert abs(retry_after - (next_month - now).total_seconds()) < 60
    assert "monthly budget" in refused.body["message"]  # type: ignore[index]


def _spend(
    server: ParleyServer, name: str, budgets: dict[str, float]
) -> tuple[dict[str, Any], openai.RateLimitError]:
    """A key of a new user with ``budgets``, one answer that spends them (the test price is
    $1 per token: one answer costs far more), and the refusal of the next request."""
    _user, key = _user_with_key(server, name)
    reply = httpx.put(
        f"{server.root}/api/admin/limits/keys/{key['id']}", json=budgets, headers=bearer(MASTER)
    )
    assert reply.status_code == 200
    _chat(server, key["key"])
    client = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="up/gpt-4o-mini", messages=[{"role": "user", "content": "again"}]
        )
    return key, refused.value


def test_a_stream_cut_off_before_its_usage_counts_against_the_token_limit(
    server: ParleyServer, database_url: str
) -> None:
    _user, key = _user_with_key(server, "gus")
    reply = httpx.put(
        f"{server.root}/api/admin/limits/keys/{key['id']}",
        json={"tokens_per_minute": 5},
        headers=bearer(MASTER),
    )
    assert reply.status_code == 200
    # The client leaves after the first chunk: the upstream never reports the usage.
    leave_after_first_chunk(server, "one two three four five six", bearer(key["key"]))
    [req] = wait_for(lambda: rows(database_url, "SELECT * FROM request_log"))
    assert req["error_type"] == "cancelled" and req["usage_estimated"]
    # ~4 characters a token: 27 characters of prompt, and what was streamed.
    assert req["prompt_tokens"] == 7 and req["completion_tokens"] >= 1
    assert req["total_tokens"] == req["prompt_tokens"] + req["completion_tokens"]
    client = openai.OpenAI(base_url=server.base_url, api_key=key["key"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="up/gpt-4o-mini", messages=[{"role": "user", "content": "again"}]
        )
    assert "tokens per minute" in refused.value.body["message"]  # type: ignore[index]
    assert refused.value.body["type"] == "tokens"  # type: ignore[index]  # as OpenAI types it


def test_limits_the_database_cannot_hold_get_400_not_500(server: ParleyServer) -> None:
    _user, key = _user_with_key(server, "hal")
    path = f"{server.root}/api/admin/limits/keys/{key['id']}"
    for field, value in (
        ("requests_per_minute", 2**31),
        ("tokens_per_minute", 2**63),
        ("tokens_per_minute", 2**64),
        ("requests_per_minute", 0),
        ("usd_per_day", -1),
    ):
        body = f'{{"{field}": {value}}}'.encode()
        reply = httpx.put(path, content=body, headers=bearer(MASTER))
        assert reply.status_code == 400, (field, value, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == field
        assert field in error["message"]
    assert _get(server, "/api/admin/limits")["data"] == []
    # The largest values every database holds are taken.
    reply = httpx.put(
        path,
        json={"requests_per_minute": 2**31 - 1, "tokens_per_minute": 2**31 - 1},
        headers=bearer(MASTER),
    )
    assert reply.status_code == 200, reply.text
    [listed] = _get(server, "/api/admin/limits")["data"]
    assert listed["requests_per_minute"] == listed["tokens_per_minute"] == 2**31 - 1


def test_a_limits_put_changes_only_the_fields_it_names(server: ParleyServer) -> None:
    _user, key = _user_with_key(server, "ivy")
    path = f"{server.root}/api/admin/limits/keys/{key['id']}"

    def put(body: dict[str, Any]) -> dict[str, Any]:
        reply = httpx.put(path, json=body, headers=bearer(MASTER))
        assert reply.status_code == 200, reply.text
        answer: dict[str, Any] = reply.json()
        return answer

    put({"requests_per_minute": 60})
    # Before: the second PUT replaced the first, and the rpm was gone.
    answer = put({"tokens_per_minute": 1000})
    assert (answer["requests_per_minute"], answer["tokens_per_minute"]) == (60, 1000)
    answer = put({"requests_per_minute": None, "usd_per_day": 3})
    assert answer == {
        "kind": "keys",
        "id": key["id"],
        "requests_per_minute": None,
        "tokens_per_minute": 1000,
        "usd_per_day": 3,
        "usd_per_month": None,
    }
    [listed] = _get(server, "/api/admin/limits")["data"]
    assert {k: v for k, v in listed.items() if k not in ("user", "api_key")} == {
        k: v for k, v in answer.items() if k not in ("kind", "id")
    }
    usage = _get(server, "/api/me/usage", key=key["key"])["data"]
    assert usage[0]["limits"]["tokens_per_minute"] == 1000
