"""Rollups kept by the writer, on SQLite and PostgreSQL: they match the raw rows, survive
retention of those rows, and cover rows recorded before the rollups existed."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.domain import histogram
from parley.domain.exchange import Exchange
from parley.domain.messages import Message
from parley.domain.rollup import DAY, HOUR, MODEL_DAY, MODEL_HOUR, tally_rows
from parley.domain.times import utc
from parley.domain.usage import Usage
from parley.metrics import report
from parley.ops import migrate
from parley.settings import Settings
from parley.store import rollups
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from parley.store.metrics import MetricsStore
from parley.store.schema import request_log
from parley.store.writer import Writer
from tests.store.test_exchanges import attempt, chat, rows, write

MakeSettings = Callable[..., Settings]
NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)


def _traffic(n: int, seed: int) -> list[Exchange]:
    """``n`` exchanges over the last three days, two models, some failures and fallbacks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = NOW - timedelta(minutes=rng.uniform(0, 3 * 24 * 60))
        model = rng.choice(["m-fast", "m-slow"])
        latency = rng.lognormvariate(6 if model == "m-slow" else 4.5, 0.6)
        usage = Usage(prompt_tokens=rng.randint(5, 500), completion_tokens=rng.randint(1, 300))
        usage = Usage(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.prompt_tokens + usage.completion_tokens,
        )
        attempts = []
        if rng.random() < 0.1:
            attempts.append(
                attempt(
                    1,
                    ok=False,
                    started_at=at,
                    model_used=model,
                    response_time_ms=latency / 3,
                    error_type="rate_limit",
                    status_code=429,
                    usage=Usage(),
                )
            )
        attempts.append(
            attempt(
                len(attempts) + 1,
                started_at=at,
                model_used=model,
                response_time_ms=latency,
                time_to_first_token_ms=latency / 4,
                tokens_per_second=rng.uniform(5, 90),
                usage=usage,
                cost_usd=usage.total_tokens * 1e-6,
            )
        )
        out.append(
            chat([Message("user", f"q{i}")], attempts=attempts, api_key_id=rng.choice([None, 1, 2]))
        )
    return out


def test_percentiles_from_rollups_match_the_raw_rows_within_the_bin_error(
    migrated_engine: sa.Engine,
) -> None:
    exchanges = _traffic(600, 1)
    for start in range(0, len(exchanges), 50):  # batches, as the writer commits them
        write(migrated_engine, *exchanges[start : start + 50])
    raw = rows(
        migrated_engine,
        "SELECT model, success, response_time_ms, total_tokens, cost_usd FROM request_log",
    )
    store = MetricsStore(migrated_engine)
    window = store.window(NOW - timedelta(days=4), NOW + timedelta(hours=1), {}).rows
    summary = {e["group"]["model"]: e for e in report.summary(window, ["model"])}
    for model in ("m-fast", "m-slow"):
        mine = [r for r in raw if r["model"] == model]
        got = summary[model]
        assert got["requests"] == len(mine)
        assert got["errors"] == sum(1 for r in mine if not r["success"])
        assert got["total_tokens"] == sum(r["total_tokens"] or 0 for r in mine)
        assert got["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in mine))
        latencies = [r["response_time_ms"] for r in mine]
        for p in (50, 90, 99):
            exact = histogram.exact_percentile(latencies, p)
            assert exact is not None
            estimate = got["latency_ms"][f"p{p}"]
            assert abs(estimate - exact) / exact <= histogram.RELATIVE_ERROR + 1e-9


def test_hour_and_day_rollups_agree_and_filters_apply(migrated_engine: sa.Engine) -> None:
    write(migrated_engine, *_traffic(300, 2))
    store = MetricsStore(migrated_engine)
    start, end = NOW - timedelta(days=4), NOW + timedelta(hours=1)
    hours = store.period("hour", start, end, {})
    days = store.period("day", start - timedelta(days=1), end + timedelta(days=1), {})
    attempts = len(rows(migrated_engine, "SELECT id FROM request_log"))
    assert attempts > 300  # some exchanges fell back: one row per attempt
    assert report.summary(hours)[0]["requests"] == report.summary(days)[0]["requests"] == attempts
    keyed = report.summary(store.window(start, end, {"api_key_id": 1}).rows)[0]
    assert keyed["requests"] == len(
        rows(migrated_engine, "SELECT id FROM request_log WHERE api_key_id = 1")
    )


def test_the_writer_s_rollups_over_many_commits_match_the_raw_rows(
    migrated_engine: sa.Engine,
) -> None:
    """The writer merges each commit into the rollup rows it wrote last (cached on
    SQLite): after ~100 commits of one to five exchanges, every rollup row, of every
    period, holds exactly what its raw rows add up to."""
    exchanges = _traffic(300, 4)
    writer = Writer(migrated_engine)
    writer.start()

    async def commit_in_small_batches() -> None:
        rng = random.Random(5)
        at = 0
        while at < len(exchanges):
            size = rng.randint(1, 5)
            await asyncio.gather(*(writer.submit(e) for e in exchanges[at : at + size]))
            at += size

    try:
        asyncio.run(commit_in_small_batches())
    finally:
        writer.stop(30)
    assert writer.batches >= 60
    _assert_rollups_match_the_raw_rows(migrated_engine)


def test_a_bounded_rollup_cache_starts_over_and_stays_exact(migrated_engine: sa.Engine) -> None:
    # Eight rows at most: it starts over every few commits (a long-running server's cache
    # gains rows each hour and day), and the next commit reads what it needs again.
    cache = rollups.RollupCache(max_rows=8)
    exchanges = _traffic(120, 6)
    kept = []
    with writer_connection(migrated_engine) as conn:
        for at in range(0, len(exchanges), 3):
            with conn.begin():
                write_batch(conn, exchanges[at : at + 3], cache)
            batch_rows = len(cache._pending or {})
            cache.settle()
            # One batch's own rows may pass the bound, nothing else.
            assert len(cache._rows) <= max(8, batch_rows)
            kept.append(len(cache._rows))
    if migrated_engine.dialect.name == "sqlite":
        assert max(kept) > 0  # the cache was used (PostgreSQL always reads)
    _assert_rollups_match_the_raw_rows(migrated_engine)


def _assert_rollups_match_the_raw_rows(migrated_engine: sa.Engine) -> None:
    with migrated_engine.connect() as conn:
        raw = [dict(row._mapping) for row in conn.execute(sa.select(request_log))]
        for row in raw:
            row["created_at"] = utc(row["created_at"])
        expected = {
            (period, start, dims): tally for (period, start, dims), tally in tally_rows(raw).items()
        }
        stored = {
            (period, start, dims): tally
            for period in (HOUR, DAY, MODEL_HOUR, MODEL_DAY)
            for start, dims, tally in rollups.rows_between(
                conn, period, NOW - timedelta(days=5), NOW + timedelta(days=1)
            )
        }
    assert stored.keys() == expected.keys()
    for key, tally in expected.items():
        got = stored[key]
        assert (got.requests, got.total_tokens, got.priced) == (
            tally.requests,
            tally.total_tokens,
            tally.priced,
        ), key
        assert got.cost_usd == pytest.approx(tally.cost_usd)
        assert got.latency_ms_sum == pytest.approx(tally.latency_ms_sum)
        assert got.latency_ms == tally.latency_ms
        assert (got.ttft_ms, got.tps) == (tally.ttft_ms, tally.tps)


def test_deleting_raw_rows_leaves_rollup_totals_unchanged(migrated_engine: sa.Engine) -> None:
    write(migrated_engine, *_traffic(200, 3))
    store = MetricsStore(migrated_engine)
    start, end = NOW - timedelta(days=4), NOW + timedelta(hours=1)
    before = report.summary(store.window(start, end, {}).rows, ["model"])
    with migrated_engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM request_log")
    assert report.summary(store.window(start, end, {}).rows, ["model"]) == before


def test_upgrading_tallies_rows_recorded_before_rollups_existed(
    tmp_path: Path, make_settings: MakeSettings, database_url: str
) -> None:
    settings = make_settings(tmp_path, database_url)
    migrate.upgrade(settings, "0002")
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            for i, (ok, latency) in enumerate([(True, 120.0), (True, 80.0), (False, 30.0)]):
                conn.execute(
                    sa.text(
                        "INSERT INTO request_log (public_id, chain_id, attempt, created_at, "
                        "success, response_time_ms, endpoint, client_protocol, provider, model, "
                        "model_requested, is_streaming, message_count, total_tokens, cost_usd, "
                        "error_type) VALUES (:p, :c, 1, :at, :ok, :ms, 'chat', 'openai', 'up', "
                        "'m', 'm', false, 1, 10, 0.5, :error)"
                    ).bindparams(sa.bindparam("at", type_=sa.DateTime(timezone=True))),
                    {
                        "p": f"00000000-0000-0000-0000-00000000000{i}",
                        "c": f"00000000-0000-0000-0000-00000000001{i}",
                        "at": NOW - timedelta(hours=i),
                        "ok": ok,
                        "ms": latency,
                        "error": None if ok else "server_error",
                    },
                )
        migrate.upgrade(settings)
        got = report.summary(
            MetricsStore(engine).window(NOW - timedelta(days=1), NOW + timedelta(hours=1), {}).rows
        )[0]
        assert (got["requests"], got["errors"], got["total_tokens"]) == (3, 1, 30)
        assert got["errors_by_type"] == {"server_error": 1}
        assert got["cost_usd"] == pytest.approx(1.5)
    finally:
        engine.dispose()


def test_rows_between_reads_back_every_dimension_and_value_as_tallied(
    migrated_engine: sa.Engine,
) -> None:
    # Every field distinct, so a column read into the wrong place cannot go unseen.
    hour = NOW.replace(minute=0)
    logged = [
        {
            "created_at": hour + timedelta(minutes=minute),
            "user_id": 7,
            "api_key_id": 11,
            "provider": "openai",
            "model": "m-one",
            "origin": "10.0.0.3",
            "success": success,
            "error_type": None if success else "timeout",
            "prompt_tokens": 101 + minute,
            "completion_tokens": 23,
            "total_tokens": 124 + minute,
            "cost_usd": 0.25 if success else None,
            "response_time_ms": 640.5,
            "time_to_first_token_ms": 80.25 if success else None,
            "tokens_per_second": 35.5 if success else None,
        }
        for minute, success in ((1, True), (2, True), (3, False))
    ]
    with writer_connection(migrated_engine) as conn, conn.begin():
        rollups.add(conn, logged)
    expected = tally_rows(logged)
    with migrated_engine.connect() as conn:
        stored = {
            (period, start, dims): tally
            for period in (HOUR, DAY, MODEL_HOUR, MODEL_DAY)
            for start, dims, tally in rollups.rows_between(
                conn, period, hour - timedelta(days=1), hour + timedelta(days=1)
            )
        }
    assert stored == expected
    assert all(start.tzinfo is UTC for _, start, _ in stored)
