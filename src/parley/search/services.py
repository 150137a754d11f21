"""What the server and the commands build for semantic search: one embedder, one vector
store, one indexer, one searcher (``SearchServices``), from settings.

The local model takes seconds to load and the vector store opens a directory: build this
once per process (the server's lifespan, a command) and pass it on. ``remote`` is how a
remote embedder reaches the gateway (the server passes its own; see ``search.embedders``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy

from parley.search.embedders import Embedder, IsolatedEmbedder, RemoteCall, load_embedder
from parley.search.hybrid import SemanticSearch
from parley.search.indexer import Indexer
from parley.search.vectors import VectorStore
from parley.settings import Settings


@dataclass(slots=True)
class SearchServices:
    # None: semantic search and RAG are unavailable (keyword search still works).
    embedder: Embedder | None
    vectors: VectorStore
    indexer: Indexer
    searcher: SemanticSearch


def open_search(
    settings: Settings,
    engine: sqlalchemy.Engine,
    *,
    remote: RemoteCall | None = None,
    embedder: Embedder | None = None,
    isolated: bool = False,
) -> SearchServices:
    """Build the search services (``embedder``: one already loaded, e.g. by a test;
    ``isolated``: a local model runs in a child process, see ``search.embedders``)."""
    if embedder is None:
        embedder = load_embedder(settings, remote, isolated=isolated)
    vectors = VectorStore.open(settings.vector_uri)
    indexer = Indexer(
        engine,
        vectors,
        embedder,
        batch_size=settings.search.batch_size,
        poll_seconds=settings.search.poll_seconds,
        ann_min_rows=settings.search.ann_min_rows,
        reconcile_on_start=settings.search.reconcile_on_start,
    )
    return SearchServices(embedder, vectors, indexer, SemanticSearch(engine, vectors, embedder))


def close_search(services: SearchServices) -> None:
    """Release what ``open_search`` started: an isolated embedder's child process."""
    if isinstance(services.embedder, IsolatedEmbedder):
        services.embedder.close()
