"""The limits repository and the limiter on top of it, on SQLite and PostgreSQL.

Request-log rows go in through the exchange writer (``write_batch``), as the server's do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from parley.domain.messages import Message
from parley.domain.times import utc
from parley.domain.usage import Usage
from parley.errors import InvalidRequest, RateLimited
from parley.gateway.limits import Limiter
from parley.server.identity import Identity
from parley.store.limits import LimitStore, minute_of
from parley.store.schema import request_log
from parley.store.users import Users
from tests.store.test_exchanges import attempt, chat, write

# The largest value an Integer column holds on PostgreSQL.
INT_MAX = 2**31 - 1


def _key(engine: sa.Engine, name: str = "lee") -> tuple[int, int]:
    """A new user with one API key: (user id, key id)."""
    users = Users(engine)
    user = users.create_user(email=f"{name}@example.org", username=name, password="pw-long-enough")
    key, _plain = users.create_key(user.id, "k")
    return user.id, key.id


def test_concurrent_puts_of_one_subject_all_succeed_and_leave_one_row(
    migrated_engine: sa.Engine,
) -> None:
    user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    threads = 12
    for _round in range(3):
        for user, key in ((user_id, None), (None, key_id)):
            errors = _at_once(
                threads,
                lambda n, user=user, key=key: store.set_limit(
                    user_id=user, api_key_id=key, values={"requests_per_minute": n + 1}
                ),
            )
            assert errors == []
    listed = store.listing()
    assert len(listed) == 2
    assert {row["requests_per_minute"] for row in listed} <= set(range(1, threads + 1))


def test_setting_limits_changes_only_the_fields_given(migrated_engine: sa.Engine) -> None:
    _user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    store.set_limit(user_id=None, api_key_id=key_id, values={"requests_per_minute": 60})
    # Before: a later set replaced every field, and the rpm left out was no limit any more.
    both = store.set_limit(user_id=None, api_key_id=key_id, values={"tokens_per_minute": 7})
    assert (both.requests_per_minute, both.tokens_per_minute) == (60, 7)
    [stored] = store.all_limits()
    assert stored == both
    # None removes that one limit and keeps the others.
    left = store.set_limit(user_id=None, api_key_id=key_id, values={"requests_per_minute": None})
    assert left.values() == {
        "requests_per_minute": None,
        "tokens_per_minute": 7,
        "usd_per_day": None,
        "usd_per_month": None,
    }
    assert store.all_limits() == [left]
    # Concurrent writers of different fields of one subject both land.
    errors = _at_once(
        2,
        lambda n: store.set_limit(
            user_id=None, api_key_id=key_id, values=[{"usd_per_day": 1.5}, {"usd_per_month": 9}][n]
        ),
    )
    assert errors == []
    [merged] = store.all_limits()
    assert (merged.tokens_per_minute, merged.usd_per_day, merged.usd_per_month) == (7, 1.5, 9)


def test_removing_some_limits_keeps_the_others_and_creates_nothing(
    migrated_engine: sa.Engine,
) -> None:
    user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    assert store.remove_limits(user_id=user_id, api_key_id=None, fields=["usd_per_day"]) is None
    assert store.all_limits() == []
    store.set_limit(
        user_id=None, api_key_id=key_id, values={"requests_per_minute": 5, "usd_per_day": 2}
    )
    left = store.remove_limits(user_id=None, api_key_id=key_id, fields=["requests_per_minute"])
    assert left is not None
    assert (left.requests_per_minute, left.usd_per_day) == (None, 2)
    assert store.all_limits() == [left]


def _at_once(threads: int, action: Callable[[int], object]) -> list[str]:
    """Run ``action(n)`` for n in range(threads), all threads released together; return
    the errors raised."""
    start = threading.Barrier(threads)
    errors: list[str] = []

    def run(n: int) -> None:
        start.wait()
        try:
            action(n)
        except Exception as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"requests_per_minute": INT_MAX + 1}, "requests_per_minute"),
        ({"tokens_per_minute": 2**64}, "tokens_per_minute"),
        ({"tokens_per_minute": 0}, "tokens_per_minute"),
        ({"requests_per_minute": 2.5}, "requests_per_minute"),
        ({"usd_per_day": float("inf")}, "usd_per_day"),
        ({"usd_per_month": float("nan")}, "usd_per_month"),
        ({"usd_per_month": -0.01}, "usd_per_month"),
        ({"usd_per_day": True}, "usd_per_day"),
    ],
)
def test_values_the_columns_cannot_hold_are_refused_before_any_write(
    migrated_engine: sa.Engine, values: dict[str, object], field: str
) -> None:
    _user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    with pytest.raises(InvalidRequest) as refused:
        store.set_limit(user_id=None, api_key_id=key_id, values=values)
    assert refused.value.param == field
    assert store.all_limits() == []
    # The largest value every database holds is taken.
    store.set_limit(user_id=None, api_key_id=key_id, values={field: INT_MAX})
    [stored] = store.all_limits()
    assert stored.values()[field] == INT_MAX


async def test_a_stream_longer_than_a_minute_counts_when_it_finishes(
    migrated_engine: sa.Engine,
) -> None:
    user_id, key_id = _key(migrated_engine)
    now = datetime.now(UTC)
    # Started five minutes ago, finished ten seconds ago, 300 tokens.
    stream = attempt(
        started_at=now - timedelta(minutes=5),
        response_time_ms=290_000.0,
        usage=Usage(prompt_tokens=100, completion_tokens=200, total_tokens=300),
    )
    write(
        migrated_engine,
        chat(
            [Message("user", "tell me a long story")],
            attempts=[stream],
            is_streaming=True,
            user_id=user_id,
            api_key_id=key_id,
        ),
    )
    store = LimitStore(migrated_engine)
    store.set_limit(user_id=None, api_key_id=key_id, values={"tokens_per_minute": 300})
    limiter = Limiter(store, clock=now.timestamp)
    caller = Identity(user_id=user_id, api_key_id=key_id, role="user", via="api_key")
    with pytest.raises(RateLimited) as refused:
        await limiter.check(caller)
    assert "300 tokens per minute" in refused.value.message
    # Free again a minute after the stream finished, not after it started.
    assert 49 <= refused.value.retry_after <= 51

    # A limit above what the stream used lets the next request through.
    store.set_limit(user_id=None, api_key_id=key_id, values={"tokens_per_minute": 301})
    await limiter.reload()
    await limiter.check(caller)

    [(_started, finished)] = _times(migrated_engine)
    assert abs(finished - (now - timedelta(seconds=10))) < timedelta(milliseconds=1)
    assert store.usage(store.all_limits()[0], now).tokens_last_minute == 300


def test_an_attempt_without_a_duration_finishes_when_it_started(
    migrated_engine: sa.Engine,
) -> None:
    started = datetime.now(UTC) - timedelta(seconds=5)
    write(
        migrated_engine,
        chat(
            [Message("user", "hi")], attempts=[attempt(started_at=started, response_time_ms=None)]
        ),
    )
    assert _times(migrated_engine) == [(started, started)]


def _times(engine: sa.Engine) -> list[tuple[datetime, datetime]]:
    """(created_at, finished_at) of every request-log row, in UTC."""
    query = sa.select(request_log.c.created_at, request_log.c.finished_at)
    with engine.connect() as conn:
        return [(utc(a), utc(b)) for a, b in conn.execute(query)]


async def test_a_refused_request_uses_up_no_slot_and_does_not_show_as_used(
    migrated_engine: sa.Engine,
) -> None:
    user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    key_limit = store.set_limit(user_id=None, api_key_id=key_id, values={"requests_per_minute": 2})
    now = datetime.now(UTC).replace(second=10)
    limiter = Limiter(store, clock=now.timestamp)
    caller = Identity(user_id=user_id, api_key_id=key_id, role="user", via="api_key")
    await limiter.check(caller)
    await limiter.check(caller)
    for _refused in range(3):
        with pytest.raises(RateLimited):
            await limiter.check(caller)
    # Before: 5, every refusal counted as a request of the minute.
    assert store.usage(key_limit, now).requests_this_minute == 2

    # Refused by the user's limit: the key's count is not used up either.
    user_limit = store.set_limit(
        user_id=user_id, api_key_id=None, values={"requests_per_minute": 1}
    )
    store.set_limit(user_id=None, api_key_id=key_id, values={"requests_per_minute": 5})
    later = now + timedelta(minutes=1)
    limiter = Limiter(store, clock=later.timestamp)
    await limiter.check(caller)
    with pytest.raises(RateLimited) as refused:
        await limiter.check(caller)
    assert "1 requests per minute for this user" in refused.value.message
    assert store.usage(key_limit, later).requests_this_minute == 1
    assert store.usage(user_limit, later).requests_this_minute == 1


def test_concurrent_requests_get_exactly_the_limit_and_the_count_stops_there(
    migrated_engine: sa.Engine,
) -> None:
    user_id, key_id = _key(migrated_engine)
    store = LimitStore(migrated_engine)
    key_limit = store.set_limit(user_id=None, api_key_id=key_id, values={"requests_per_minute": 5})
    user_limit = store.set_limit(
        user_id=user_id, api_key_id=None, values={"requests_per_minute": 7}
    )
    window = minute_of(datetime.now(UTC))
    taken: list[object] = []
    errors = _at_once(
        12, lambda _n: taken.append(store.take_request([key_limit, user_limit], window))
    )
    assert errors == []
    assert taken.count(None) == 5
    assert all(t == key_limit for t in taken if t is not None)
    assert store.usage(key_limit, window).requests_this_minute == 5
    assert store.usage(user_limit, window).requests_this_minute == 5
