"""Deleted text leaves the vector store's files at maintenance, and so backups taken after.

A LanceDB delete only marks rows deleted: their text stays in the data files until a
rewrite, and LanceDB's own compaction rewrites a fragment only once a tenth of its rows are
gone. Before, deleting one conversation in twenty and running maintenance left its text
readable in the raw ``.lance`` files and in every later backup. Here, on a real store with
the real local model: conversations and documents carrying unique canaries are indexed,
some deleted, maintenance run as a user runs it; then every byte of every file under the
store (and of the store in a backup taken after) is searched for the canaries.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.ops import archive
from parley.ops.backup import create_backup
from parley.ops.maintenance import run_maintenance
from parley.ops.migrate import upgrade
from parley.search.documents import TEXT, chunk, extract
from parley.search.embedders import LocalEmbedder
from parley.search.hybrid import SemanticSearch
from parley.search.indexer import Indexer
from parley.search.vectors import VectorStore
from parley.settings import Settings
from parley.store import documents as repo
from parley.store.conversations import Conversations
from parley.store.documents import Place
from parley.store.engine import create_engine, writer_connection
from parley.store.search import Scope
from tests.ops.backup_support import backup_settings
from tests.store.test_conversations import ALICE, new, say

TOPICS = [
    "baking sourdough bread with a wild yeast starter",
    "repairing a punctured bicycle tyre at the roadside",
    "the migration of arctic terns across the oceans",
    "tuning the strings of an old acoustic guitar",
    "planting tomatoes and basil in a balcony garden",
    "the rules of chess openings like the Sicilian defence",
    "servicing the hydraulic brakes of a forklift truck",
    "knitting a wool scarf with a cable pattern",
    "observing the rings of Saturn through a telescope",
    "brewing green tea at the right water temperature",
    "the history of lighthouses on rocky coasts",
    "training a puppy to walk on a loose lead",
]
GONE_CONVERSATION = 4  # one conversation in twelve: a small share of its fragment's rows
GONE_DOCUMENT = 1


def canary(kind: str, n: int) -> str:
    return f"canary-{kind}-{n}-{uuid.uuid4().hex[:12]}"


def files_holding(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """Each needle -> the files under ``root`` whose raw bytes contain it."""
    found: dict[str, list[str]] = {needle: [] for needle in needles}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for needle in needles:
            if needle.encode() in data:
                found[needle].append(str(path.relative_to(root)))
    return found


@pytest.fixture
def setup(tmp_path: Path, database_url: str) -> Iterator[tuple[Settings, sa.Engine]]:
    settings = backup_settings(tmp_path, database_url)
    upgrade(settings)
    engine = create_engine(settings)
    try:
        yield settings, engine
    finally:
        engine.dispose()


def add_document(engine: sa.Engine, text: str) -> repo.DocumentRow:
    with writer_connection(engine) as conn, conn.begin():
        return repo.insert_document(
            conn,
            Place(user_id=None, collection="notes"),  # the local admin's
            filename=f"{text[:20]}.txt",
            mime_type=TEXT,
            size=len(text),
            sha256="ab" * 32,
            page_count=None,
            chunks=chunk(extract(text.encode(), TEXT)),
        )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_maintenance_leaves_no_deleted_text_in_the_store_or_a_later_backup(
    setup: tuple[Settings, sa.Engine], local_embedder: LocalEmbedder, tmp_path: Path
) -> None:
    settings, engine = setup
    store = Conversations(engine)
    vectors = VectorStore.open(settings.vector_uri)
    indexer = Indexer(engine, vectors, local_embedder)
    conversations = []
    said: list[str] = []
    for n, topic in enumerate(TOPICS):
        conv = new(store)
        marks = [canary("message", n), canary("message", n)]
        say(store, conv, f"{marks[0]}: notes about {topic}")
        say(store, conv, f"{marks[1]}: more about {topic}")
        conversations.append(conv)
        said.append(" ".join(marks))
    docs = []
    documented = [canary("document", n) for n in range(3)]
    for n, mark in enumerate(documented):
        docs.append(add_document(engine, f"{mark}: a handbook page about {TOPICS[n]}."))
    while await indexer.run_once():
        pass
    # A first maintenance: the store is one fragment per table, as after any earlier run.
    assert run_maintenance(settings, vacuum=False).failed_steps == []
    root = Path(settings.vector_uri)
    everything = [*(" ".join(said).split()), *documented]
    assert all(files_holding(root, everything).values())  # the scan does see text

    assert store.delete(ALICE, conversations[GONE_CONVERSATION].public_id) is not None
    with writer_connection(engine) as conn, conn.begin():
        repo.delete_document(conn, docs[GONE_DOCUMENT].id)
    while await indexer.run_once():
        pass
    gone = [*said[GONE_CONVERSATION].split(), documented[GONE_DOCUMENT]]
    kept = [mark for mark in everything if mark not in gone]

    report = run_maintenance(settings, vacuum=False)
    [step] = [step for step in report.steps if step.name == "vector store"]
    assert step.status == "done", step.detail
    # Two rows in twenty-four: too few for LanceDB's compaction to rewrite their fragment.
    assert "messages: rewritten without 2 deleted vectors" in step.detail
    left = files_holding(root, gone + kept)
    assert {mark: left[mark] for mark in gone} == {mark: [] for mark in gone}
    assert all(left[mark] for mark in kept)

    # What is kept is still found by meaning, by a fresh reader of the store.
    reader = VectorStore.open(settings.vector_uri)
    search = SemanticSearch(engine, reader, local_embedder)
    scope = Scope(ALICE.user_id)
    for n in (0, GONE_CONVERSATION + 1, len(TOPICS) - 1):
        hits = (await search.search(TOPICS[n], scope, mode="semantic", limit=2)).hits
        assert hits and hits[0].conversation_id == conversations[n].public_id, TOPICS[n]
    query = await local_embedder.embed_query(TOPICS[2])
    [best] = reader.search_chunks(query, user_id=None, collections=["notes"], limit=1)
    assert best.document_id == docs[2].id

    # A backup taken now holds the store as it is: no deleted canary either.
    info = create_backup(settings)
    copy = tmp_path / "restored-vectors"
    archive.unpack(
        info.path,
        None,
        lambda name: copy / name.removeprefix("vectors/") if name.startswith("vectors/") else None,
    )
    in_backup = files_holding(copy, gone + kept)
    assert {mark: in_backup[mark] for mark in gone} == {mark: [] for mark in gone}
    assert all(in_backup[mark] for mark in kept)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_deleted_message_and_its_replies_leave_the_vector_store(
    setup: tuple[Settings, sa.Engine], local_embedder: LocalEmbedder
) -> None:
    """``DELETE /api/conversations/{id}/messages/{message_id}``'s repository call: the
    deleted subtree's vectors are deleted by the indexer, and maintenance takes their
    text off the store's disk; the rest of the conversation stays found by meaning."""
    settings, engine = setup
    store = Conversations(engine)
    vectors = VectorStore.open(settings.vector_uri)
    indexer = Indexer(engine, vectors, local_embedder)
    for n, topic in enumerate(TOPICS[:6]):  # other conversations share the fragment
        say(store, new(store), f"{canary('other', n)}: notes about {topic}")
    conv = new(store)
    kept = canary("kept", 0)
    say(store, conv, f"{kept}: {TOPICS[6]}")
    gone = [canary("gone", 0), canary("gone", 1)]
    doomed = say(store, conv, f"{gone[0]}: {TOPICS[7]}")
    reply = say(store, conv, f"{gone[1]}: {TOPICS[8]}")  # a reply below it
    deleted = {doomed.message.public_id, reply.message.public_id}
    while await indexer.run_once():
        pass
    assert run_maintenance(settings, vacuum=False).failed_steps == []
    root = Path(settings.vector_uri)
    assert all(files_holding(root, [kept, *gone]).values())
    scope = Scope(ALICE.user_id)
    search = SemanticSearch(engine, vectors, local_embedder)
    hits = (await search.search(TOPICS[8], scope, mode="semantic", limit=1)).hits
    assert hits[0].message_id == reply.message.public_id  # found by meaning, before

    store.delete_message(ALICE, conv.public_id, doomed.message.public_id)
    while await indexer.run_once():
        pass
    # The vectors themselves are gone (not only hidden by a missing row).
    for topic in TOPICS[7:9]:
        query = await local_embedder.embed_query(topic)
        near = vectors.search_messages(
            query, model=local_embedder.model, user_id=ALICE.user_id, limit=20
        )
        assert doomed.message.id not in {v.message_id for v in near}
        assert reply.message.id not in {v.message_id for v in near}
        hits = (await search.search(topic, scope, mode="semantic", limit=10)).hits
        assert deleted.isdisjoint(h.message_id for h in hits)
    [best, *_] = (await search.search(TOPICS[6], scope, mode="semantic", limit=2)).hits
    assert best.conversation_id == conv.public_id

    assert run_maintenance(settings, vacuum=False).failed_steps == []
    left = files_holding(root, [kept, *gone])
    assert left[gone[0]] == [] and left[gone[1]] == [] and left[kept]
