"""The integrity report of ``parley maintenance``: what is wrong in the store, by check.

Checks, on either database unless noted:

- ``database``: SQLite's ``integrity_check`` (``quick_check`` when ``quick``); on
  PostgreSQL skipped (the server checks its own pages);
- ``foreign keys``: rows naming a parent row that does not exist (SQLite's
  ``foreign_key_check``; on PostgreSQL the same, as queries over ``store.schema``);
- ``messages without conversation``: history that no longer shows anywhere;
- ``orphan blobs``: files in the blob directory that no attachment row names (left by a
  crash between writing a blob and committing its row, or between deleting a
  conversation and sweeping its blobs); ``remove_orphan_blobs`` deletes them;
- ``missing blobs``: attachment rows whose file is gone (lost data);
- ``vectors without rows``: message or chunk vectors whose row is gone and whose delete
  is not queued in the outbox (``parley reindex`` deletes them); skipped when there is
  no vector store yet.

A database a newer parley migrated is refused before any check: its tables may name
blobs and rows this code does not know of.

Invariants:
- read-only, except ``remove_orphan_blobs``, which goes through ``BlobStore.sweep``
  (moves the file aside, then asks the database again), so an upload of the same bytes
  committing meanwhile keeps its blob;
- a blob written less than ``ORPHAN_GRACE_SECONDS`` ago is never called an orphan: an
  upload publishes its blob just before it commits the row naming it;
- every finding is confirmed after the scan (the row or the file asked about again), so
  an upload or a delete running alongside is not reported as damage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy.exc import SQLAlchemyError

from parley.errors import ConfigError, StoreError, VectorStoreUnusable
from parley.ops.revisions import current_on, refuse_foreign, refuse_unknown
from parley.settings import Settings
from parley.store import maintenance as store
from parley.store.attachments import referenced, unreferenced
from parley.store.blobs import BlobStore, is_blob_hash

ORPHAN_GRACE_SECONDS = 3600.0
_PG_PAGES = "PostgreSQL checks its own pages (data checksums, amcheck): not checked here"
# How many offenders a check names (the count is always complete).
SAMPLE = 10


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False
    # Up to ``SAMPLE`` offenders (blob hashes, foreign keys with counts, SQLite messages).
    items: tuple[str, ...] = ()


def integrity_checks(
    settings: Settings,
    engine: sqlalchemy.Engine,
    *,
    quick: bool = False,
    remove_orphan_blobs: bool = False,
    grace: float = ORPHAN_GRACE_SECONDS,
) -> list[Check]:
    """Every check of the module docstring, in that order. A check the database cannot
    answer (a damaged file) is a failed check naming the error, not an exception."""
    _refuse_not_ours(engine)
    present = store.existing_tables(engine)
    if not {"messages", "conversations", "attachments"} <= present:
        raise ConfigError("the database has no parley schema: run `parley db upgrade` first")
    sqlite = engine.dialect.name == "sqlite"
    checks = [
        _guard("database", lambda: _database(engine, quick))
        if sqlite
        else _skipped("database", _PG_PAGES),
        _guard("foreign keys", lambda: _foreign_keys(engine, present)),
        _guard("messages without conversation", lambda: _lost_messages(engine)),
    ]
    try:
        checks.extend(_blobs(settings, engine, grace, remove_orphan_blobs))
    except (StoreError, SQLAlchemyError) as exc:
        checks.append(Check("blobs", False, "could not run", items=(_reason(exc),)))
    checks.append(_guard("vectors without rows", lambda: _vectors(settings, engine)))
    return checks


def _vectors(settings: Settings, engine: sqlalchemy.Engine) -> Check:
    # A storage adapter without parley imports of its own (see ``ops.maintenance``).
    from parley.search.vectors import VectorStore
    from parley.store import outbox

    uri = settings.vector_uri
    if "://" not in uri and not Path(uri).exists():
        return _skipped("vectors without rows", "no vector store")
    vectors = VectorStore.open(uri)
    if vectors.model is None:
        return _skipped("vectors without rows", "the vector store is empty")
    have_messages, have_chunks = vectors.message_ids(), vectors.chunk_ids()
    with engine.connect() as conn:
        messages = have_messages - outbox.message_ids(conn) - outbox.queued_items(conn, "message")
        chunks = have_chunks - outbox.chunk_ids(conn) - outbox.queued_items(conn, "chunk")
    if not messages and not chunks:
        return Check("vectors without rows", True, f"{vectors.model}: none")
    items = [f"message {i}" for i in sorted(messages)] + [f"chunk {i}" for i in sorted(chunks)]
    return Check(
        "vectors without rows",
        False,
        f"{len(messages)} message and {len(chunks)} chunk vector(s) without a row: "
        "run parley reindex",
        items=tuple(items[:SAMPLE]),
    )


def _refuse_not_ours(engine: sqlalchemy.Engine) -> None:
    """Another application's database is not parley's to check (nor to be told to
    upgrade); a newer parley's tables may name blobs and rows this code does not know
    of: its orphans may not be ours to report or delete. A revision that cannot be read
    (a damaged file) is left to the ``database`` check to report."""
    try:
        with engine.connect() as conn:
            revision = current_on(conn)
            refuse_foreign(conn, revision)
    except SQLAlchemyError:
        return
    refuse_unknown(revision)


def _guard(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except (StoreError, VectorStoreUnusable, SQLAlchemyError) as exc:
        return Check(name, False, "could not run", items=(_reason(exc),))


def _reason(exc: Exception) -> str:
    if isinstance(exc, StoreError | VectorStoreUnusable):
        return exc.message
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def _database(engine: sqlalchemy.Engine, quick: bool) -> Check:
    pragma = "quick_check" if quick else "integrity_check"
    found = store.sqlite_integrity(engine, quick=quick)
    if not found:
        return Check("database", True, f"{pragma}: ok")
    return Check("database", False, f"{pragma} failed", items=tuple(found[:SAMPLE]))


def _foreign_keys(engine: sqlalchemy.Engine, present: set[str]) -> Check:
    if engine.dialect.name == "sqlite":
        dangling = store.sqlite_foreign_key_violations(engine)
    else:
        with engine.connect() as conn:
            dangling = store.dangling_references(conn, present)
    if not dangling:
        return Check("foreign keys", True, "every reference resolves")
    lines = tuple(f"{key}: {count}" for key, count in sorted(dangling.items()))
    total = sum(dangling.values())
    return Check("foreign keys", False, f"{total} row(s) name a missing parent", items=lines)


def _lost_messages(engine: sqlalchemy.Engine) -> Check:
    with engine.connect() as conn:
        lost = store.messages_without_conversation(conn)
    return Check("messages without conversation", lost == 0, f"{lost} message(s)")


def _skipped(name: str, detail: str) -> Check:
    return Check(name, True, detail, skipped=True)


def _blobs(
    settings: Settings, engine: sqlalchemy.Engine, grace: float, remove: bool
) -> list[Check]:
    root = settings.blob_dir
    with engine.connect() as conn:
        named = store.attachment_hashes(conn)
    files = blob_files(root) if root.exists() else {}
    settled = time.time() - grace
    candidates = [h for h, mtime in files.items() if h not in named and mtime < settled]
    with engine.connect() as conn:
        orphans = sorted(unreferenced(conn, candidates))
    blobs = BlobStore(root)
    absent = [h for h in named - files.keys() if not blobs.exists(h)]
    with engine.connect() as conn:
        missing = sorted(h for h in absent if referenced(conn, h))

    removed = 0
    if remove and orphans:

        def still_named(sha256: str) -> bool:
            with engine.connect() as conn:
                return referenced(conn, sha256)

        blobs.ensure()  # the sweep moves files through the temporary area
        swept = [h for h in orphans if blobs.sweep(h, still_named)]
        removed = len(swept)
        orphans = [h for h in orphans if h not in set(swept) and blobs.exists(h)]
    if orphans:
        orphan_check = Check(
            "orphan blobs",
            False,
            f"{len(orphans)} file(s) no attachment names "
            "(`parley maintenance --remove-orphan-blobs` deletes them)",
            items=_sample(orphans),
        )
    elif removed:
        orphan_check = Check("orphan blobs", True, f"{removed} orphan blob file(s) removed")
    else:
        orphan_check = Check("orphan blobs", True, f"{len(files)} blob file(s), all named")
    missing_check = (
        Check("missing blobs", False, f"{len(missing)} attachment blob(s) missing from {root}",
              items=_sample(missing))
        if missing
        else Check("missing blobs", True, f"all {len(named)} attachment blob(s) present")
    )  # fmt: skip
    return [orphan_check, missing_check]


def blob_files(root: Path) -> dict[str, float]:
    """Blob files under ``root`` (``ab/ab12...``) by hash, with their modification time.

    Only regular files named by a hash in their own shard count; symlinks are never
    followed and the temporary area is not a shard.
    """
    found: dict[str, float] = {}
    with os.scandir(root) as shards:
        for shard in shards:
            if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                continue
            with os.scandir(shard.path) as entries:
                for entry in entries:
                    name = entry.name
                    if (
                        is_blob_hash(name)
                        and name[:2] == shard.name
                        and entry.is_file(follow_symlinks=False)
                    ):
                        found[name] = entry.stat(follow_symlinks=False).st_mtime
    return found


def _sample(hashes: list[str]) -> tuple[str, ...]:
    return tuple(hashes[:SAMPLE])
