"""Chat API: the sidebar's first page, loading one long conversation, and sending a
message at the end of a long branch.

Seeds a SQLite database in a temporary directory with 10,000 conversations for one user
(through the exchange writer's ``write_batch``, in batches, with activity times spread
over a year; a few pinned, a few archived) and one conversation of 1,000 messages (500
rounds of a question and its answer, each answer with its response row: the newest
activity, so it is on the first page and its count is part of the listing). Then times
the repository calls the routes make (``Conversations.list_page``, ``Conversations.load``),
each on a pooled connection, and the JSON body of the load (``server.chat_api``), and
prints p50 and p99.

Sends: the store's share of ``POST /api/conversations/{id}/messages``, everything but the
upstream call. The user message is committed with the branch read back for the model's
context (``Conversations.add_user_message``), the context is decoded as the chat service
does (``StoredMessage.message``), and the answer is recorded the way the writer records a
chat-API turn (``write_batch`` of an exchange with ``ReplyTo``, committed). Each send
goes under the same message, so the branch keeps its length however many are timed: at
the end of a short conversation's (2 messages) and of a long single branch (``--branch``,
2,000 messages by default, seeded like the long conversation), so the two rows show what
a long branch adds to a send.

Goals (issue 4): first page < 5 ms, loading the 1,000-message conversation < 10 ms. The
timings run twice: as is, then after ``gc.freeze()`` (what a server can do once started),
since a full garbage collection of a process full of long-lived objects is what makes the
slowest 1 % slow.

    python bench/chat_bench.py [--conversations 10000] [--messages 1000] [--branch 2000]
                               [--iterations 1000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from sqlalchemy import Connection, Engine, bindparam, update

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message
from parley.domain.usage import Usage
from parley.ops.migrate import upgrade
from parley.server.chat_api import tree_json
from parley.settings import load_settings
from parley.store.bulk import new_public_id
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


def thread(conn: Connection, first: int, n_messages: int) -> uuid.UUID:
    """A conversation of ``n_messages`` in one branch, as a client re-sending its history
    makes it: each round adds a question and its answer (with its response row)."""
    history: tuple[Message, ...] = ()
    rounds = n_messages // 2
    public_id = None
    for start in range(0, rounds, 50):
        batch = []
        for i in range(start, min(start + 50, rounds)):
            batch.append(exchange(first + i, history))
            history = (*batch[-1].messages, batch[-1].choices[0].message())
        with conn.begin():
            public_id = write_batch(conn, batch)[-1].conversation_public_id
    assert public_id is not None
    return public_id


def seed(
    engine_url: str, data_dir: Path, n_conversations: int, n_messages: int, n_branch: int
) -> tuple[uuid.UUID, uuid.UUID]:
    """Seed the database; the public ids of the long conversation and the long branch."""
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
            # One long conversation, as a client re-sending its history makes it.
            long_id = thread(conn, n_conversations, n_messages)
            # The long branch the sends go to the end of: the oldest activity, so the
            # sidebar's first page is the same with or without it.
            branch_id = thread(conn, n_conversations + n_messages, n_branch)
            with conn.begin():
                conn.execute(
                    update(conversations)
                    .where(conversations.c.public_id == branch_id)
                    .values(updated_at=base - timedelta(days=1), pinned=False, archived=False)
                )
        if engine.dialect.name == "postgresql":
            # What autovacuum does to a table in use; a fresh one has no statistics and
            # the planner guesses the user owns 7 conversations, not 10,000.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return long_id, branch_id


def send(store: Conversations, engine: Engine, conversation: uuid.UUID, parent: uuid.UUID) -> None:
    """What a chat-API send asks of the store (see the module docstring)."""
    viewer = Viewer()
    question = Message("user", f"One more question: {FILLER}")
    turn = store.add_user_message(
        viewer, conversation, question, parent=parent, user_id=USER, api_key_id=None
    )
    assert turn is not None
    context = tuple(stored.message() for stored in turn.path)
    answer = exchange(0)
    answer.messages = context
    answer.client_protocol = "parley"
    answer.reply_to = ReplyTo(
        turn.conversation.id,
        turn.conversation.public_id,
        turn.message.id,
        turn.chain_hash,
        (new_public_id(),),
        turn.leaf_at_start,
    )
    with writer_connection(engine) as conn, conn.begin():
        write_batch(conn, [answer])


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
    parser.add_argument("--branch", type=int, default=2_000, help="messages of the long branch")
    parser.add_argument("--iterations", type=int, default=1_000)
    parser.add_argument("--database-url", help="an empty database (default: SQLite in a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        url = args.database_url or f"sqlite:///{data_dir / 'parley.db'}"
        started = time.perf_counter()
        long_id, branch_id = seed(url, data_dir, args.conversations, args.messages, args.branch)
        print(f"seeded in {time.perf_counter() - started:.1f} s ({url.split(':')[0]})")

        settings = load_settings(env={"PARLEY_DATA_DIR": str(data_dir), "DATABASE_URL": url})
        engine = create_engine(settings)
        try:
            store = Conversations(engine)
            viewer = Viewer()
            first = store.list_page(viewer, limit=PAGE)
            assert len(first.items) == PAGE and first.next_cursor is not None
            (longest,) = [c for c in first.items if c.public_id == long_id]
            assert longest.message_count == args.messages, longest.message_count
            short = next(c for c in first.items if c.message_count == 2)
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

            # Last: a send moves its conversation to the top of the sidebar.
            sends = max(50, n // 10)
            for conv_id, length in ((short.public_id, 2), (branch_id, args.branch)):
                shown = store.load(viewer, conv_id)
                assert shown is not None and len(shown.active_path) == length
                leaf = shown.messages[-1].public_id
                rows.append(
                    (
                        f"send after {length} messages",
                        timed(lambda c=conv_id, p=leaf: send(store, engine, c, p), sends),
                        None,
                    )
                )
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
