"""The vector store in backups, with a real LanceDB store under a real data directory.

A backup taken while vectors are deleted holds one version of the store: each archived
copy opens and answers a search. Before, the copy walked ``_deletions/`` before
``_versions/``, and a delete in between left a manifest naming a deletion file the
archive lacked (verification passed; every search of the restored store failed). A
store at a ``PARLEY_VECTOR_URI`` path of its own is backed up and restored too.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from parley.ops import archive
from parley.ops.backup import create_backup, verify_backup
from parley.ops.migrate import upgrade
from parley.ops.restore import restore_backup
from parley.search.vector_rows import MessageVector
from parley.search.vectors import VectorStore
from tests.ops.backup_support import backup_settings

MODEL, DIMENSION = "test/unit-4", 4


def vector(i: int) -> MessageVector:
    return MessageVector(
        id=i,
        user_id=1,
        conversation_id=i // 5,
        role="user",
        text=f"message {i}",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        metadata="{}",
        vector=[1.0, float(i % 7), float(i % 3), 0.5],
    )


def search(uri: str) -> int:
    store = VectorStore.open(uri)
    hits = store.search_messages([1.0, 1.0, 1.0, 0.5], model=MODEL, user_id=1, limit=5)
    return len(hits)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_backups_taken_while_vectors_are_deleted_hold_a_readable_store(
    tmp_path: Path, database_url: str
) -> None:
    settings = backup_settings(tmp_path, database_url)
    upgrade(settings)
    store = VectorStore.open(settings.vector_uri)
    store.prepare(MODEL, DIMENSION)
    for batch in range(60):  # one version each: many small fragments
        store.upsert_messages(MODEL, [vector(batch * 5 + j) for j in range(5)])
    stop = threading.Event()

    def delete() -> None:
        deleter = VectorStore.open(settings.vector_uri)  # as the indexer's own object
        i = 0
        while not stop.is_set():
            deleter.delete_messages([i])
            i = (i + 7) % 300

    thread = threading.Thread(target=delete)
    thread.start()
    try:
        paths = [create_backup(settings).path for _ in range(5)]
    finally:
        stop.set()
        thread.join()
    for n, path in enumerate(paths):
        verify_backup(path, settings)
        copy = tmp_path / f"copy-{n}"
        archive.unpack(
            path,
            None,
            lambda name, copy=copy: (
                copy / name.removeprefix("vectors/") if name.startswith("vectors/") else None
            ),
        )
        assert search(str(copy)) == 5, path.name


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_vector_store_at_a_path_of_its_own_is_backed_up_and_restored(
    tmp_path: Path, database_url: str
) -> None:
    elsewhere = tmp_path / "lancedb"
    settings = backup_settings(tmp_path, database_url, PARLEY_VECTOR_URI=str(elsewhere))
    upgrade(settings)
    store = VectorStore.open(settings.vector_uri)
    store.prepare(MODEL, DIMENSION)
    store.upsert_messages(MODEL, [vector(i) for i in range(5)])
    info = create_backup(settings)
    assert any(name.startswith("vectors/") for name in info.manifest["files"])
    store.upsert_messages(MODEL, [vector(i) for i in range(5, 10)])  # after the backup
    report = restore_backup(settings, info.path, safety_backup=False)
    assert report.vectors > 0
    assert VectorStore.open(str(elsewhere)).message_ids() == set(range(5))
