"""The indexer: drains the search outbox into the vector store, off the hot path.

A background task of the server (``start`` / ``stop`` in the app's lifespan) and the
engine of ``parley reindex``. Each batch reads up to ``batch_size`` outbox rows, looks the
items up as they are now, embeds the texts of those that exist (in a worker thread or
through the gateway), writes or deletes their vectors, and only then removes the outbox
rows it read, in one transaction that also marks fully indexed documents ``indexed``.
Invariants:

- a crash anywhere leaves the outbox rows in place: the batch runs again and, writes being
  idempotent, changes nothing twice; rows queued meanwhile are never removed unread;
- so does a vector store that cannot be read or written (``VectorStoreUnusable``: files
  damaged or missing, a disk or permission refusing): the indexer logs it in one line,
  without a traceback, at each retry (the pause growing to ``MAX_BACKOFF``), and never
  empties a store it could not read; ``parley reindex --full`` rebuilds it;
- ``stop`` does not wait for embeddings (the local model's batch took up to its 10 s
  grace, and the server's stop with it): a batch still being embedded is given up and its
  rows stay queued for the next start, while one writing its vectors and removing its
  rows (threads, which a cancellation would not stop) finishes first;
- nothing waits on it: requests commit messages (and their outbox rows) and return;
- a poison item never blocks the outbox: when a batch fails to embed, its items are
  embedded one by one. If every one fails the failure is taken as transient (the upstream
  is down...): everything stays queued and the batch is retried with a growing pause. If
  some succeed, those are written and the refused ones are taken as permanent: a message
  leaves the outbox with one log line (``parley reindex`` queues it again), a chunk
  leaves it and marks its document ``failed`` with the reason;
- without an embedder the outbox is still drained (vectors of deleted items are deleted,
  nothing is embedded, and only the ids of what still exists are read, not the texts),
  so it never grows without bound, but once per poll pause in
  batches of up to ``IDLE_BATCH`` rows: nothing is waiting on it, and under gateway load
  a pass per 64 rows cost ~50 us of CPU per request (and a commit that made the exchange
  writer re-read its rollup rows); ``reconcile`` queues what is missing once an embedder
  is configured;
- ``reconcile`` makes the store hold a vector for every indexable message and every chunk
  and for nothing else: vectors without rows are deleted, rows without vectors queued.
  The vector ids are read before the rows, so a row indexed meanwhile is at worst queued
  again, never taken for an orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import sqlalchemy

from parley.errors import VectorStoreUnusable
from parley.search.embedders import Embedder
from parley.search.vector_rows import ChunkVector, MessageVector
from parley.search.vectors import VectorStore
from parley.store import outbox
from parley.store.documents import mark_failed, mark_indexed
from parley.store.engine import writer_connection

log = logging.getLogger(__name__)
T = TypeVar("T")

# After a failed batch (an upstream embedder down...), the pause doubles up to this.
MAX_BACKOFF = 60.0
# Outbox rows per batch without an embedder (see the module docstring).
IDLE_BATCH = 2000


@dataclass(frozen=True, slots=True)
class Reconciled:
    messages_queued: int
    messages_deleted: int
    chunks_queued: int
    chunks_deleted: int


class Indexer:
    def __init__(
        self,
        engine: sqlalchemy.Engine,
        vectors: VectorStore,
        embedder: Embedder | None,
        *,
        batch_size: int = 64,
        poll_seconds: float = 1.0,
        ann_min_rows: int = 100_000,
        reconcile_on_start: bool = False,
    ) -> None:
        self.engine = engine
        self.vectors = vectors
        self.embedder = embedder
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.ann_min_rows = ann_min_rows
        self.reconcile_on_start = reconcile_on_start
        self.indexed = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        # Set by ``stop``: a batch waiting on its embeddings gives up.
        self._halt = asyncio.Event()

    # -- the background task ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="search-indexer")

    def wake(self) -> None:
        """Run the next batch now rather than after the poll pause."""
        self._wake.set()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop now: a batch being embedded is given up (its rows stay queued), one being
        written finishes; after ``grace`` seconds the task is cancelled whatever it does."""
        self._stopping = True
        self._halt.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            log.warning("search indexer: stopped in the middle of a batch (it runs again)")
        self._task = None

    async def _run(self) -> None:
        backoff = self.poll_seconds
        ready = False
        while not self._stopping:
            try:
                if not ready:
                    await self.prepare()
                    if self._stopping:
                        break
                    if self.reconcile_on_start:
                        done = await self.reconcile()
                        log.info("search reconcile on start: %s", done)
                    ready = True
                handled = await self.batch()
                backoff = self.poll_seconds
            except Exception as exc:
                self.failures += 1
                if isinstance(exc, VectorStoreUnusable):
                    # The operator's to fix (or ``reindex --full``), said in one line; the
                    # outbox keeps its rows.
                    log.error("search indexer: %s; retrying in %.0f s", exc.message, backoff)
                else:
                    log.exception("search indexer: batch failed; retrying in %.0f s", backoff)
                handled = 0
                await self._pause(backoff)
                backoff = min(MAX_BACKOFF, max(backoff, 0.5) * 2)
                continue
            if handled == 0 or (self.embedder is None and handled < self._limit):
                await self._pause(self.poll_seconds)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    # -- steps (also used by ``parley reindex`` and tests) -------------------------------

    async def prepare(self, *, full: bool = False) -> bool:
        """Make the vector store hold the embedder's model (emptied when it held another's,
        or when ``full``, even one whose files are damaged); return whether it was emptied.
        A remote model's dimension is learnt from one small request."""
        if self.embedder is None:
            return False
        if self.embedder.dimension is None:
            probed = await self._unless_halted(self.embedder.embed(["dimension"]))
            if probed is None:
                return False  # stopping
        dimension = self.embedder.dimension
        assert dimension is not None
        model = self.embedder.model
        if full:
            await asyncio.to_thread(self.vectors.clear)
        emptied = await asyncio.to_thread(self.vectors.prepare, model, dimension)
        if emptied:
            log.info("vector store prepared for %s (%d dimensions)", model, dimension)
        return emptied

    @property
    def _limit(self) -> int:
        """Outbox rows per batch: fewer, larger passes when nothing is embedded."""
        return self.batch_size if self.embedder is not None else max(self.batch_size, IDLE_BATCH)

    async def run_once(self) -> int:
        """Batches until the outbox is empty; the number of items handled."""
        total = 0
        while handled := await self.batch():
            total += handled
        return total

    async def batch(self) -> int:
        """Handle one batch of the outbox; the number of outbox rows handled."""
        queued = await asyncio.to_thread(self._pending)
        if not queued:
            return 0
        message_ids = {q.item_id for q in queued if q.kind == outbox.MESSAGE}
        chunk_ids = {q.item_id for q in queued if q.kind == outbox.CHUNK}
        if self.embedder is None:
            # Nothing to embed: only which items are gone matters, not their texts.
            messages: list[outbox.MessageRow] = []
            kept_messages, chunks = await asyncio.to_thread(self._kept, message_ids, chunk_ids)
        else:
            messages, chunks = await asyncio.to_thread(self._rows, message_ids, chunk_ids)
            kept_messages = {m.id for m in messages}
        indexed_documents: set[int] = set()
        # Items the embedder refused on their own: their outbox rows go, as do any vectors
        # they had (of an earlier text); reconcile queues them again.
        refused_messages: dict[int, str] = {}
        refused_chunks: set[int] = set()
        failed_documents: dict[int, str] = {}
        written = len(messages) + len(chunks)
        if self.embedder is not None:
            if self.vectors.model != self.embedder.model:
                await self.prepare()
            texts = [m.content for m in messages] + [c.content for c in chunks]
            embedded = await self._unless_halted(_embed(self.embedder, texts))
            if embedded is None:
                return 0  # stopping: the batch stays queued
            model = self.embedder.model
            message_vectors: list[MessageVector] = []
            for m, vector in zip(messages, embedded, strict=False):
                if isinstance(vector, Refused):
                    refused_messages[m.id] = vector.reason
                    continue
                message_vectors.append(
                    MessageVector(
                        id=m.id,
                        user_id=m.user_id,
                        conversation_id=m.conversation_id,
                        role=m.role,
                        text=m.content,
                        created_at=m.created_at,
                        metadata=orjson.dumps(
                            {"message": m.public_id, "conversation": m.conversation_public_id}
                        ).decode(),
                        vector=vector,
                    )
                )
            chunk_vectors: list[ChunkVector] = []
            for c, vector in zip(chunks, embedded[len(messages) :], strict=True):
                if isinstance(vector, Refused):
                    refused_chunks.add(c.id)
                    failed_documents.setdefault(c.document_id, vector.reason)
                    continue
                chunk_vectors.append(
                    ChunkVector(
                        id=c.id,
                        document_id=c.document_id,
                        user_id=c.user_id,
                        conversation_id=c.conversation_id,
                        collection=c.collection,
                        page=c.page,
                        ordinal=c.ordinal,
                        text=c.content,
                        created_at=c.created_at,
                        metadata=orjson.dumps({"filename": c.filename}).decode(),
                        vector=vector,
                    )
                )
            await asyncio.to_thread(self._write, model, message_vectors, chunk_vectors)
            indexed_documents = {c.document_id for c in chunks} - failed_documents.keys()
            written = len(message_vectors) + len(chunk_vectors)
        gone_messages = (message_ids - kept_messages) | set(refused_messages)
        gone_chunks = (chunk_ids - {c.id for c in chunks}) | refused_chunks
        await asyncio.to_thread(self._delete, gone_messages, gone_chunks)
        await asyncio.to_thread(
            self._done, [q.id for q in queued], indexed_documents, failed_documents
        )
        for message_id, reason in refused_messages.items():
            log.warning(
                "search indexer: message %d dropped from the outbox, the embedder refused "
                "it (parley reindex queues it again): %s",
                message_id,
                reason,
            )
        for document_id, reason in failed_documents.items():
            log.warning(
                "search indexer: document %d failed, the embedder refused a chunk: %s",
                document_id,
                reason,
            )
        self.indexed += written
        return len(queued)

    async def _unless_halted(self, work: Coroutine[Any, Any, T]) -> T | None:
        """``work``'s result, or None when ``stop`` comes first (``work`` is then cancelled
        and waited for: a remote call still records its attempt)."""
        task = asyncio.ensure_future(work)
        halted = asyncio.ensure_future(self._halt.wait())
        try:
            await asyncio.wait({task, halted}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            halted.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # its end, not its outcome: the batch is given up
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it as forgotten
        return None

    async def reconcile(self) -> Reconciled:
        """Queue the rows without vectors, delete the vectors without rows."""
        return await asyncio.to_thread(self.reconcile_sync)

    def reconcile_sync(self) -> Reconciled:
        if self.embedder is None or self.vectors.model != self.embedder.model:
            # No vectors can be written: only what would be orphaned is worth dropping.
            with self.engine.connect() as conn:
                has_messages, has_chunks = outbox.message_ids(conn), outbox.chunk_ids(conn)
            extra_m = self.vectors.message_ids() - has_messages
            extra_c = self.vectors.chunk_ids() - has_chunks
            self._delete(extra_m, extra_c)
            return Reconciled(0, len(extra_m), 0, len(extra_c))
        # Vector ids first (see the module docstring).
        have_messages = self.vectors.message_ids()
        have_chunks = self.vectors.chunk_ids()
        with self.engine.connect() as conn, conn.begin():
            rows_m, rows_c = outbox.message_ids(conn), outbox.chunk_ids(conn)
            queued_m = outbox.queued_items(conn, outbox.MESSAGE)
            queued_c = outbox.queued_items(conn, outbox.CHUNK)
        missing_m = rows_m - have_messages - queued_m
        missing_c = rows_c - have_chunks - queued_c
        extra_m, extra_c = have_messages - rows_m, have_chunks - rows_c
        self._delete(extra_m, extra_c)
        if missing_m or missing_c:
            with writer_connection(self.engine) as conn, conn.begin():
                outbox.queue(conn, outbox.MESSAGE, missing_m)
                outbox.queue(conn, outbox.CHUNK, missing_c)
        return Reconciled(len(missing_m), len(extra_m), len(missing_c), len(extra_c))

    # -- blocking parts --------------------------------------------------------------------

    def _pending(self) -> list[outbox.Queued]:
        with self.engine.connect() as conn:
            return outbox.pending(conn, self._limit)

    def _rows(
        self, message_ids: Collection[int], chunk_ids: Collection[int]
    ) -> tuple[list[outbox.MessageRow], list[outbox.ChunkRow]]:
        with self.engine.connect() as conn:
            return outbox.message_rows(conn, message_ids), outbox.chunk_rows(conn, chunk_ids)

    def _kept(
        self, message_ids: Collection[int], chunk_ids: Collection[int]
    ) -> tuple[set[int], list[outbox.ChunkRow]]:
        """``_rows`` without the messages' texts: the ids of those still indexable."""
        with self.engine.connect() as conn:
            kept = outbox.indexable_message_ids(conn, message_ids)
            return kept, outbox.chunk_rows(conn, chunk_ids)

    def _write(self, model: str, messages: list[MessageVector], chunks: list[ChunkVector]) -> None:
        self.vectors.upsert_messages(model, messages)
        self.vectors.upsert_chunks(model, chunks)
        if messages or chunks:
            for name in ("messages", "chunks"):
                if self.vectors.ensure_index(name, self.ann_min_rows):
                    log.info("vector store: ANN index built on %s", name)

    def _delete(self, message_ids: Collection[int], chunk_ids: Collection[int]) -> None:
        self.vectors.delete_messages(message_ids)
        self.vectors.delete_chunks(chunk_ids)

    def _done(
        self,
        outbox_ids: list[int],
        indexed_documents: Collection[int],
        failed_documents: Mapping[int, str],
    ) -> None:
        with writer_connection(self.engine) as conn, conn.begin():
            outbox.remove(conn, outbox_ids)
            for document_id, reason in failed_documents.items():
                mark_failed(conn, [document_id], reason)
            mark_indexed(conn, indexed_documents)


@dataclass(frozen=True, slots=True)
class Refused:
    """A text the embedder refused on its own while it embedded others (for good)."""

    reason: str


async def _embed(embedder: Embedder, texts: Sequence[str]) -> list[list[float] | Refused]:
    """One vector per text, or ``Refused`` for those refused while others were embedded.

    A failed batch is tried again one text at a time, so one poison text cannot hold up the
    others; when every text fails, nothing singles one out (the upstream is down, the
    model gone...): the last error is raised and the batch is retried later as a whole.
    """
    try:
        return list(await embedder.embed(texts))
    except Exception as exc:
        if len(texts) < 2:
            raise
        log.warning(
            "search indexer: a batch of %d texts failed (%s); embedding them one by one",
            len(texts),
            _reason(exc),
        )
    out: list[list[float] | Refused] = []
    last: Exception | None = None
    for text in texts:
        try:
            out.append(await embedder.embed_query(text))
        except Exception as exc:
            last = exc
            out.append(Refused(_reason(exc)))
    if last is not None and all(isinstance(item, Refused) for item in out):
        raise last
    return out


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__
