"""Limits held across two parley processes on one database (PostgreSQL and one SQLite
file): a burst split over both gets exactly the allowed number of answers, and a spend
budget spent through one process stops the key in the other."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import free_port, serve_subprocess
from tests.server.crash_support import server_env
from tests.server.test_auth import MASTER, PASSWORD, bearer

LIMIT = 7
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
def two_servers(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> Iterator[tuple[str, str]]:
    env = server_env(tmp_path, database_url, upstream.base_url, PARLEY_MASTER_KEY=MASTER)
    with (tmp_path / "parley.toml").open("a") as config:
        config.write(PRICING)
    first, second = free_port(), free_port()
    with (
        serve_subprocess(tmp_path, env, first, "a.log"),
        serve_subprocess(tmp_path, env, second, "b.log"),
    ):
        yield f"http://127.0.0.1:{first}", f"http://127.0.0.1:{second}"


def _key(root: str) -> dict[str, str]:
    user = httpx.post(
        f"{root}/api/admin/users",
        json={"email": "h@example.org", "username": "hana", "password": PASSWORD},
        headers=bearer(MASTER),
    )
    assert user.status_code == 201, user.text
    with httpx.Client(base_url=root) as browser:
        login = browser.post("/api/auth/login", json={"login": "hana", "password": PASSWORD})
        key = browser.post(
            "/api/keys", json={"name": "k"}, headers={"X-CSRF-Token": login.json()["csrf_token"]}
        )
    assert key.status_code == 201, key.text
    return dict(key.json())


def _ask(root: str, key: str) -> int:
    reply = httpx.post(
        f"{root}/v1/chat/completions",
        json={"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=bearer(key),
        timeout=30,
    )
    return reply.status_code


@pytest.mark.slow
def test_a_burst_over_two_processes_gets_exactly_the_limit(two_servers: tuple[str, str]) -> None:
    a, b = two_servers
    key = _key(a)
    if datetime.now(UTC).second > 45:  # the burst must fall inside one minute
        time.sleep(61 - datetime.now(UTC).second)
    put = httpx.put(
        f"{a}/api/admin/limits/keys/{key['id']}",
        json={"requests_per_minute": LIMIT},
        headers=bearer(MASTER),
    )
    assert put.status_code == 200, put.text
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: _ask((a, b)[i % 2], key["key"]), range(4 * LIMIT)))
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 3 * LIMIT


@pytest.mark.slow
def test_a_budget_spent_through_one_process_stops_the_key_in_the_other(
    two_servers: tuple[str, str],
) -> None:
    a, b = two_servers
    key = _key(a)
    put = httpx.put(
        f"{a}/api/admin/limits/keys/{key['id']}", json={"usd_per_day": 3}, headers=bearer(MASTER)
    )
    assert put.status_code == 200
    assert _ask(b, key["key"]) == 200  # b learns of the limit on its first request
    assert _ask(a, key["key"]) == 429  # $1 a token: the first answer spent the budget
    assert _ask(b, key["key"]) == 429
