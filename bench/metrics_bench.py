"""Metrics reports over a large request log: the 30-day summary and the 24-hour series.

Seeds a SQLite database in a temporary directory with ``--rows`` request-log rows (10
million by default) spread evenly, in time order, over the last 30 days: 8 models on 3
providers, 20 users with 30 API keys, 5 origins, 3% failures of four kinds, log-normal
latencies. Rows are inserted with the driver's ``executemany`` and their rollups are
kept by the writer's own code (``store.rollups.add``), one transaction per chunk, as the
writer does per batch. Then it times what the metrics API's handlers run
(``MetricsStore`` reads, ``metrics.report``):

- ``GET /api/metrics/summary?window=30d&group_by=model``
- the same over 29 days ending 12 hours before the seeded end (both edges inside the log)
- ``GET /api/metrics/timeseries?window=24h&bucket=1h``
- ``GET /api/metrics/summary?window=24h&group_by=provider,user``

and prints p50 and p99 of each. Goal (issue 6): the first and third under 100 ms p50.

Seeding 10 million rows takes tens of minutes, so ``--keep DIR`` keeps the seeded data
directory (and notes in ``DIR/seeded.json`` how many rows were seeded and when the 30 days
end): a later run with the same ``--keep DIR`` reuses it instead of seeding again. With
``--database-url`` the rows go to that database and ``DIR`` keeps only the note.

The windows are not on whole hours, as a real "last 30 days" from now is not: the seeded
rows end at half past an hour less 30 s, where each edge hour has ~30 minutes on either
side, the most raw rows an edge can read (``store.edges``). A window ending at the end
of the log reads none for its last hour (nothing is stored after it), and the 30-day
window starts where the log does, so the second report is the one that reads raw rows
at both ends.

    python bench/metrics_bench.py [--rows 10000000] [--iterations 50] [--database-url URL]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from parley.metrics import report
from parley.ops.migrate import upgrade
from parley.settings import load_settings
from parley.store import rollups
from parley.store.bulk import bulk_insert
from parley.store.engine import create_engine, writer_connection
from parley.store.metrics import MetricsStore
from parley.store.schema import request_log

MODELS = [
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4o"),
    ("anthropic", "claude-haiku"),
    ("anthropic", "claude-sonnet"),
    ("gemini", "gemini-flash"),
    ("gemini", "gemini-pro"),
    ("openai", "o3-mini"),
    ("anthropic", "claude-opus"),
]
ERRORS = ["rate_limit", "timeout", "server_error", "overloaded"]
CHUNK = 50_000


def seed(engine: Any, rows: int, now: datetime) -> None:
    rng = random.Random(42)
    span = 30 * 24 * 3600
    done = 0
    started = time.perf_counter()
    cache = rollups.RollupCache()  # as the writer keeps one for its connection
    with writer_connection(engine) as conn:
        while done < rows:
            n = min(CHUNK, rows - done)
            # In time order, as the writer records them: a chunk covers a few hours.
            batch = [
                _row(rng, now - timedelta(seconds=span * (1 - (done + i + rng.random()) / rows)))
                for i in range(n)
            ]
            with conn.begin():
                bulk_insert(conn, request_log, batch)
                rollups.add(conn, batch, cache)
            cache.settle()
            done += n
            if done % 1_000_000 < CHUNK:
                rate = done / (time.perf_counter() - started)
                print(f"  seeded {done:,} rows ({rate:,.0f}/s)", flush=True)


def _row(rng: random.Random, at: datetime) -> dict[str, Any]:
    provider, model = rng.choice(MODELS)
    # Each key belongs to one user and is used from one place.
    key = rng.randint(1, 30)
    ok = rng.random() > 0.03
    latency = rng.lognormvariate(6.5, 0.7)
    prompt, completion = rng.randint(10, 4000), rng.randint(1, 800) if ok else 0
    return {
        "public_id": uuid.UUID(int=rng.getrandbits(128)),
        "chain_id": uuid.UUID(int=rng.getrandbits(128)),
        "attempt": 1,
        "created_at": at,
        "success": ok,
        "status_code": 200 if ok else 500,
        "response_time_ms": latency,
        "endpoint": "chat",
        "client_protocol": "openai",
        "provider": provider,
        "model": model,
        "model_requested": f"{provider}/{model}",
        "origin": f"10.0.0.{key % 5 + 1}",
        "is_streaming": True,
        "message_count": 3,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "time_to_first_token_ms": latency / 5 if ok else None,
        "tokens_per_second": completion / (latency / 1000) if ok else None,
        "error_type": None if ok else rng.choice(ERRORS),
        "cost_usd": (prompt * 0.15 + completion * 0.6) / 1e6,
        "user_id": key % 20 + 1,
        "api_key_id": key,
    }


def timed(label: str, call: Callable[[], object], iterations: int) -> None:
    call()  # warm the page cache
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p99 = samples[min(len(samples) - 1, round(0.99 * len(samples)))]
    print(f"{label:<52} {statistics.median(samples):>8.2f} {p99:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--database-url", help="benchmark this (empty) database instead")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the seeded data here; reuse it when already seeded"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="parley-metrics-")))
        env = {"PARLEY_DATA_DIR": str(tmp / "data")}
        if args.database_url:
            env["DATABASE_URL"] = args.database_url
        settings = load_settings(env=env, cwd=tmp)
        upgrade(settings)
        engine = create_engine(settings)
        note = tmp / "seeded.json"
        if note.exists():
            seeded = json.loads(note.read_text())
            now = datetime.fromisoformat(seeded["end"])
            print(f"reusing {seeded['rows']:,} seeded rows ending {now.isoformat()}", flush=True)
        else:
            # Half an hour past, less 30 s: the 30-day window's first hour is mostly inside
            # it (its rollup, less the raw rows before the start), its last mostly outside
            # (the raw rows inside): each edge reads ~30 minutes of raw rows, the most.
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            now = hour + timedelta(minutes=29, seconds=30)
            print(f"seeding {args.rows:,} request-log rows over 30 days...", flush=True)
            seed(engine, args.rows, now)
            if args.keep:
                note.write_text(json.dumps({"rows": args.rows, "end": now.isoformat()}))
        store = MetricsStore(engine)
        with engine.connect() as conn:
            count = conn.exec_driver_sql("SELECT count(*) FROM metric_rollups").scalar()
        print(f"{count:,} rollup rows\n")
        print(f"{'report':<52} {'p50 ms':>8} {'p99 ms':>8}")
        month = (now - timedelta(days=30), now)
        day = (now - timedelta(hours=24), now)
        timed(
            "summary, 30 days, grouped by model",
            lambda: report.summary(store.window(*month, {}, ["model"]).rows, ["model"]),
            args.iterations,
        )
        # The log starts where the 30-day window does, so nothing lies before its start
        # and its first hour costs nothing more than its rollup; this one has rows on both
        # sides of each edge, and reads ~30 minutes of raw rows at each.
        earlier = (now - timedelta(days=29, hours=12), now - timedelta(hours=12))
        timed(
            "summary, 29 days to 12 h ago, by model (2 edges)",
            lambda: report.summary(store.window(*earlier, {}, ["model"]).rows, ["model"]),
            args.iterations,
        )
        timed(
            "time series, 24 hours in 1-hour buckets",
            lambda: report.timeseries(
                store.window(*day, {}, days=False).rows,
                day[0].replace(minute=0, second=0, microsecond=0),
                day[1],
                timedelta(hours=1),
            ),
            args.iterations,
        )
        timed(
            "summary, 24 hours, by provider and user",
            lambda: report.summary(
                store.window(*day, {}, ["provider", "user_id"]).rows, ["provider", "user_id"]
            ),
            args.iterations,
        )
        engine.dispose()


if __name__ == "__main__":
    main()
