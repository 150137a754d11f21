"""The vector store: LanceDB tables of message and document-chunk embeddings.

Layout (one LanceDB database at ``settings.vector_uri``: a directory under the data
directory by default, or any LanceDB URI such as ``s3://bucket/path``):

- ``messages``: ``id`` (``messages.id``), ``user_id``, ``conversation_id``, ``role``,
  ``text``, ``created_at``, ``metadata`` (JSON text), ``vector``;
- ``chunks``: ``id`` (``document_chunks.id``), ``document_id``, ``user_id``,
  ``conversation_id``, ``collection``, ``page``, ``ordinal``, ``text``, ``created_at``,
  ``metadata``, ``vector``;
- ``meta``: one row, the ``model`` and ``dimension`` of every vector in the two tables.

Invariants:

- never mixed vectors: ``prepare(model, dimension)`` compares with ``meta``; another model
  (or none yet) drops both tables and starts empty, and writes or searches for a model
  other than the prepared one are refused (``reconcile`` then re-embeds every row);
- a store that cannot be read is never taken for an empty one: every public method raises
  LanceDB's (and the system's) errors about it as ``VectorStoreUnusable``
  (``vector_errors``), ``meta`` without both other tables is one, and ``prepare`` empties
  nothing it could not read; only ``clear`` (``parley reindex --full``) drops tables whose
  files are damaged;
- the owner filter is inside the vector query (a LanceDB prefilter ``where``), never
  applied to its results: a search ranks only the rows its caller may see ("no owner",
  the local admin's, is stored as ``LOCAL_OWNER``: see ``vector_rows``);
- distances are cosine; a hit's ``score`` is the cosine similarity (1 - distance);
- an ANN index (IVF-PQ) is built once a table holds ``ann_min_rows`` vectors; below that
  the search is exact. ``optimize`` (the maintenance hook) compacts, folds new rows into
  the index and drops old versions;
- a deleted row is only marked deleted until ``optimize``; after it, no file under the
  store holds it (nor the old copy of a row written again): a table still marking
  deleted rows is written anew, and every version but the latest is removed with its
  files;
- writes are idempotent (``merge_insert`` on ``id``; deleting an absent id is a no-op),
  so an outbox batch replayed after a crash changes nothing;
- every write of a local store holds a shared ``flock`` on ``<store>.lock`` (beside its
  directory), and ``vector_lock.frozen`` an exclusive one: a backup copies one version
  of the files, never a manifest naming a deletion or index file written after the copy
  passed it. ``optimize`` holds the exclusive one too while it rewrites a table or
  removes files.

Opening is free: LanceDB (seconds to import) is imported and connected on first use, and
a local store that was never created reads as empty without either, so a process that
never searches semantically (no embedder) never pays for it.

Every method blocks: call it through ``asyncio.to_thread`` from the event loop.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parley.search.vector_errors import missing_table, translated
from parley.search.vector_lock import local_path, store_lock
from parley.search.vector_rows import (
    NONE,
    ChunkHit,
    ChunkVector,
    MessageHit,
    MessageVector,
    arrow,
    chunk_row,
    chunk_schema,
    message_row,
    message_schema,
    meta_schema,
    owner,
)

if TYPE_CHECKING:
    import pyarrow as pa

MESSAGES = "messages"
CHUNKS = "chunks"
META = "meta"
# Vectors read per query from a quantised index before the exact re-rank.
_REFINE = 4
# Another process (``parley reindex``, a second server) may write: reads look for a newer
# version at most this often.
_CONSISTENCY = timedelta(seconds=1)
# How long ``optimize`` waits before it removes old versions: a reader may use one for up
# to ``_CONSISTENCY`` after it stopped being the latest, plus its query's time.
_SETTLE = _CONSISTENCY + timedelta(seconds=0.5)
# Old versions a maintenance run keeps while other writers may still commit.
_KEEP = timedelta(minutes=1)
# Rows ``_rewrite`` writes per commit (read into memory at once).
_PURGE_ROWS = 50_000


class ModelMismatch(Exception):
    """A write or search for a model the store was not prepared for."""


class VectorStore:
    """The LanceDB tables of one parley installation."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._db: Any = None  # the LanceDB connection, made on first use
        self._connecting = threading.Lock()
        self._lock = threading.Lock()
        self._tables: dict[str, Any] = {}
        # (model, dimension) as read from ``meta`` on first use, then kept up to date.
        self._meta: tuple[str | None, int | None] | None = None

    @classmethod
    def open(cls, uri: str) -> VectorStore:
        """The store at ``uri``; nothing is read or connected until it is used."""
        return cls(uri)

    @property
    @translated
    def model(self) -> str | None:
        return self._known()[0]

    @property
    @translated
    def dimension(self) -> int | None:
        return self._known()[1]

    # -- model ---------------------------------------------------------------------------

    @translated
    def prepare(self, model: str, dimension: int) -> bool:
        """Make the store hold ``model``'s vectors; return True when it was emptied for it
        (a new store, or one that held another model's: every row must be embedded)."""
        with self._writing():
            self._read_meta()
            if self.model == model and self.dimension == dimension:
                return False
            self._drop()
            db = self._connection()
            db.create_table(MESSAGES, schema=message_schema(dimension))
            db.create_table(CHUNKS, schema=chunk_schema(dimension))
            # Last: a crash before it leaves no meta, and the next start drops again.
            meta = db.create_table(META, schema=meta_schema())
            meta.add(arrow([{"model": model, "dimension": dimension}], meta_schema()))
            self._meta = (model, dimension)
            return True

    @translated
    def clear(self) -> None:
        """Drop the store's tables, whatever state their files are in (``parley reindex
        --full``: a damaged store is rebuilt); the next ``prepare`` creates them anew."""
        with self._writing():
            self._drop()

    def _drop(self) -> None:
        # ``meta`` first: a store with ``meta`` but not both other tables is damaged (see
        # ``_read_meta``), never one that a crash stopped halfway through a drop.
        names = self._names()
        for name in (META, MESSAGES, CHUNKS):
            if name in names:
                self._connection().drop_table(name)
        self._tables.clear()
        self._meta = (None, None)

    def check(self, model: str) -> None:
        if self.model != model:
            raise ModelMismatch(
                f"the vector store holds {self.model or 'no'} vectors, not {model}'s"
            )

    # -- writes --------------------------------------------------------------------------

    @translated
    def upsert_messages(self, model: str, rows: Sequence[MessageVector]) -> None:
        self.check(model)
        if rows:
            data = [message_row(row) for row in rows]
            self._merge(MESSAGES, arrow(data, self._schema(MESSAGES)))

    @translated
    def upsert_chunks(self, model: str, rows: Sequence[ChunkVector]) -> None:
        self.check(model)
        if rows:
            data = [chunk_row(row) for row in rows]
            self._merge(CHUNKS, arrow(data, self._schema(CHUNKS)))

    @translated
    def delete_messages(self, ids: Iterable[int]) -> None:
        self._delete(MESSAGES, ids)

    @translated
    def delete_chunks(self, ids: Iterable[int]) -> None:
        self._delete(CHUNKS, ids)

    def _merge(self, name: str, data: pa.Table) -> None:
        with self._writing():
            table = self._table(name)
            merge = table.merge_insert("id").when_matched_update_all()
            merge.when_not_matched_insert_all().execute(data)

    def _delete(self, name: str, ids: Iterable[int]) -> None:
        wanted = sorted({int(i) for i in ids})
        if not wanted or self.model is None:
            return
        with self._writing():
            table = self._table(name)
            for start in range(0, len(wanted), 1000):
                part = wanted[start : start + 1000]
                table.delete(f"id IN ({', '.join(map(str, part))})")

    # -- reads ---------------------------------------------------------------------------

    @translated
    def message_ids(self) -> set[int]:
        return self._ids_of(MESSAGES)

    @translated
    def chunk_ids(self) -> set[int]:
        return self._ids_of(CHUNKS)

    @translated
    def count(self, name: str) -> int:
        if self.model is None:
            return 0
        return int(self._table(name).count_rows())

    def _ids_of(self, name: str) -> set[int]:
        if self.model is None:
            return set()
        return self._ids(self._table(name))

    @staticmethod
    def _ids(table: Any) -> set[int]:
        scan = table.search().select(["id"]).limit(None).to_arrow()
        return {int(i) for i in scan.column("id").to_pylist()}

    @translated
    def search_messages(
        self,
        vector: Sequence[float],
        *,
        model: str,
        user_id: int | None,
        everyone: bool = False,
        conversation_id: int | None = None,
        limit: int = 20,
    ) -> list[MessageHit]:
        """The ``limit`` messages nearest ``vector`` among ``user_id``'s (None: the local
        admin's; ``everyone``: all users'), optionally in one conversation."""
        self.check(model)
        clauses = [] if everyone else [f"user_id = {owner(user_id)}"]
        if conversation_id is not None:
            clauses.append(f"conversation_id = {int(conversation_id)}")
        columns = ["id", "conversation_id", "role", "text", "created_at", "_distance"]
        rows = self._query(MESSAGES, vector, clauses, columns, limit)
        return [
            MessageHit(
                message_id=int(row["id"]),
                conversation_id=int(row["conversation_id"]),
                score=1.0 - float(row["_distance"]),
                role=str(row["role"]),
                text=str(row["text"]),
                created_at=row["created_at"],
            )
            for row in rows
        ]

    @translated
    def search_chunks(
        self,
        vector: Sequence[float],
        *,
        user_id: int | None,
        conversation_id: int | None = None,
        collections: Sequence[str] = (),
        limit: int = 5,
    ) -> list[ChunkHit]:
        """The ``limit`` document chunks nearest ``vector`` among ``user_id``'s (None: the
        local admin's): those of conversation ``conversation_id`` or of one of
        ``collections``; neither given, all the user's. Uses the prepared model (the
        caller embeds with the same embedder)."""
        if self.model is None:
            return []
        clauses = [f"user_id = {owner(user_id)}"]
        scope = []
        if conversation_id is not None:
            scope.append(f"conversation_id = {int(conversation_id)}")
        if collections:
            names = ", ".join(_literal(name) for name in collections)
            scope.append(f"collection IN ({names})")
        if scope:
            clauses.append("(" + " OR ".join(scope) + ")")
        columns = ["id", "document_id", "text", "page", "ordinal", "conversation_id"]
        rows = self._query(CHUNKS, vector, clauses, [*columns, "collection", "_distance"], limit)
        return [
            ChunkHit(
                chunk_id=int(row["id"]),
                document_id=int(row["document_id"]),
                score=1.0 - float(row["_distance"]),
                text=str(row["text"]),
                page=None if row["page"] == NONE else int(row["page"]),
                ordinal=int(row["ordinal"]),
                conversation_id=None
                if row["conversation_id"] == NONE
                else int(row["conversation_id"]),
                collection=row["collection"] or None,
            )
            for row in rows
        ]

    def _query(
        self,
        name: str,
        vector: Sequence[float],
        clauses: list[str],
        columns: list[str],
        limit: int,
    ) -> list[dict[str, Any]]:
        if len(vector) != self.dimension:
            raise ModelMismatch(f"a {len(vector)}-dimension query for {self.dimension}")
        table = self._table(name)
        query = table.search(list(vector), vector_column_name="vector").distance_type("cosine")
        if clauses:
            query = query.where(" AND ".join(clauses), prefilter=True)
        if self._indexed(table):
            query = query.refine_factor(_REFINE)
        rows: list[dict[str, Any]] = query.select(columns).limit(limit).to_arrow().to_pylist()
        return rows

    # -- maintenance ---------------------------------------------------------------------

    @translated
    def optimize(self, ann_min_rows: int) -> str:
        """Compact both tables, build the ANN index of a table that reached
        ``ann_min_rows`` vectors (and fold new rows into an existing one), rewrite a table
        whose deleted rows are still in its files, then remove every older version with its
        files: after it, no file under the store holds a deleted row.

        A delete (or an upsert's replaced row) only marks rows deleted, and LanceDB's
        compaction rewrites a fragment only once a tenth of its rows are marked: hence
        ``_rewrite``. It holds the exclusive lock, so that it cannot undo a newer write;
        the index build and fold (minutes on a large table) hold the shared one, so that
        the indexer goes on. Online-safe: see ``_remove_old_versions``."""
        if self.model is None:
            return "empty vector store"
        done: list[str] = []
        for name in (MESSAGES, CHUNKS):
            table = self._table(name)
            with self._writing():
                rows = int(table.count_rows())
                if self._index(table, ann_min_rows, rows):
                    done.append(f"{name}: ANN index built over {rows} vectors")
                table.optimize(cleanup_older_than=_KEEP)
                done.append(f"{name}: {rows} vectors compacted")
            with self._writing(exclusive=True):
                table.checkout_latest()  # a rewrite must read the newest rows
                marked = _marked_deleted(table)
                if marked != 0:
                    self._rewrite(table)
                    done.append(f"{name}: rewritten without {marked or 'its'} deleted vectors")
            if marked != 0:
                with self._writing():
                    table.optimize(cleanup_older_than=_KEEP)  # folds the rewrite into the index
        self._remove_old_versions()
        return "; ".join(done)

    def _remove_old_versions(self) -> None:
        """Remove every version but the latest, with the files only they name, under the
        exclusive lock: no writer of any process commits meanwhile, nor is halfway through
        a file that the removal would take for a failed write's litter. What was written
        since ``optimize`` compacted is compacted first (the last commit), then the removal
        waits ``_SETTLE``: a reader uses a version for at most ``_CONSISTENCY`` after it
        stopped being the latest."""
        # A remote store has no lock: there, a file no version names yet may be a write's
        # under way, and only LanceDB's own age limit (a week) removes it.
        locked = local_path(self.uri) is not None
        with self._writing(exclusive=True):
            tables = [self._table(name) for name in (MESSAGES, CHUNKS)]
            for table in tables:
                table.optimize(cleanup_older_than=_KEEP)
            time.sleep(_SETTLE.total_seconds())
            for table in tables:
                table.optimize(cleanup_older_than=_CONSISTENCY, delete_unverified=locked)

    def _rewrite(self, table: Any) -> None:
        """Write every row of ``table`` anew (``_PURGE_ROWS`` at a time, for memory): a
        fragment none of whose rows is left is dropped whole, so no data file of the new
        version holds a deleted row. The indexes stay (the new rows join them when the table
        is optimized next). A row whose text changed since it was read, by a writer the lock
        cannot hold (a remote store's), is not put back."""
        ids = sorted(self._ids(table))
        for start in range(0, len(ids), _PURGE_ROWS):
            part = ids[start : start + _PURGE_ROWS]
            scan = table.search().where(f"id >= {part[0]} AND id <= {part[-1]}").limit(None)
            merge = table.merge_insert("id").when_matched_update_all(
                where="target.text = source.text"
            )
            merge.execute(scan.to_arrow())

    @translated
    def ensure_index(self, name: str, ann_min_rows: int) -> bool:
        """Build the table's ANN index (and the owner's scalar index) once it is large
        enough; return whether it was built now."""
        with self._writing():
            return self._index(self._table(name), ann_min_rows)

    def _index(self, table: Any, ann_min_rows: int, rows: int | None = None) -> bool:
        if self._indexed(table):
            return False
        rows = int(table.count_rows()) if rows is None else rows
        if rows < max(ann_min_rows, 256):
            return False
        assert self.dimension is not None
        table.create_scalar_index("user_id", replace=True)
        table.create_index(
            metric="cosine",
            index_type="IVF_PQ",
            num_partitions=max(1, int(math.sqrt(rows))),
            num_sub_vectors=_sub_vectors(self.dimension),
            vector_column_name="vector",
        )
        return True

    @staticmethod
    def _indexed(table: Any) -> bool:
        return any("vector" in getattr(index, "columns", ()) for index in table.list_indices())

    # -- internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, exclusive: bool = False) -> Iterator[None]:
        """One writer of this object at a time, and none while a backup copies the store
        (``frozen``) or ``optimize`` rewrites a table or removes files (``exclusive``):
        writers of all processes share the lock file's lock."""
        with self._lock, store_lock(self.uri, exclusive=exclusive):
            yield

    def _connection(self) -> Any:
        with self._connecting:
            if self._db is None:
                import lancedb  # seconds to import: only once the store is really used

                self._db = lancedb.connect(self.uri, read_consistency_interval=_CONSISTENCY)
            return self._db

    def _created(self) -> bool:
        """False only for a local store whose directory does not exist yet (a remote one
        must be asked)."""
        return "://" in self.uri or Path(self.uri).exists()

    def _names(self) -> list[str]:
        if self._db is None and not self._created():
            return []
        return list(self._connection().list_tables().tables)

    def _known(self) -> tuple[str | None, int | None]:
        if self._meta is None:
            self._read_meta()
        assert self._meta is not None
        return self._meta

    def _read_meta(self) -> None:
        """Read ``meta``; kept only once read (a store that could not be read is not
        taken for an empty one). No ``meta`` (or no row in it): a new store, or one that
        a crash stopped while it was prepared, which holds no model. ``meta`` without both
        other tables: they were lost (``_drop`` drops ``meta`` first)."""
        names = set(self._names())
        rows: list[dict[str, Any]] = []
        if META in names:
            try:
                rows = self._connection().open_table(META).to_arrow().to_pylist()
            except (ValueError, RuntimeError) as exc:
                if "not found" not in str(exc).lower():
                    raise
                # Dropped since it was listed ("Table 'meta' was not found"), or its data
                # file since its manifest was read ("Not found: meta.lance/data/..."), by
                # another process preparing the store for another model. It holds no model
                # until that ends (a lost data file of ``meta`` reads the same: ``prepare``
                # then rebuilds the store, and the reconcile on start queues every row).
        if len(rows) != 1:
            self._meta = (None, None)
            return
        for name in (MESSAGES, CHUNKS):
            if name not in names:
                raise missing_table(name, self.uri)
        self._meta = (str(rows[0]["model"]), int(rows[0]["dimension"]))

    def _table(self, name: str) -> Any:
        table = self._tables.get(name)
        if table is None:
            table = self._tables[name] = self._connection().open_table(name)
        return table

    def _schema(self, name: str) -> pa.Schema:
        assert self.dimension is not None
        if name == MESSAGES:
            return message_schema(self.dimension)
        return chunk_schema(self.dimension)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _marked_deleted(table: Any) -> int | None:
    """Rows the table's latest version marks deleted (its data files still hold them);
    None when LanceDB does not say."""
    latest = max(table.list_versions(), key=lambda version: version["version"])
    count = latest.get("metadata", {}).get("total_deletion_file_rows")
    return None if count is None else int(count)


def _sub_vectors(dimension: int) -> int:
    """PQ sub-vectors: 8 dimensions each where it divides (384 -> 48), else a divisor."""
    for size in (8, 16, 4, 2, 1):
        if dimension % size == 0:
            return dimension // size
    return 1
