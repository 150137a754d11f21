"""Ctrl-C, twice, on a ``parley serve`` process whose search indexer is busy.

The remote embedder (the fake upstream) indexes a conversation in batches of 4 and stalls
on the third; a chat answer stalls too. The first SIGINT starts the stop, which waits for
the open answer (the grace is 30 s); a second one must cut that short without breaking
off the stop: it did, with exit status 1, the run left marked as running and the writer
not stopped. Nor may the stop wait for the stalled batch (it waited 10 s). The exit is
clean: status 0, no traceback, the run marked clean, the database sound, the answer
recorded as interrupted, and every message has its vector or is still in the outbox.

SQLite only: the run marker and ``integrity_check`` are SQLite's; the signal handling and
the indexer do not depend on the database.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from parley.ops.migrate import upgrade
from parley.search.vectors import VectorStore
from parley.store.conversations import Conversations
from parley.store.engine import create_engine
from tests.fakes.openai_upstream import STALL_EMBEDDING, FakeOpenAI
from tests.harness import free_port, rows, serve_subprocess, settings_for, write_config
from tests.server.crash_support import integrity, refuses_connections, server_env, wal_size
from tests.server.test_shutdown import Client
from tests.store.test_conversations import new, say

pytestmark = pytest.mark.slow

BATCH = 4
# Two batches are embedded, the third (ending in the stalling text) waits on the upstream.
TEXTS = [f"note {i} about sailing boats" for i in range(11)] + [f"{STALL_EMBEDDING} 11"]
EMBEDDED = TEXTS[: 2 * BATCH]
STALLED_ANSWER = "up/stall-mid"
SEARCH = f"[search]\nbatch_size = {BATCH}\npoll_seconds = 0.05\nreconcile_on_start = false\n"


def test_ctrl_c_twice_while_the_indexer_is_busy_stops_at_once_and_cleanly(
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
    _seed(tmp_path, database_url)
    with FakeOpenAI() as upstream:
        env = server_env(
            tmp_path,
            database_url,
            upstream.base_url,
            PARLEY_SEARCH_EMBEDDER="remote",
            PARLEY_SEARCH_MODEL="up/text-embedding-3-small",
            PARLEY_SHUTDOWN_GRACE="30",
        )
        provider = {"name": "up", "kind": "openai", "base_url": upstream.base_url}
        write_config(tmp_path, [{**provider, "list_models": False}], extra=SEARCH)
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as process:
            deadline = time.monotonic() + 30
            while not _stalled(upstream) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _stalled(upstream), "the indexer never reached the stalling batch"
            client = Client(f"http://127.0.0.1:{port}", STALLED_ANSWER, True)
            client.start()
            assert client.first.wait(30) and client.status == 200

            signalled = time.monotonic()
            process.send_signal(signal.SIGINT)
            # The stop has begun (nothing new is accepted) and waits for the open answer...
            while not refuses_connections(port):
                assert time.monotonic() - signalled < 10, "the stop did not begin"
                time.sleep(0.02)
            assert process.poll() is None
            # ...until Ctrl-C again, as someone does when nothing seems to happen.
            process.send_signal(signal.SIGINT)
            returncode = process.wait(30)
            took = time.monotonic() - signalled
            client.join(30)

    log = (tmp_path / "server.log").read_text()
    assert returncode == 0, log
    assert "Traceback" not in log and "Error" not in log, log
    # Neither the grace (30 s) nor the stalled batch was waited for.
    assert took < 8, f"the stop took {took:.1f}s"
    assert not (tmp_path / "data" / "parley.db.running").exists(), "not marked clean"
    assert wal_size(database_url) is None
    assert integrity(database_url) == "ok"

    assert client.last_data["error"]["code"] == "server_shutting_down", client.lines[-2:]
    (row,) = rows(
        database_url,
        "SELECT error_type, finish_reason FROM request_log WHERE model_requested = :m",
        m=STALLED_ANSWER,
    )
    assert row == {"error_type": "interrupted", "finish_reason": "server_shutdown"}

    # Nothing lost: the two batches embedded have their vectors and left the outbox; every
    # other message (the stalled batch, whole, and the chat's) is queued for the next start.
    messages = {
        r["content"]: r["id"] for r in rows(database_url, "SELECT id, content FROM messages")
    }
    queued = [r["item_id"] for r in rows(database_url, "SELECT item_id FROM search_outbox")]
    vectors = VectorStore.open(str(tmp_path / "data" / "vectors")).message_ids()
    assert vectors == {messages[text] for text in EMBEDDED}
    assert sorted(queued) == sorted(set(messages.values()) - vectors)


def _seed(tmp_path: Path, database_url: str) -> None:
    settings = settings_for(tmp_path, database_url)
    upgrade(settings)
    engine = create_engine(settings)
    try:
        store = Conversations(engine)
        conversation = new(store)
        for text in TEXTS:
            say(store, conversation, text)
    finally:
        engine.dispose()


def _stalled(upstream: FakeOpenAI) -> bool:
    """Whether the indexer asked for the stalling batch's embeddings."""
    return any(
        path == "/v1/embeddings" and any(STALL_EMBEDDING in text for text in body["input"])
        for path, _, body in list(upstream.received)
    )
