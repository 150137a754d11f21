"""Windows that start and end inside an hour count exactly their requests, on SQLite and
PostgreSQL: whole hours from the rollups, the edges from the raw log in SQL, the shorter
side of each edge hour read, rounded out only where retention pruned the raw rows.

Rows are written through the store's batch writer (request log and rollups in one
transaction, as the server commits them); every report is checked against the raw rows
of the window, read back from the database.
"""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from parley.domain import histogram
from parley.domain.exchange import Exchange
from parley.domain.messages import Message
from parley.domain.rollup import Tally
from parley.domain.times import utc
from parley.domain.usage import Usage
from parley.metrics import report
from parley.store import edges
from parley.store import engine as engine_module
from parley.store.metrics import MetricsStore
from parley.store.schema import request_log
from tests.store.test_exchanges import attempt, chat, write

# Traffic over four hours from BASE (whole hour), in the past so nothing is "now".
BASE = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
MINUTE = timedelta(minutes=1)
# Values on and around the histogram's bin edges, where SQL's and Python's floor could part.
EDGY = [
    2.0 ** (k / 8) * f
    for k in range(40, 100, 7)
    for f in (1.0, 1 - 1e-15, 1 + 1e-15, 1 - 2e-10, 1 + 2e-10)
] + [128.0, 1024.0, 0.001, 0.0, 16.0, 2.0**0.5]


def _traffic(seed: int, start: datetime = BASE, hours: int = 4, n: int = 480) -> list[Exchange]:
    """``n`` exchanges spread over ``hours`` from ``start``: two models, three users with
    keys and origins, failures of two kinds, latencies on the bins' edges too."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = start + timedelta(seconds=rng.uniform(0, hours * 3600))
        model = rng.choice(["m-a", "m-b"])
        user = rng.choice([1, 2, 3])
        ok = rng.random() > 0.15
        latency = rng.choice(EDGY) if i % 4 == 0 else rng.lognormvariate(6, 0.8)
        usage = Usage(rng.randint(1, 400), rng.randint(1, 200) if ok else 0)
        usage = Usage(usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens * 2)
        one = attempt(
            ok=ok,
            started_at=at,
            model_used=model,
            response_time_ms=latency,
            time_to_first_token_ms=latency / 4 if ok else None,
            tokens_per_second=rng.choice(EDGY) if ok else None,
            usage=usage,
            cost_usd=None if i % 7 == 0 else usage.prompt_tokens * 1e-6,
            error_type=None if ok else rng.choice(["timeout", "rate_limit"]),
        )
        out.append(
            chat(
                [Message("user", f"q{seed} {i}")],
                attempts=[one],
                user_id=user,
                api_key_id=10 + user,
                origin=f"10.0.0.{user}",
            )
        )
    return out


def _fill(engine: sa.Engine, exchanges: Sequence[Exchange]) -> None:
    for at in range(0, len(exchanges), 60):  # batches, as the writer commits them
        write(engine, *exchanges[at : at + 60])


def _raw(engine: sa.Engine, start: datetime, end: datetime, **match: Any) -> list[dict[str, Any]]:
    query = sa.select(request_log).where(
        request_log.c.created_at >= start, request_log.c.created_at < end
    )
    for name, value in match.items():
        query = query.where(request_log.c[name] == value)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def _expected(raw: list[dict[str, Any]], group_by: Sequence[str]) -> dict[tuple[Any, ...], Any]:
    """The summary of ``raw`` computed in Python, one row at a time, per group."""
    groups: dict[tuple[Any, ...], tuple[Tally, dict[str, int]]] = {}
    for row in raw:
        key = tuple(row[name] for name in group_by)
        tally, errors = groups.setdefault(key, (Tally(), {}))
        tally.add_attempt(row)
        if not row["success"]:
            errors[row["error_type"]] = errors.get(row["error_type"], 0) + 1
    return groups


def _check(got: list[dict[str, Any]], raw: list[dict[str, Any]], group_by: Sequence[str]) -> None:
    expected = _expected(raw, group_by)
    by_group = {tuple(e["group"][name] for name in group_by): e for e in got}
    assert set(by_group) == set(expected) or (not raw and not group_by)
    for key, (tally, errors) in expected.items():
        entry = by_group[key]
        assert entry["requests"] == tally.requests, key
        assert entry["errors_by_type"] == dict(sorted(errors.items())), key
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert entry[name] == getattr(tally, name), (key, name)
        assert entry["priced_requests"] == tally.priced
        cost = pytest.approx(tally.cost_usd, abs=1e-12) if tally.priced else None
        assert entry["cost_usd"] == cost, key
        for field, hist, total in (
            ("latency_ms", tally.latency_ms, tally.latency_ms_sum),
            ("time_to_first_token_ms", tally.ttft_ms, tally.ttft_ms_sum),
            ("tokens_per_second", tally.tps, tally.tps_sum),
        ):
            stats = entry[field]
            assert stats["count"] == histogram.total(hist), (key, field)
            if stats["count"]:
                assert stats["avg"] == pytest.approx(total / stats["count"], rel=1e-9)
            for p in report.PERCENTILES:
                # The same bins as Python's: the same percentiles, not merely close ones.
                assert stats[f"p{p}"] == histogram.percentile(hist, p), (key, field, p)
        values = [r["response_time_ms"] for r in raw if tuple(r[n] for n in group_by) == key]
        for p in report.PERCENTILES:
            exact = histogram.exact_percentile(values, p)
            estimate = entry["latency_ms"][f"p{p}"]
            assert exact is not None and estimate is not None
            if exact > histogram.FLOOR:
                assert abs(estimate - exact) / exact <= histogram.RELATIVE_ERROR + 1e-9


def _summary(
    store: MetricsStore,
    start: datetime,
    end: datetime,
    filters: dict[str, Any] | None = None,
    group_by: Sequence[str] = (),
) -> list[dict[str, Any]]:
    counted = store.window(start, end, filters or {}, group_by)
    assert (counted.start, counted.end) == (start, end)
    return report.summary(counted.rows, group_by)


def _plan(engine: sa.Engine, start: datetime, end: datetime) -> edges.Plan:
    with edges.snapshot(engine) as conn:
        span = edges.raw_span(conn)
        return edges.plan(start, end, span, lambda h: edges.complete(conn, h, span))


# (start, end) as minutes from BASE, and how each edge hour is read: "raw" (the rows
# inside the window) or "net" (the hour's rollup less the rows outside it).
WINDOWS = [
    ((10, 200), ("net", "raw")),  # starts 10 min in, ends 20 min into its last hour
    ((50, 230), ("raw", "net")),  # starts 10 min before an hour, ends 50 min in
    ((35, 95), ("raw", "net")),
    ((20, 60 * 3 + 40), ("net", "net")),
    ((125, 130), ("raw",)),  # inside one hour: five minutes of it
    ((62, 118), ("net",)),  # inside one hour: all but its first and last two minutes
]


@pytest.mark.parametrize(("minutes", "sides"), WINDOWS)
def test_a_window_inside_hours_counts_exactly_its_rows(
    migrated_engine: sa.Engine, minutes: tuple[int, int], sides: tuple[str, ...]
) -> None:
    _fill(migrated_engine, _traffic(1))
    start, end = BASE + minutes[0] * MINUTE, BASE + minutes[1] * MINUTE
    chosen = _plan(migrated_engine, start, end)
    read = tuple(
        "net" if hour in chosen.net_hours else "raw"
        for hour in sorted({edges.floor_hour(start), edges.floor_hour(end)})
    )
    assert read == sides
    raw = _raw(migrated_engine, start, end)
    assert raw  # the window holds traffic
    store = MetricsStore(migrated_engine)
    for group_by in ((), ("model",), ("model", "user_id", "success")):
        _check(_summary(store, start, end, group_by=group_by), raw, group_by)
    # Rounded out to whole hours (before), the window counted many more requests.
    assert len(raw) < len(_raw(migrated_engine, edges.floor_hour(start), edges.ceil_hour(end)))


def test_filters_and_groupings_apply_to_the_edges_as_to_the_rollups(
    migrated_engine: sa.Engine,
) -> None:
    _fill(migrated_engine, _traffic(2))
    store = MetricsStore(migrated_engine)
    start, end = BASE + 13 * MINUTE, BASE + 140 * MINUTE
    # The first hour's rollup less 13 minutes; the last hour's first 20 minutes.
    assert _plan(migrated_engine, start, end).pieces == (
        (BASE, start, -1),
        (BASE + timedelta(hours=2), end, 1),
    )
    for filters, match, group_by in (
        ({"model": "m-b"}, {"model": "m-b"}, ("provider",)),
        ({"user_id": 2}, {"user_id": 2}, ("model", "api_key_id")),
        ({"api_key_id": 13}, {"api_key_id": 13}, ("origin",)),
        ({"success": False}, {"success": False}, ("error_type",)),
        ({"error_type": "timeout", "user_id": 1}, {"error_type": "timeout", "user_id": 1}, ()),
    ):
        raw = _raw(migrated_engine, start, end, **match)
        got = _summary(store, start, end, filters, group_by)
        _check(got, raw, group_by)
    # A list means any of.
    raw = [r for r in _raw(migrated_engine, start, end) if r["user_id"] in (1, 3)]
    _check(_summary(store, start, end, {"user_id": [1, 3]}, ("user_id",)), raw, ("user_id",))


def test_a_window_of_whole_days_and_hours_reads_no_raw_rows_and_edges_read_the_shorter_side(
    migrated_engine: sa.Engine,
) -> None:
    _fill(migrated_engine, _traffic(3, start=BASE - timedelta(days=1), hours=30, n=300))
    aligned = edges.plan(BASE - timedelta(days=1), BASE + timedelta(hours=3), None, _never)
    assert aligned.pieces == () and not aligned.net_hours
    # After the newest row nothing is stored: the hour a "last N days" window ends in is
    # read as its rollup less nothing, however little of it the window covers.
    with edges.snapshot(migrated_engine) as conn:
        span = edges.raw_span(conn)
    assert span is not None
    end = span[1] + timedelta(milliseconds=1)
    assert edges.floor_hour(end) != end
    start = end - timedelta(days=1)
    chosen = _plan(migrated_engine, start, end)
    assert edges.floor_hour(end) in chosen.net_hours
    assert (end, edges.ceil_hour(end), -1) in chosen.pieces
    _check(
        _summary(MetricsStore(migrated_engine), start, end), _raw(migrated_engine, start, end), ()
    )


def test_an_edge_hour_read_less_its_outside_rows_at_midnight_is_not_taken_from_a_day(
    migrated_engine: sa.Engine,
) -> None:
    midnight = BASE.replace(hour=0) - timedelta(days=1)
    _fill(migrated_engine, _traffic(5, start=midnight - timedelta(hours=2), hours=52, n=600))
    # Starting ten minutes after midnight and ending ten before: both edge hours are read
    # as their rollup less ten minutes, and their days must not count them whole.
    start, end = midnight + 10 * MINUTE, midnight + timedelta(days=2) - 10 * MINUTE
    chosen = _plan(migrated_engine, start, end)
    assert chosen.net_hours == {midnight, end.replace(minute=0)}
    raw = _raw(migrated_engine, start, end)
    store = MetricsStore(migrated_engine)
    for group_by in ((), ("model",), ("user_id",)):
        _check(_summary(store, start, end, group_by=group_by), raw, group_by)


def test_days_a_window_covers_in_part_are_read_by_their_shorter_side(
    migrated_engine: sa.Engine,
) -> None:
    midnight = BASE.replace(hour=0) - timedelta(days=3)
    _fill(migrated_engine, _traffic(6, start=midnight - timedelta(hours=2), hours=100, n=700))
    store = MetricsStore(migrated_engine)
    day = timedelta(days=1)
    for first, last, net in (
        # 03:10 to 20:50 two days later: each end day less its three hours outside.
        (3 * 60 + 10, 2 * 24 * 60 + 20 * 60 + 50, {midnight, midnight + 2 * day}),
        # 20:10 to 04:50 two days later: the hours inside each end day.
        (20 * 60 + 10, 2 * 24 * 60 + 4 * 60 + 50, set()),
        # Inside one day: all but its first and last two hours, or just three of them.
        (2 * 60 + 30, 21 * 60 + 45, {midnight}),
        (9 * 60 + 30, 12 * 60 + 15, set()),
    ):
        start, end = midnight + first * MINUTE, midnight + last * MINUTE
        chosen = _plan(migrated_engine, start, end)
        lo, hi = chosen.rollup_start, chosen.rollup_end
        now = (datetime.min.replace(tzinfo=UTC), datetime.now(UTC))
        assert edges.sides(lo, hi, day, edges.floor_day, now)[0] == net
        raw = _raw(migrated_engine, start, end)
        for group_by in ((), ("model", "success"), ("user_id",)):
            _check(_summary(store, start, end, group_by=group_by), raw, group_by)
        # Day buckets: each day's part of the window in its day.
        counted = store.window(start, end, {})
        series = report.timeseries(counted.rows, edges.floor_day(start), end, day)
        for bucket in series:
            at = datetime.fromisoformat(bucket["start"])
            inside = [r for r in raw if at <= utc(r["created_at"]) < at + day]
            assert bucket["groups"][0]["requests"] == len(inside), bucket["start"]


def _never(_hour: datetime) -> bool:
    raise AssertionError("an aligned window asks nothing about the raw rows")


def test_an_edge_whose_raw_rows_were_pruned_is_rounded_out_to_its_hour(
    migrated_engine: sa.Engine,
) -> None:
    _fill(migrated_engine, _traffic(4))
    everything = report.summary(
        MetricsStore(migrated_engine).window(BASE, BASE + timedelta(hours=4), {}).rows
    )[0]
    # Retention deletes the oldest raw rows first; here up to 70 minutes in.
    cutoff = BASE + 70 * MINUTE
    with migrated_engine.begin() as conn:
        conn.execute(sa.delete(request_log).where(request_log.c.created_at < cutoff))
    store = MetricsStore(migrated_engine)
    for since in (BASE + 30 * MINUTE, BASE + 65 * MINUTE):  # before the cutoff: pruned
        counted = store.window(since, BASE + timedelta(hours=4), {})
        assert counted.start == edges.floor_hour(since) and counted.end == BASE + timedelta(hours=4)
        whole = report.summary(store.window(counted.start, counted.end, {}).rows)[0]
        assert report.summary(counted.rows)[0] == whole
    # The first hour is whole in the rollups: counted whole, it is the traffic recorded.
    first = store.window(BASE + 30 * MINUTE, BASE + timedelta(hours=4), {})
    assert report.summary(first.rows)[0]["requests"] == everything["requests"]
    # From the cutoff's hour on, the raw rows are all there: exact again.
    since, until = BASE + 135 * MINUTE, BASE + 200 * MINUTE
    _check(_summary(store, since, until), _raw(migrated_engine, since, until), ())
    # A window inside a pruned hour counts that whole hour; its end is rounded out too.
    inside = store.window(BASE + 10 * MINUTE, BASE + 20 * MINUTE, {})
    assert (inside.start, inside.end) == (BASE, BASE + timedelta(hours=1))


def test_sql_bins_are_python_s_bins_on_and_around_every_edge(migrated_engine: sa.Engine) -> None:
    values = [*EDGY, *(2.0 ** (k / 8) for k in range(-90, 160))]
    values += [math.nextafter(v, math.inf) for v in values] + [math.nextafter(v, 0) for v in values]
    exchanges = [
        chat(
            [Message("user", f"v{i}")],
            attempts=[
                attempt(
                    started_at=BASE + timedelta(seconds=i % 1800),
                    response_time_ms=v,
                    time_to_first_token_ms=v,
                    tokens_per_second=v,
                )
            ],
        )
        for i, v in enumerate(values)
    ]
    _fill(migrated_engine, exchanges)
    expected = Tally()
    for row in _raw(migrated_engine, BASE, BASE + timedelta(hours=1)):
        expected.add_attempt(row)
    with edges.snapshot(migrated_engine) as conn:
        [(_dims, got)] = edges.raw_tallies(
            conn, BASE, BASE + timedelta(hours=1), {}, model_level=True
        )
    assert got.latency_ms == expected.latency_ms
    assert got.ttft_ms == expected.ttft_ms == got.tps
    assert got.requests == len(values)


def test_an_sqlite_without_math_functions_bins_as_python_does_with_parley_s_log2() -> None:
    """Some SQLite builds lack ``log2`` (no ``SQLITE_ENABLE_MATH_FUNCTIONS``): the engine
    then supplies its own, which must give the C library's bins. Here it replaces the
    built-in on a plain connection, as it would stand in for a missing one."""
    values = [*EDGY, *(2.0 ** (k / 8) for k in range(-90, 160)), -1.0]
    values += [math.nextafter(v, math.inf) for v in values] + [math.nextafter(v, 0) for v in values]
    column = sa.column("v", sa.Float)
    statement = sa.select(edges.sql_bin(column, postgres=False)).select_from(sa.table("t", column))
    sql = str(
        statement.compile(dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True})
    )
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (v REAL)")
        conn.executemany("INSERT INTO t VALUES (?)", [(v,) for v in values])
        built_in = [b for (b,) in conn.execute(sql)]
        conn.create_function("log2", 1, engine_module._log2, deterministic=True)
        supplied = [b for (b,) in conn.execute(sql)]
    finally:
        conn.close()
    assert supplied == built_in == [histogram.bin_of(v) for v in values]
