"""Search benchmarks: keyword and semantic p50 / p99 latency, local embedding throughput.

Keyword: p50 / p99 latency of ``store.search`` on SQLite.

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

Semantic (``--semantic``): the same sizes of synthetic unit vectors (384 dimensions, the
local model's, drawn around 256 random centres so that an IVF index has structure) in a
LanceDB vector store (``search.vectors``) owned by ``--users`` users; then top-10 queries
as one user, the owner filter inside the vector query, as the API asks them. The ANN index
(IVF-PQ) is built from ``--ann-min-rows`` vectors (default 100,000, the server's default);
below that the search is exact. Goal at 1,000,000: p50 under 20 ms.

Embedding (``--embedding``): messages per second of the local model (all-MiniLM-L6-v2,
CPU) over ``--texts`` texts of ~30 words, in batches of 64, and the latency of one query.

    PYTHONPATH=src .venv/bin/python bench/search_bench.py --semantic --embedding --no-keyword
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


DIMENSION = 384
CENTRES = 256


def measure_semantic(size: int, users: int, count: int, ann_min_rows: int) -> dict[str, float]:
    import numpy as np
    import pyarrow as pa

    from parley.search.vectors import MESSAGES, VectorStore

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((CENTRES, DIMENSION)).astype(np.float32)

    def unit(count: int) -> object:
        points = centres[rng.integers(0, CENTRES, count)]
        points = points + 0.5 * rng.standard_normal((count, DIMENSION)).astype(np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory() as directory:
        store = VectorStore.open(str(Path(directory) / "vectors"))
        store.prepare("bench/synthetic", DIMENSION)
        table = store._table(MESSAGES)  # bulk load: Arrow straight in, not row objects
        schema = table.schema
        now = datetime.now(UTC)
        began = time.perf_counter()
        step = 50_000
        for start in range(0, size, step):
            n = min(step, size - start)
            ids = np.arange(start, start + n, dtype=np.int64)
            vectors = np.asarray(unit(n), dtype=np.float32).reshape(-1)
            batch = pa.table(
                {
                    "id": ids,
                    "user_id": (ids % users) + 1,
                    "conversation_id": ids // 20,
                    "role": pa.array(["user"] * n),
                    "text": pa.array(["synthetic"] * n),
                    "created_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                    "metadata": pa.array(["{}"] * n),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors), DIMENSION),
                },
                schema=schema,
            )
            table.add(batch)
        seeded = time.perf_counter() - began
        began = time.perf_counter()
        indexed = store.ensure_index(MESSAGES, ann_min_rows)
        index_s = time.perf_counter() - began
        asked = [list(map(float, row)) for row in np.asarray(unit(count + 20))]
        for query in asked[:20]:
            store.search_messages(query, model="bench/synthetic", user_id=1, limit=10)
        times, found = [], 0
        for query in asked[20:]:
            t0 = time.perf_counter()
            hits = store.search_messages(query, model="bench/synthetic", user_id=1, limit=10)
            times.append((time.perf_counter() - t0) * 1000)
            found += len(hits)
    times.sort()
    return {
        "seed_s": seeded,
        "index_s": index_s if indexed else 0.0,
        "p50": statistics.median(times),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "hits": found / len(times),
    }


def measure_embedding(texts: int) -> dict[str, float]:
    from parley.search.embedders import LocalEmbedder

    began = time.perf_counter()
    model = LocalEmbedder.load()
    loaded = time.perf_counter() - began
    words, weights = vocabulary(random.Random(7))
    rng = random.Random(3)
    made = [" ".join(rng.choices(words, weights, k=WORDS_PER_MESSAGE)) for _ in range(texts)]
    model.embed_sync(made[:64])  # warm up
    began = time.perf_counter()
    model.embed_sync(made, batch_size=64)
    seconds = time.perf_counter() - began
    single = []
    for text in made[:50]:
        t0 = time.perf_counter()
        model.embed_sync([text])
        single.append((time.perf_counter() - t0) * 1000)
    return {
        "load_s": loaded,
        "per_s": texts / seconds,
        "query_ms": statistics.median(single),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max", type=int, default=100_000, help="largest size to run")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--no-keyword", action="store_true", help="skip keyword search")
    parser.add_argument("--semantic", action="store_true", help="semantic search latency")
    parser.add_argument("--ann-min-rows", type=int, default=100_000)
    parser.add_argument("--embedding", action="store_true", help="local embedding throughput")
    parser.add_argument("--texts", type=int, default=2000)
    args = parser.parse_args()
    sizes = [size for size in SIZES if size <= args.max]
    if not args.no_keyword:
        print("keyword (SQLite FTS5)")
        print(f"{'messages':>10} {'seed s':>8} {'p50 ms':>8} {'p99 ms':>8} {'hits/query':>11}")
        for size in sizes:
            row = measure(size, args.users, args.queries)
            print(
                f"{size:>10,} {row['seed_s']:>8.1f} {row['p50']:>8.2f} {row['p99']:>8.2f} "
                f"{row['hits']:>11.1f}",
                flush=True,
            )
    if args.semantic:
        print("semantic top-10 (LanceDB, synthetic 384-d vectors, owner prefilter)")
        print(f"{'vectors':>10} {'seed s':>8} {'index s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        for size in sizes:
            row = measure_semantic(size, args.users, args.queries, args.ann_min_rows)
            print(
                f"{size:>10,} {row['seed_s']:>8.1f} {row['index_s']:>8.1f} "
                f"{row['p50']:>8.2f} {row['p99']:>8.2f}",
                flush=True,
            )
    if args.embedding:
        row = measure_embedding(args.texts)
        print(
            f"local embedding: model load {row['load_s']:.1f} s, {row['per_s']:.0f} messages/s "
            f"(~30 words, batches of 64), one query {row['query_ms']:.1f} ms (p50)"
        )


if __name__ == "__main__":
    main()
