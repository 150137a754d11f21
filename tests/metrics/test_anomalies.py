"""The anomaly rule: fires on an injected step, stays quiet on steady traffic."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from parley.domain import histogram
from parley.domain.rollup import Dims, Tally
from parley.metrics import anomalies

START = datetime(2026, 11, 1, tzinfo=UTC)
OK = Dims(None, None, "up", "m", None, True, None)
FAILED = Dims(None, None, "up", "m", None, False, "server_error")


def _traffic(
    hours: int, seed: int, *, slow_from: int | None = None, failing_from: int | None = None
) -> list[tuple[datetime, Dims, Tally]]:
    rng = random.Random(seed)
    rows = []
    for h in range(hours):
        at = START + timedelta(hours=h)
        ok, failed = Tally(), Tally()
        error_rate = 0.3 if failing_from is not None and h >= failing_from else 0.01
        scale = 3.0 if slow_from is not None and h >= slow_from else 1.0
        for _ in range(rng.randint(80, 120)):
            latency = rng.lognormvariate(5.3, 0.35) * scale
            tally = failed if rng.random() < error_rate else ok
            tally.requests += 1
            tally.latency_ms_sum += latency
            histogram.add(tally.latency_ms, latency)
        rows += [(at, OK, ok), (at, FAILED, failed)]
    return rows


def test_steady_traffic_raises_nothing() -> None:
    for seed in range(10):
        assert anomalies.find(_traffic(72, seed), START) == []


def test_a_latency_step_is_one_episode_starting_at_the_step() -> None:
    found = anomalies.find(_traffic(48, 1, slow_from=40), START)
    assert [(e.metric, e.start) for e in found] == [("latency_p90_ms", START + timedelta(hours=40))]
    assert found[0].peak > 2 * found[0].baseline


def test_an_error_rate_step_is_flagged_and_quiet_hours_before_are_not() -> None:
    found = anomalies.find(_traffic(48, 2, failing_from=30), START)
    assert [(e.metric, e.start) for e in found] == [("error_rate", START + timedelta(hours=30))]
    assert found[0].peak > 0.2 and found[0].baseline < 0.05


def test_too_little_traffic_or_history_is_never_an_anomaly() -> None:
    assert anomalies.find(_traffic(5, 3, slow_from=3), START) == []
