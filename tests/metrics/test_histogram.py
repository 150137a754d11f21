"""Histograms and the reports built on them: percentiles within the documented bin error."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta

import pytest

from parley.domain import histogram
from parley.domain.rollup import DAY, HOUR, Dims, Tally, tally_rows
from parley.metrics import report


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [50, 90, 99])
def test_percentiles_are_within_the_documented_error_of_the_exact_ones(seed: int, p: int) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(5, 1.5) for _ in range(rng.randint(1, 5000))]
    h: histogram.Histogram = {}
    for v in values:
        histogram.add(h, v)
    exact = histogram.exact_percentile(values, p)
    estimate = histogram.percentile(h, p)
    assert exact is not None and estimate is not None
    assert abs(estimate - exact) / exact <= histogram.RELATIVE_ERROR + 1e-12


def test_merged_histograms_equal_one_built_from_all_values() -> None:
    rng = random.Random(7)
    a, b, whole = {}, {}, {}
    for i in range(1000):
        v = rng.uniform(0, 2000)
        histogram.add(a if i % 3 else b, v)
        histogram.add(whole, v)
    assert histogram.merge(dict(a), b) == whole
    assert histogram.decode(histogram.encode(whole)) == whole


def test_decode_reads_every_stored_form_as_the_histogram_written() -> None:
    # Negative bins (below 1), the floor bin, counts past 2**31, keys in any order, and
    # the spaced form json.dumps writes: read as int -> int, as the JSON object says.
    written = {histogram.FLOOR_BIN: 3, -8: 1, 0: 2, 56: 7, 200: 2**40}
    assert histogram.decode(histogram.encode(written)) == written
    assert histogram.decode('{"56": 7, "-3": 2}') == {56: 7, -3: 2}
    assert all(type(k) is int for k in histogram.decode('{"56":7,"-3":2}'))
    assert histogram.decode("{}") == {} and histogram.decode("") == {}
    assert histogram.decode(None) == {}
    with pytest.raises(ValueError):  # not a histogram: an error, never a wrong one
        histogram.decode('{"56":7,"3"}')


def test_zero_and_tiny_values_share_the_lowest_bin_and_read_as_zero() -> None:
    h: histogram.Histogram = {}
    for v in (0.0, 0.0001, 0.0):
        histogram.add(h, v)
    assert histogram.percentile(h, 99) == 0.0
    assert histogram.percentile({}, 50) is None


def _row(at: datetime, model: str, success: bool, latency: float, cost: float | None) -> dict:
    return {
        "created_at": at,
        "user_id": None,
        "api_key_id": 3,
        "provider": "up",
        "model": model,
        "origin": None,
        "success": success,
        "error_type": None if success else "rate_limit",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost_usd": cost,
        "response_time_ms": latency,
        "time_to_first_token_ms": latency / 2,
        "tokens_per_second": 50.0,
    }


def test_hours_and_days_tally_the_same_rows_and_group_by_model() -> None:
    start = datetime(2026, 11, 20, 22, 30, tzinfo=UTC)
    rows = [
        _row(start + timedelta(minutes=20 * i), "a" if i % 2 else "b", i % 5 != 0, 100 + i, 0.01)
        for i in range(12)
    ]
    tallies = tally_rows(rows)
    hours = [(s, d, t) for (period, s, d), t in tallies.items() if period == HOUR]
    days = [(s, d, t) for (period, s, d), t in tallies.items() if period == DAY]
    assert {s.hour for s, _, _ in days} == {0}
    by_hour = report.summary(hours, ["model"])
    by_day = report.summary(days, ["model"])
    # Sums of floats may differ in the last bit with the order they were added in.
    assert _rounded(by_hour) == _rounded(by_day)
    everything = report.summary(days)
    assert everything[0]["requests"] == 12
    assert everything[0]["errors"] == 3
    assert everything[0]["errors_by_type"] == {"rate_limit": 3}
    assert everything[0]["cost_usd"] == pytest.approx(0.12)
    assert everything[0]["latency_ms"]["avg"] == pytest.approx(sum(100 + i for i in range(12)) / 12)


def test_plus_adds_up_two_tallies_and_changes_neither() -> None:
    rng = random.Random(3)
    start = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    stored = next(iter(tally_rows([_row(start, "a", True, rng.uniform(1, 900), 0.01)]).values()))
    for i in range(300):
        row = _row(start, "a", i % 7 != 0, rng.uniform(1, 900), 0.01)
        stored = stored.plus(next(iter(tally_rows([row]).values())))
    fresh = next(iter(tally_rows([_row(start, "a", True, 42.0, None)]).values()))
    fresh.ttft_ms = {}  # a histogram only one side has is shared, not copied
    before = (copy.deepcopy(stored), copy.deepcopy(fresh))
    total = stored.plus(fresh)
    assert (stored, fresh) == before
    assert total == Tally().merge(stored).merge(fresh)
    assert total.requests == 302
    assert histogram.total(total.latency_ms) == 302
    assert total.ttft_ms is stored.ttft_ms
    assert histogram.added({}, {1: 2}) == {1: 2} and histogram.added({1: 2}, {1: 1, 3: 1}) == {
        1: 3,
        3: 1,
    }


def test_a_group_without_prices_has_no_cost_rather_than_zero() -> None:
    at = datetime(2026, 11, 20, tzinfo=UTC)
    rows = [(at, Dims(None, None, "up", "m", None, True, None), Tally(requests=1))]
    assert report.summary(rows)[0]["cost_usd"] is None


def test_time_series_has_every_bucket_and_refuses_unknown_groupings() -> None:
    start = datetime(2026, 11, 20, tzinfo=UTC)
    rows = [
        (
            start + timedelta(hours=2),
            Dims(None, None, "up", "m", None, True, None),
            Tally(requests=4),
        )
    ]
    series = report.timeseries(rows, start, start + timedelta(hours=6), timedelta(hours=1))
    assert [b["groups"][0]["requests"] for b in series] == [0, 0, 4, 0, 0, 0]
    assert series[0]["start"] == "2026-11-20T00:00:00Z"
    with pytest.raises(ValueError, match="cannot group by"):
        report.summary(rows, ["password"])


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
