"""Semantic and hybrid search through the running server and the commands, with the real
local model: the indexer started in the lifespan embeds committed messages in the
background, ``GET /api/search`` answers hybrid by default, ``parley reindex`` reconciles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from aiohttp import web
from click.testing import CliRunner

from parley.cli.main import cli
from parley.ops.migrate import upgrade
from parley.search.embedders import LocalEmbedder
from parley.search.vectors import VectorStore
from parley.server.app import create_app
from parley.server.identity import LOCAL
from parley.settings import Settings
from parley.store.conversations import Conversations
from parley.store.engine import create_engine
from tests.harness import ParleyServer, rows, settings_for, wait_for
from tests.store.test_conversations import new, say


class _Server(ParleyServer):
    """The harness server with the session's model instead of a fresh load."""

    def __init__(self, settings: Settings, embedder: LocalEmbedder) -> None:
        super().__init__(settings)
        self.embedder = embedder

    async def _start(self) -> None:
        self.app = create_app(self.settings, embedder=self.embedder)
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])


def _seed(settings: Settings) -> Any:
    upgrade(settings)
    engine = create_engine(settings)
    try:
        store = Conversations(engine)
        conv = new(store, LOCAL)
        say(store, conv, "My cat keeps scratching the sofa", LOCAL)
        say(store, conv, "Quarterly revenue grew by eight percent", LOCAL)
        return conv
    finally:
        engine.dispose()


def test_the_server_indexes_in_the_background_and_searches_hybrid(
    tmp_path: Path, database_url: str, local_embedder: LocalEmbedder
) -> None:
    settings = settings_for(
        tmp_path, database_url, PARLEY_SEARCH_EMBEDDER="local", PARLEY_LOG_LEVEL="WARNING"
    )
    conv = _seed(settings)
    with _Server(settings, local_embedder) as server:
        queued = "SELECT count(*) AS n FROM search_outbox"
        wait_for(lambda: rows(database_url, queued)[0]["n"] == 0, timeout=30)
        url = f"{server.root}/api/search"
        reply = httpx.get(url, params={"q": "feline ruining the couch"}, timeout=30)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["mode"] == "hybrid" and "notice" not in body
        top = body["data"][0]
        assert top["snippet"] == "My cat keeps scratching the sofa"
        assert top["conversation_id"] == str(conv.public_id) and top["type"] == "message"
        semantic = httpx.get(url, params={"q": "company earnings", "mode": "semantic"}, timeout=30)
        assert semantic.json()["data"][0]["snippet"].startswith("Quarterly revenue")
        # Bad input is the same clear 400 in every mode.
        for mode in ("semantic", "hybrid"):
            empty = httpx.get(url, params={"q": " ", "mode": mode}, timeout=30)
            assert empty.status_code == 400
            assert empty.json()["error"]["param"] == "q"
        long = httpx.get(url, params={"q": "x" * 5000, "mode": "semantic"}, timeout=30)
        assert long.status_code == 400 and "the limit is 1000" in long.json()["error"]["message"]
        # Deleting the conversation deletes its vectors (through the outbox).
        deleted = httpx.delete(f"{server.root}/api/conversations/{conv.public_id}", timeout=30)
        assert deleted.status_code == 204
        wait_for(lambda: rows(database_url, queued)[0]["n"] == 0, timeout=30)
        wait_for(lambda: VectorStore.open(settings.vector_uri).message_ids() == set(), timeout=10)
        gone = httpx.get(url, params={"q": "cat sofa", "mode": "semantic"}, timeout=30)
        assert gone.json()["data"] == []


def test_reindex_command_reconciles(tmp_path: Path, database_url: str) -> None:
    env = {
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": database_url,
        "PARLEY_SEARCH_EMBEDDER": "local",
    }
    settings = settings_for(tmp_path, database_url, PARLEY_SEARCH_EMBEDDER="local")
    _seed(settings)
    runner = CliRunner()
    first = runner.invoke(cli, ["reindex"], env=env)
    assert first.exit_code == 0, first.output
    assert "2 outbox item(s) handled" in first.output
    assert len(VectorStore.open(settings.vector_uri).message_ids()) == 2
    found = runner.invoke(
        cli, ["search", "feline on the couch", "--mode", "semantic", "--json"], env=env
    )
    assert found.exit_code == 0, found.output
    assert orjson.loads(found.output)[0]["snippet"] == "My cat keeps scratching the sofa"
    again = runner.invoke(cli, ["reindex", "--full"], env=env)
    assert again.exit_code == 0 and "emptied" in again.output, again.output
    assert "2 message(s) and 0 chunk(s) without a vector queued" in again.output
    none = runner.invoke(cli, ["reindex"], env={**env, "PARLEY_SEARCH_EMBEDDER": "none"})
    assert none.exit_code == 1 and "no embedder" in none.output
