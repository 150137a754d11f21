"""Writer throughput: commit N synthetic exchanges through the real group-commit Writer.

Each exchange is one successful attempt, a system and a user message and one answer; one
in ``--continue-every`` continues an earlier conversation (re-sending its history plus a
new question), so the chain-hash lookup is exercised too. Prints one row per SQLite
``synchronous`` mode (or one row for ``--database-url``). Goal: >= 10,000 exchanges/s.

    python bench/writer_bench.py [--n 20000] [--batch 512] [--database-url URL]

``--clients C`` instead measures durable recording as the server sees it: C clients each
submit one exchange and wait for its commit before the next (batches then hold at most C
exchanges), and the table adds the commit wait's p50 and p99.

    python bench/writer_bench.py --clients 1 --n 3000

``--busy-thread`` runs a pure-Python loop on a thread beside the writer, as a busy event
loop would be: the writer then gets the GIL back after each driver step only when that
thread's switch interval runs out, so the figure shows how many steps a batch takes.

    python bench/writer_bench.py --busy-thread --n 2000 --synchronous normal
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from parley.collector import tune_for_serving
from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import Message
from parley.domain.usage import Usage
from parley.ops.migrate import upgrade
from parley.settings import Settings, load_settings
from parley.store.engine import create_engine
from parley.store.schema import conversations, messages, request_log, responses
from parley.store.writer import Writer

SYSTEM = Message("system", "You are a helpful assistant. Answer briefly.")


def exchange(i: int, history: tuple[Message, ...] = ()) -> Exchange:
    now = datetime.now(UTC)
    question = Message("user", f"Question number {i}: what is {i} squared?")
    return Exchange(
        model_requested="gpt-bench",
        messages=(*(history or (SYSTEM,)), question),
        started_at=now,
        attempts=[
            Attempt(
                1,
                "openai",
                "gpt-bench-2024",
                now,
                success=True,
                status_code=200,
                response_time_ms=123.4,
                time_to_first_token_ms=45.6,
                finish_reason="stop",
                usage=Usage(prompt_tokens=25, completion_tokens=12, total_tokens=37),
            )
        ],
        choices=[Choice(0, f"{i} squared is {i * i}.", finish_reason="stop")],
    )


def workload(n: int, continue_every: int) -> list[Exchange]:
    out: list[Exchange] = []
    for i in range(n):
        if continue_every and i % continue_every == continue_every - 1 and out:
            # A stateless client re-sending an earlier exchange's history and answer.
            earlier = out[i // 2]
            answer = earlier.choices[0].message()
            out.append(exchange(i, (*earlier.messages, answer)))
        else:
            out.append(exchange(i))
    return out


async def clients(writer: Writer, work: list[Exchange], count: int) -> list[float]:
    """``count`` clients, each waiting for one commit before submitting again."""
    waits: list[float] = []

    async def client(mine: list[Exchange]) -> None:
        for ex in mine:
            started = time.perf_counter()
            await writer.submit(ex)
            waits.append(time.perf_counter() - started)

    await asyncio.gather(*(client(work[i::count]) for i in range(count)))
    return waits


async def submit_all(writer: Writer, batch: list[Exchange]) -> None:
    futures = [writer.submit(ex) for ex in batch]
    await asyncio.gather(*futures)


def run(
    settings: Settings, n: int, continue_every: int, client_count: int = 0
) -> tuple[int, int, float, int, list[float]]:
    upgrade(settings)
    engine = create_engine(settings)
    writer = Writer(engine, batch_max=settings.writer_batch_max)
    # Built first so that the clock measures the store, not the bench; then the
    # collector is set as in a serving process (and the writer's child), which also
    # keeps full collections from walking these prebuilt inputs.
    work = workload(n, continue_every)
    tune_for_serving()
    half = n // 2
    waits: list[float] = []
    writer.start()
    try:
        started = time.perf_counter()
        if client_count:
            waits = asyncio.run(clients(writer, work, client_count))
        else:
            # Two waves: the second one's continuations find the first one's rows stored.
            asyncio.run(submit_all(writer, work[:half]))
            asyncio.run(submit_all(writer, work[half:]))
        seconds = time.perf_counter() - started
    finally:
        writer.stop(timeout=60)
    with engine.connect() as conn:
        rows = sum(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (request_log, conversations, messages, responses)
        )
    engine.dispose()
    return writer.committed, writer.batches, seconds, rows, waits


@contextmanager
def busy_thread(on: bool) -> Iterator[None]:
    """A thread running Python until the block ends (when ``on``)."""
    if not on:
        yield
        return
    done = threading.Event()

    def spin() -> None:
        total = 0
        while not done.is_set():
            for i in range(1000):
                total += i

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="exchanges to commit")
    parser.add_argument("--batch", type=int, default=512, help="writer batch maximum")
    parser.add_argument(
        "--continue-every",
        type=int,
        default=10,
        help="every Nth exchange continues an earlier one (0: never)",
    )
    parser.add_argument("--database-url", help="benchmark this database instead of SQLite")
    parser.add_argument(
        "--clients", type=int, default=0, help="clients that each wait for their commit"
    )
    parser.add_argument(
        "--synchronous",
        default="FULL,NORMAL",
        help="SQLite synchronous levels to run, comma-separated",
    )
    parser.add_argument(
        "--busy-thread",
        action="store_true",
        help="run a pure-Python loop on a thread beside the writer (a busy event loop)",
    )
    args = parser.parse_args()

    print(
        f"{'database':<18}{'exchanges':>10}{'batches':>9}{'seconds':>9}"
        f"{'exchanges/s':>13}{'rows/s':>10}"
        + (f"{'wait p50 ms':>13}{'wait p99 ms':>13}" if args.clients else "")
    )
    modes = ["url"] if args.database_url else args.synchronous.upper().split(",")
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
            env = {"PARLEY_DATA_DIR": str(Path(tmp) / "data")}
            if args.database_url:
                env["DATABASE_URL"] = args.database_url
            else:
                env["PARLEY_SQLITE_SYNCHRONOUS"] = mode
            settings = load_settings(env=env, cwd=Path(tmp), writer_batch_max=args.batch)
            with busy_thread(args.busy_thread):
                committed, batches, seconds, rows, waits = run(
                    settings, args.n, args.continue_every, args.clients
                )
            label = (
                settings.database_url.split(":", 1)[0] if args.database_url else (f"sqlite {mode}")
            ) + (" +busy" if args.busy_thread else "")
            waited = ""
            if waits:
                waits.sort()
                p50, p99 = waits[len(waits) // 2], waits[int(len(waits) * 0.99)]
                waited = f"{p50 * 1000:>13.2f}{p99 * 1000:>13.2f}"
            print(
                f"{label:<18}{committed:>10}{batches:>9}{seconds:>9.2f}"
                f"{committed / seconds:>13,.0f}{rows / seconds:>10,.0f}{waited}"
            )


if __name__ == "__main__":
    main()
