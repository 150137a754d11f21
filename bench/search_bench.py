"""Keyword search benchmark: p50 / p99 latency of ``store.search`` on SQLite.

For each size, builds a SQLite database at head in a temporary directory and fills it
through the exchange writer's own ``write_batch`` (so the FTS5 index is kept by the same
triggers as in production): each exchange is one user message and one answer, owned by
one of ``--users`` users, ~30 words each from a 20,000-word Zipf-like vocabulary. Then
runs ``--queries`` searches as one user (its own history, the API's default scope) with
the default limit of 20: one rare word, one mid-frequency word, two words. Prints a table.

    PYTHONPATH=src .venv/bin/python bench/search_bench.py [--max 100000] [--users 10]
        [--queries 300]

Sizes are 10,000, 100,000 and 1,000,000 messages, up to ``--max`` (default 100,000;
``--max 1000000`` for the largest: seeding takes minutes). The goal at 1,000,000
messages: p50 under 10 ms.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import Message
from parley.ops.migrate import upgrade
from parley.settings import load_settings
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from parley.store.search import Scope, Search

SIZES = (10_000, 100_000, 1_000_000)
VOCABULARY = 20_000
WORDS_PER_MESSAGE = 30
BATCH = 500


def vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(VOCABULARY)})
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    return words, weights


def seed(engine: object, messages: int, users: int, rng: random.Random) -> None:
    words, weights = vocabulary(rng)
    now = datetime.now(UTC)

    def text() -> str:
        return " ".join(rng.choices(words, weights, k=WORDS_PER_MESSAGE))

    exchanges = messages // 2
    for start in range(0, exchanges, BATCH):
        batch = [
            Exchange(
                model_requested="bench/m",
                messages=(Message("user", text()),),
                started_at=now,
                attempts=[Attempt(1, "bench", "m", now, success=True, status_code=200)],
                choices=[Choice(0, text(), finish_reason="stop")],
                user_id=1 + (start + i) % users,
            )
            for i in range(min(BATCH, exchanges - start))
        ]
        with writer_connection(engine) as conn, conn.begin():  # type: ignore[arg-type]
            write_batch(conn, batch)


def queries(count: int, rng: random.Random) -> list[str]:
    words, _ = vocabulary(random.Random(7))  # the seeding vocabulary, in rank order
    rare, mid = words[5000:20000], words[50:2000]
    made = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            made.append(rng.choice(rare))
        elif kind == 1:
            made.append(rng.choice(mid))
        else:
            made.append(f"{rng.choice(mid)} {rng.choice(mid)}")
    return made


def measure(size: int, users: int, count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        settings = load_settings(
            env={"PARLEY_DATA_DIR": str(root / "data"), "PARLEY_ENV": "development"}, cwd=root
        )
        upgrade(settings)
        engine = create_engine(settings)
        try:
            began = time.perf_counter()
            seed(engine, size, users, random.Random(7))
            seeded = time.perf_counter() - began
            search = Search(engine)
            rng = random.Random(11)
            asked = queries(count, rng)
            for query in asked[:20]:  # warm the page cache and the pool
                search.keyword(query, Scope(1))
            times, found = [], 0
            for query in asked:
                t0 = time.perf_counter()
                hits = search.keyword(query, Scope(1))
                times.append((time.perf_counter() - t0) * 1000)
                found += len(hits)
        finally:
            engine.dispose()
    times.sort()
    return {
        "seed_s": seeded,
        "p50": statistics.median(times),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "hits": found / len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=100_000, help="largest size to run")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    print(f"{'messages':>10} {'seed s':>8} {'p50 ms':>8} {'p99 ms':>8} {'hits/query':>11}")
    for size in SIZES:
        if size > args.max:
            break
        row = measure(size, args.users, args.queries)
        print(
            f"{size:>10,} {row['seed_s']:>8.1f} {row['p50']:>8.2f} {row['p99']:>8.2f} "
            f"{row['hits']:>11.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
