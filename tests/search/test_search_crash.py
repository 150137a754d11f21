"""kill -9 between a message's commit and its embedding, on SQLite and PostgreSQL: after
a restart the reconcile leaves no row without a vector and no vector without a row, even
with the outbox lost as well (so the reconcile itself, not only the outbox, is tested)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from parley.ops.migrate import upgrade
from parley.search.embedders import LocalEmbedder
from parley.search.indexer import Indexer
from parley.search.vectors import VectorStore
from parley.settings import Settings
from parley.store.conversations import Conversations
from parley.store.engine import create_engine
from tests.harness import free_port, rows, serve_subprocess, settings_for, wait_for
from tests.server.crash_support import DripOpenAI, server_env
from tests.store.test_conversations import new, say

pytestmark = pytest.mark.slow

INDEXABLE = "SELECT id FROM messages WHERE content <> ''"


def _vector_ids(tmp_path: Path) -> set[int]:
    return VectorStore.open(str(tmp_path / "data" / "vectors")).message_ids()


def _row_ids(database_url: str) -> set[int]:
    return {int(row["id"]) for row in rows(database_url, INDEXABLE)}


def test_kill_9_before_embedding_then_reconcile_on_restart(
    tmp_path: Path, database_url: str, local_embedder: LocalEmbedder
) -> None:
    # An older conversation, already embedded (in this process, with the shared model).
    settings = settings_for(tmp_path, database_url)
    upgrade(settings)
    engine = create_engine(settings)
    try:
        old = new(Conversations(engine))
        say(Conversations(engine), old, "an old message about sailing boats")
        vectors = VectorStore.open(settings.vector_uri)
        assert asyncio.run(Indexer(engine, vectors, local_embedder).run_once()) == 1
    finally:
        engine.dispose()
    old_ids = _vector_ids(tmp_path)
    assert len(old_ids) == 1

    with DripOpenAI() as upstream:
        env = server_env(tmp_path, database_url, upstream.base_url, PARLEY_SEARCH_EMBEDDER="local")
        config = tmp_path / "parley.toml"
        base_config = config.read_text()
        # The indexer sleeps an hour between batches: what is committed now stays unembedded.
        config.write_text(base_config + "\n[search]\npoll_seconds = 3600\n")
        port = free_port()
        with serve_subprocess(tmp_path, env, port) as process:
            reply = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "up/fast", "messages": [{"role": "user", "content": "hello"}]},
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            fresh = _row_ids(database_url) - old_ids
            assert len(fresh) == 2  # the question and the answer, committed
            assert not fresh & _vector_ids(tmp_path)  # and not embedded
            process.send_signal(signal.SIGKILL)
            process.wait(30)

        # While it is down: the old conversation is deleted and the outbox is lost too.
        _execute(settings, "DELETE FROM conversations WHERE id = :id", id=_first(database_url))
        _execute(settings, "DELETE FROM search_outbox")
        assert _row_ids(database_url) == fresh and _vector_ids(tmp_path) == old_ids

        config.write_text(base_config + "\n[search]\npoll_seconds = 0.2\n")
        with serve_subprocess(tmp_path, env, free_port(), "restart.log"):
            wait_for(lambda: _vector_ids(tmp_path) == _row_ids(database_url), timeout=60)
        assert _vector_ids(tmp_path) == fresh
        assert rows(database_url, "SELECT count(*) AS n FROM search_outbox")[0]["n"] == 0


def _execute(settings: Settings, statement: str, **params: Any) -> None:
    """A write with parley's own engine (SQLite foreign keys on: the delete cascades)."""
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def _first(database_url: str) -> int:
    [row] = rows(database_url, "SELECT min(id) AS id FROM conversations")
    return int(row["id"])
