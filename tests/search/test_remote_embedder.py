"""The remote embedder through a running server: an OpenAI-compatible embeddings model of
the gateway's own providers (``[search] embedder = "remote"``), served by the fake
upstream over real HTTP. The fake derives a vector from the text, so a query equal to a
message's text finds that message first.

Also the poison rule of the indexer: a text the model refuses is dropped (a message) or
fails its document (a chunk) while the rest of its batch is indexed; a batch of which
nothing can be embedded stays queued."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lancedb
import pytest

from parley.errors import VectorStoreUnusable
from parley.ops.migrate import upgrade
from parley.search.documents import ChunkText
from parley.search.embedders import RemoteEmbedder
from parley.search.indexer import Indexer
from parley.search.vectors import VectorStore
from parley.server.identity import LOCAL
from parley.server.state import SERVICES
from parley.settings import Settings
from parley.store import documents as repo
from parley.store.conversations import Conversations
from parley.store.documents import Place
from parley.store.engine import create_engine, writer_connection
from tests.fakes.openai_upstream import REFUSE_EMBEDDING, FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config
from tests.store.test_conversations import new, say

CAT = "My cat keeps scratching the sofa"
REVENUE = "Quarterly revenue grew by eight percent"
TRAIN = "The train to Lyon leaves at nine"
QUEUED = "SELECT count(*) AS n FROM search_outbox"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def _configure(tmp_path: Path, database_url: str, upstream: FakeOpenAI, model: str) -> Settings:
    """A config file whose ``[search]`` table picks the remote ``model``."""
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "models": ["text-embedding-3-small", "embed-16"],
                "list_models": False,
            }
        ],
        aliases={"wide": ["up/embed-16"]},
        extra=(
            "[retry]\nattempts = 1\n"
            f'[search]\nembedder = "remote"\nmodel = "{model}"\npoll_seconds = 0.05\n'
        ),
    )
    # The harness turns the embedder off through the environment; "" leaves it to the file.
    return settings_for(
        tmp_path, database_url, PARLEY_SEARCH_EMBEDDER="", PARLEY_LOG_LEVEL="WARNING"
    )


def _seed(settings: Settings, *texts: str) -> Any:
    upgrade(settings)
    engine = create_engine(settings)
    try:
        store = Conversations(engine)
        conv = new(store, LOCAL)
        for text in texts:
            say(store, conv, text, LOCAL)
        return conv
    finally:
        engine.dispose()


def _message_ids(database_url: str, *texts: str) -> set[int]:
    found = rows(database_url, "SELECT id, content FROM messages")
    return {r["id"] for r in found if r["content"] in texts}


def _vector_sizes(settings: Settings) -> set[int]:
    table = lancedb.connect(settings.vector_uri).open_table("messages")
    return {len(v) for v in table.to_arrow().column("vector").to_pylist()}


def _embedded(upstream: FakeOpenAI, model: str) -> list[str]:
    """Every text the fake was asked to embed with ``model``, in order."""
    return [
        text
        for path, _, body in upstream.received
        if path == "/v1/embeddings" and body["model"] == model
        for text in body["input"]
    ]


def _drained(database_url: str) -> bool:
    return bool(rows(database_url, QUEUED)[0]["n"] == 0)


def test_messages_are_embedded_through_the_upstream_and_found_by_their_text(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    settings = _configure(tmp_path, database_url, upstream, "up/text-embedding-3-small")
    conv = _seed(settings, CAT, REVENUE, TRAIN)
    everything = _message_ids(database_url, CAT, REVENUE, TRAIN)
    with ParleyServer(settings) as server:
        wait_for(lambda: _drained(database_url), timeout=30)
        wait_for(lambda: VectorStore.open(settings.vector_uri).message_ids() == everything)
        store = VectorStore.open(settings.vector_uri)
        # The model and the dimension learnt from its first answer are stored with them.
        assert (store.model, store.dimension) == ("remote/up/text-embedding-3-small", 8)
        assert _vector_sizes(settings) == {8}
        assert {CAT, REVENUE, TRAIN} <= set(_embedded(upstream, "text-embedding-3-small"))
        url = f"{server.root}/api/search"
        for text in (REVENUE, TRAIN):
            reply = httpx.get(url, params={"q": text, "mode": "semantic"}, timeout=30)
            assert reply.status_code == 200, reply.text
            top = reply.json()["data"][0]
            assert top["snippet"] == text and top["conversation_id"] == str(conv.public_id)
            assert top["score"] == pytest.approx(1.0)
        # Every embeddings request (batches and the search queries) is in the request log.
        texts = len(_embedded(upstream, "text-embedding-3-small"))
        logged = "SELECT * FROM request_log WHERE endpoint = 'embeddings' ORDER BY id"
        wait_for(lambda: len(rows(database_url, logged)) == len(upstream.received), timeout=10)
    log = rows(database_url, logged)
    assert texts >= 5 and len(log) == len(upstream.received)
    assert {(r["provider"], r["model_requested"], r["success"]) for r in log} == {
        ("up", "up/text-embedding-3-small", True)
    }
    assert {r["origin"] for r in log} == {"search-indexer"}


def test_changing_the_remote_model_empties_the_store_and_embeds_everything_again(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    settings = _configure(tmp_path, database_url, upstream, "up/text-embedding-3-small")
    _seed(settings, CAT, REVENUE)
    everything = _message_ids(database_url, CAT, REVENUE)
    with ParleyServer(settings):
        wait_for(lambda: VectorStore.open(settings.vector_uri).message_ids() == everything)
    assert VectorStore.open(settings.vector_uri).dimension == 8
    # The alias "wide" names another model, of 16 dimensions.
    settings = _configure(tmp_path, database_url, upstream, "wide")
    upstream.clear()
    with ParleyServer(settings) as server:

        def switched() -> bool:
            # The store is read on first use (the model, then the ids), not at open.
            store = VectorStore.open(settings.vector_uri)
            try:
                return store.model == "remote/wide" and store.message_ids() == everything
            except VectorStoreUnusable as exc:
                # This process read a table while the server was replacing it (LanceDB:
                # a data file "Not found"); the next poll reads the new one.
                if "Not found" in exc.cause:
                    return False
                raise

        wait_for(switched, timeout=30)
        wait_for(lambda: _drained(database_url), timeout=30)
        store = VectorStore.open(settings.vector_uri)
        assert store.dimension == 16 and _vector_sizes(settings) == {16}
        # Every message went to the new model; none to the old one.
        assert {CAT, REVENUE} <= set(_embedded(upstream, "embed-16"))
        assert _embedded(upstream, "text-embedding-3-small") == []
        reply = httpx.get(
            f"{server.root}/api/search", params={"q": CAT, "mode": "semantic"}, timeout=30
        )
        assert reply.json()["data"][0]["snippet"] == CAT


def _document(settings: Settings, filename: str, *contents: str) -> repo.DocumentRow:
    engine = create_engine(settings)
    try:
        with writer_connection(engine) as conn, conn.begin():
            return repo.insert_document(
                conn,
                Place(user_id=None, collection="notes"),
                filename=filename,
                mime_type="text/plain",
                size=sum(len(c) for c in contents),
                sha256=filename.encode().hex().ljust(64, "0")[:64],
                page_count=None,
                chunks=[ChunkText(i, None, c) for i, c in enumerate(contents)],
            )
    finally:
        engine.dispose()


def _status(database_url: str, document: repo.DocumentRow) -> tuple[str, str | None]:
    [row] = rows(database_url, "SELECT status, error FROM documents WHERE id = :id", id=document.id)
    return row["status"], row["error"]


def test_a_text_the_model_refuses_does_not_block_the_others(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _configure(tmp_path, database_url, upstream, "up/text-embedding-3-small")
    poison = (f"{REFUSE_EMBEDDING} one", f"{REFUSE_EMBEDDING} two")
    conv = _seed(settings, *poison)
    # Nothing of the batch can be embedded: that looks like an outage, so all stays queued.
    with ParleyServer(settings) as server:
        assert server.app is not None
        search = server.app[SERVICES].search
        assert search is not None
        wait_for(lambda: search.indexer.failures >= 2, timeout=30)
        assert rows(database_url, QUEUED)[0]["n"] == 2
        assert VectorStore.open(settings.vector_uri).message_ids() == set()
    # Once the batch holds texts the model takes, the refused ones are dropped for good.
    engine = create_engine(settings)
    try:
        store = Conversations(engine)
        say(store, conv, CAT, LOCAL)
        say(store, conv, REVENUE, LOCAL)
    finally:
        engine.dispose()
    bad = _document(settings, "bad.txt", "A fine first chunk.", f"{REFUSE_EMBEDDING} chunk")
    good = _document(settings, "good.txt", "The lighthouse keeper's log.")
    caplog.set_level(logging.WARNING, logger="parley.search.indexer")
    with ParleyServer(settings) as server:
        wait_for(lambda: _drained(database_url), timeout=30)
        wait_for(lambda: _status(database_url, good)[0] == repo.INDEXED, timeout=10)
        store = VectorStore.open(settings.vector_uri)
        assert store.message_ids() == _message_ids(database_url, CAT, REVENUE)
        status, error = _status(database_url, bad)
        assert status == repo.FAILED
        assert error is not None and "cannot be embedded" in error
        reply = httpx.get(
            f"{server.root}/api/search", params={"q": REVENUE, "mode": "semantic"}, timeout=30
        )
        assert reply.json()["data"][0]["snippet"] == REVENUE
    dropped = [r.getMessage() for r in caplog.records]
    dropped = [line for line in dropped if "dropped from the outbox" in line]
    assert len(dropped) == 2 and all("parley reindex" in line for line in dropped)
    # Not forgotten: a reconcile (``parley reindex``, the next start) queues them again.
    engine = create_engine(settings)
    try:
        embedder = RemoteEmbedder("up/text-embedding-3-small", _never_called)
        indexer = Indexer(engine, VectorStore.open(settings.vector_uri), embedder)
        assert indexer.reconcile_sync().messages_queued == 2
    finally:
        engine.dispose()
    queued = {r["item_id"] for r in rows(database_url, "SELECT item_id FROM search_outbox")}
    assert queued == _message_ids(database_url, *poison)


async def _never_called(texts: list[str]) -> list[list[float]]:
    raise AssertionError("a reconcile embeds nothing")
