"""Chat API reads: the sidebar's first page and loading one long conversation.

Seeds a SQLite database in a temporary directory with 10,000 conversations for one user
(through the exchange writer's ``write_batch``, in batches, with activity times spread
over a year; a few pinned, a few archived) and one conversation of 1,000 messages (500
rounds of a question and its answer, each answer with its response row: the newest
activity, so it is on the first page and its count is part of the listing). Then times
the repository calls the routes make (``Conversations.list_page``, ``Conversations.load``),
each on a pooled connection, and the JSON body of the load (``server.chat_api``), and
prints p50 and p99.

Goals (issue 4): first page < 5 ms, loading the 1,000-message conversation < 10 ms. The
timings run twice: as is, then after ``gc.freeze()`` (what a server can do once started),
since a full garbage collection of a process full of long-lived objects is what makes the
slowest 1 % slow.

    python bench/chat_bench.py [--conversations 10000] [--messages 1000] [--iterations 1000]
                               [--database-url URL]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from sqlalchemy import bindparam, update

from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import Message
from parley.domain.usage import Usage
from parley.ops.migrate import upgrade
from parley.server.chat_api import tree_json
from parley.settings import load_settings
from parley.store.conversations import Conversations
from parley.store.engine import create_engine, writer_connection
from parley.store.exchanges import write_batch
from parley.store.schema import conversations

USER = 7
PAGE = 50
FILLER = (
    "Here is a paragraph of ordinary prose, long enough to look like a real chat message "
    "with a question or an answer in it, so that rows have a realistic size. "
)


@dataclass(frozen=True)
class Viewer:
    user_id: int | None = USER

    def may_see(self, owner_id: int | None) -> bool:
        return owner_id == self.user_id


def exchange(i: int, history: tuple[Message, ...] = ()) -> Exchange:
    now = datetime.now(UTC)
    question = Message("user", f"Question {i}: {FILLER}")
    return Exchange(
        model_requested="openai/gpt-4o-mini",
        messages=(*history, question),
        started_at=now,
        user_id=USER,
        attempts=[
            Attempt(
                1,
                "openai",
                "gpt-4o-mini",
                now,
                success=True,
                status_code=200,
                response_time_ms=321.0,
                finish_reason="stop",
                usage=Usage(prompt_tokens=40, completion_tokens=30, total_tokens=70),
            )
        ],
        choices=[Choice(0, f"Answer {i}: {FILLER}", finish_reason="stop")],
    )


def seed(engine_url: str, data_dir: Path, n_conversations: int, n_messages: int) -> None:
    settings = load_settings(env={"PARLEY_DATA_DIR": str(data_dir), "DATABASE_URL": engine_url})
    upgrade(settings)
    engine = create_engine(settings)
    try:
        with writer_connection(engine) as conn:
            for start in range(0, n_conversations - 1, 500):
                batch = [exchange(i) for i in range(start, min(start + 500, n_conversations - 1))]
                with conn.begin():
                    write_batch(conn, batch)
            # Activity spread over a year, a few pinned and archived, like a real sidebar.
            base = datetime.now(UTC) - timedelta(days=365)
            with conn.begin():
                ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM conversations")]
                conn.execute(
                    update(conversations)
                    .where(conversations.c.id == bindparam("b_id"))
                    .values(
                        updated_at=bindparam("b_at"),
                        pinned=bindparam("b_pinned"),
                        archived=bindparam("b_archived"),
                    ),
                    [
                        {
                            "b_id": conv_id,
                            "b_at": base + timedelta(seconds=3000 * k),
                            "b_pinned": k % 2000 == 0,
                            "b_archived": k % 10 == 5,
                        }
                        for k, conv_id in enumerate(ids)
                    ],
                )
            # One long conversation, as a client re-sending its history makes it: each
            # round adds a question and its answer (with its response row).
            history: tuple[Message, ...] = ()
            rounds = n_messages // 2
            for start in range(0, rounds, 50):
                batch = []
                for i in range(start, min(start + 50, rounds)):
                    batch.append(exchange(n_conversations + i, history))
                    history = (*batch[-1].messages, batch[-1].choices[0].message())
                with conn.begin():
                    write_batch(conn, batch)
        if engine.dialect.name == "postgresql":
            # What autovacuum does to a table in use; a fresh one has no statistics and
            # the planner guesses the user owns 7 conversations, not 10,000.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def timed(fn: Callable[[], object], iterations: int) -> list[float]:
    for _ in range(min(50, iterations)):
        fn()
    out = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=1_000)
    parser.add_argument("--iterations", type=int, default=1_000)
    parser.add_argument("--database-url", help="an empty database (default: SQLite in a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        url = args.database_url or f"sqlite:///{data_dir / 'parley.db'}"
        started = time.perf_counter()
        seed(url, data_dir, args.conversations, args.messages)
        print(f"seeded in {time.perf_counter() - started:.1f} s ({url.split(':')[0]})")

        settings = load_settings(env={"PARLEY_DATA_DIR": str(data_dir), "DATABASE_URL": url})
        engine = create_engine(settings)
        try:
            store = Conversations(engine)
            viewer = Viewer()
            first = store.list_page(viewer, limit=PAGE)
            assert len(first.items) == PAGE and first.next_cursor is not None
            longest = max(first.items, key=lambda c: c.message_count)
            assert longest.message_count == args.messages, longest.message_count
            cursor = first.next_cursor
            tree = store.load(viewer, longest.public_id)
            assert tree is not None and len(tree.active_path) == args.messages
            loaded = tree

            n = args.iterations
            loads = max(100, n // 2)

            def measure(note: str) -> list[tuple[str, list[float], float | None]]:
                return [
                    (
                        f"list first page ({PAGE}){note}",
                        timed(lambda: store.list_page(viewer, limit=PAGE), n),
                        5.0,
                    ),
                    (
                        f"list next page (cursor){note}",
                        timed(lambda: store.list_page(viewer, limit=PAGE, cursor=cursor), n),
                        None,
                    ),
                    (
                        f"load {args.messages} messages{note}",
                        timed(lambda: store.load(viewer, longest.public_id), loads),
                        10.0,
                    ),
                ]

            rows = measure("")
            rows.append(
                ("  + its JSON body", timed(lambda: orjson.dumps(tree_json(loaded)), loads), None)
            )
            # A full garbage collection walks every object the process holds; a server
            # that freezes what it made at start keeps those walks short (report).
            gc.collect()
            gc.freeze()
            rows += measure(", gc.freeze()")
        finally:
            engine.dispose()

    print(f"{'operation':<38} {'n':>5} {'p50 ms':>7} {'p99 ms':>7}  goal")
    for name, values, goal in rows:
        p50, p99 = statistics.median(values), percentile(values, 99)
        verdict = ""
        if goal is not None:
            met = [label for label, value in (("p50", p50), ("p99", p99)) if value < goal]
            verdict = f"< {goal:g} ms: " + (" ".join(f"{label} ok" for label in met) or "MISS")
        print(f"{name:<38} {len(values):>5} {p50:>7.2f} {p99:>7.2f}  {verdict}")


if __name__ == "__main__":
    main()
