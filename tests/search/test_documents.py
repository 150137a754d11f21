"""Documents: what a file becomes (kind, text, pages, chunks) and how the store keeps it
(status, chunks, outbox, citations), on a SQLite file and on PostgreSQL.

PDFs are made by the test (``tests.search.pdfs``); nothing is downloaded.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.chat.attachments import Attachments
from parley.domain.messages import Message
from parley.errors import NotFound
from parley.search.documents import (
    CHUNK_CHARS,
    HTML,
    MARKDOWN,
    PDF,
    TEXT,
    DocumentRefused,
    UnsupportedDocument,
    chunk,
    document_type,
    extract,
    html_text,
)
from parley.search.documents_library import DocumentLibrary
from parley.server.identity import LOCAL
from parley.store import attachments as files
from parley.store import documents as repo
from parley.store.blobs import BlobStore, PendingBlob
from parley.store.conversation_rows import Conversation, Turn
from parley.store.conversations import Conversations
from parley.store.documents import NewCitation, Place
from parley.store.engine import writer_connection
from parley.store.schema import attachments as files_table
from parley.store.schema import citations, document_chunks, documents, search_outbox
from tests.search.pdfs import make_pdf

PROSE = " ".join(
    f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(200)
)


# -- kinds, text and chunks ----------------------------------------------------------------


def test_the_kind_comes_from_the_content_and_a_fake_pdf_is_refused() -> None:
    assert document_type("report.PDF", PDF) == PDF
    assert document_type("page.html", TEXT, b"<p>x</p>") == HTML
    assert document_type("page.txt", TEXT, b"<!DOCTYPE html><html>") == HTML
    assert document_type("notes.md", MARKDOWN) == MARKDOWN
    assert document_type("data.csv", "text/csv") == TEXT
    with pytest.raises(DocumentRefused) as refused:
        document_type("report.pdf", TEXT)
    assert refused.value.code == "not_a_pdf" and refused.value.status == 400
    for sniffed in ("image/png", None):
        with pytest.raises(UnsupportedDocument) as unsupported:
            document_type("picture.png", sniffed)
        assert unsupported.value.status == 415


def test_a_pdf_gives_its_text_page_by_page_and_chunks_know_their_page() -> None:
    data = make_pdf([["Page one opens here.", "It has two lines."], ["Page two: the heron."]])
    extracted = extract(data, PDF)
    assert extracted.page_count == 2
    assert extracted.pages == ("Page one opens here.\nIt has two lines.", "Page two: the heron.")
    chunks = chunk(extracted)
    assert [(c.ordinal, c.page) for c in chunks] == [(0, 1), (1, 2)]
    assert "heron" in chunks[1].content and "heron" not in chunks[0].content


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"this is plain text, not a PDF", "not_a_pdf"),
        (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "unreadable_pdf"),
        (make_pdf([["secret"]], password="open sesame"), "encrypted_pdf"),
        (make_pdf([[]]), "no_text"),
    ],
    ids=["empty", "not-a-pdf", "damaged", "encrypted", "no-text"],
)
def test_a_bad_pdf_is_refused_with_its_reason(data: bytes, code: str) -> None:
    with pytest.raises(DocumentRefused) as refused:
        extract(data, PDF)
    assert refused.value.code == code
    assert refused.value.to_openai()["error"]["param"] == "file"


def test_html_keeps_the_visible_text_only() -> None:
    page = (
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<h1>Heading</h1><p>One &amp; two</p><script>alert('x')</script><p>Three</p></body>"
    )
    assert html_text(page) == "Heading\n\nOne & two\n\nThree"
    assert extract(page.encode(), HTML).pages == ("Heading\n\nOne & two\n\nThree",)
    with pytest.raises(DocumentRefused) as refused:
        extract(b"<html><script>only code</script></html>", HTML)
    assert refused.value.code == "no_text"


def test_chunks_overlap_cut_between_words_and_cover_everything() -> None:
    extracted = extract(PROSE.encode(), TEXT)
    chunks = chunk(extracted)
    assert len(chunks) > 5
    assert all(len(c.content) <= CHUNK_CHARS for c in chunks)
    assert all(c.page is None for c in chunks)
    words = set(PROSE.split())
    for before, after in itertools.pairwise(chunks):
        # Consecutive chunks share text, and no chunk starts or ends inside a word.
        assert after.content[:40] in before.content
        assert set(after.content.split()) <= words and set(before.content.split()) <= words
    assert chunks[0].content.startswith("Sentence number 0 ")
    assert chunks[-1].content.endswith("Sentence number 199 talks about topic 3 in some detail.")


# -- the store -----------------------------------------------------------------------------


def _insert(engine: sa.Engine, place: Place, text: str = PROSE) -> repo.DocumentRow:
    extracted = extract(text.encode(), TEXT)
    with writer_connection(engine) as conn, conn.begin():
        return repo.insert_document(
            conn,
            place,
            filename="prose.txt",
            mime_type=TEXT,
            size=len(text),
            sha256="ab" * 32,
            page_count=None,
            chunks=chunk(extracted),
        )


def _outbox(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(search_outbox.c.kind, search_outbox.c.op)).all()
    return [(r.kind, r.op) for r in rows]


def test_status_goes_from_pending_to_indexed_once_the_outbox_is_drained(
    migrated_engine: sa.Engine,
) -> None:
    engine = migrated_engine
    first = _insert(engine, Place(user_id=None, collection="books"))
    second = _insert(engine, Place(user_id=None, collection="books"), "A short one.")
    assert first.status == second.status == repo.PENDING
    assert first.chunk_count > 1 and second.chunk_count == 1
    queued = _outbox(engine)
    assert queued.count(("chunk", "upsert")) == first.chunk_count + 1
    # The indexer handled the second document's chunk only: the first stays pending.
    with writer_connection(engine) as conn, conn.begin():
        chunk_id = conn.execute(
            sa.select(document_chunks.c.id).where(document_chunks.c.document_id == second.id)
        ).scalar_one()
        conn.execute(sa.delete(search_outbox).where(search_outbox.c.item_id == chunk_id))
        repo.mark_indexed(conn, [first.id, second.id])
    with engine.connect() as conn:
        assert repo.get_document(conn, first.public_id).status == repo.PENDING  # type: ignore[union-attr]
        indexed = repo.get_document(conn, second.public_id)
    assert indexed is not None and indexed.status == repo.INDEXED
    assert indexed.updated_at >= indexed.created_at
    # Failing is for pending documents only; indexed is final.
    with writer_connection(engine) as conn, conn.begin():
        repo.mark_failed(conn, [first.id, second.id], "the embedder refused: " + "x" * 2000)
    with engine.connect() as conn:
        failed = repo.get_document(conn, first.public_id)
        still = repo.get_document(conn, second.public_id)
    assert failed is not None and failed.status == repo.FAILED
    assert failed.error is not None and failed.error.startswith("the embedder refused")
    assert len(failed.error) == repo.MAX_ERROR
    assert still is not None and still.status == repo.INDEXED


def test_deleting_a_document_deletes_its_chunks_and_queues_their_vectors_deletion(
    migrated_engine: sa.Engine,
) -> None:
    engine = migrated_engine
    doc = _insert(engine, Place(user_id=None, collection="books"))
    with writer_connection(engine) as conn, conn.begin():
        conn.execute(sa.delete(search_outbox))
        chunk_ids = list(
            conn.execute(
                sa.select(document_chunks.c.id).where(document_chunks.c.document_id == doc.id)
            ).scalars()
        )
        rows = repo.chunks_by_id(conn, chunk_ids)
        assert {r.document_public_id for r in rows.values()} == {doc.public_id}
    with engine.connect() as conn:
        assert files.referenced(conn, doc.sha256)
        assert files.unreferenced(conn, [doc.sha256, "cd" * 32]) == {"cd" * 32}
    with writer_connection(engine) as conn, conn.begin():
        repo.delete_document(conn, doc.id)
    with engine.connect() as conn:
        left = conn.execute(sa.select(sa.func.count()).select_from(document_chunks)).scalar()
        assert left == 0
        assert conn.execute(sa.select(documents.c.id)).first() is None
        assert not files.referenced(conn, doc.sha256)
    with engine.connect() as conn:
        deleted = conn.execute(
            sa.select(search_outbox.c.item_id).where(search_outbox.c.op == "delete")
        ).scalars()
        assert sorted(deleted) == sorted(chunk_ids)


def test_citations_keep_their_source_when_the_document_goes(
    migrated_engine: sa.Engine,
) -> None:
    engine = migrated_engine
    store = Conversations(engine)
    conversation = store.create(user_id=None, api_key_id=None, default_model="up/m")

    class Admin:
        user_id = None

        def may_see(self, owner: int | None) -> bool:
            return True

    turn = store.add_user_message(
        Admin(), conversation.public_id, Message("user", "hi"), user_id=None, api_key_id=None
    )
    assert turn is not None
    place = Place(None, conversation.id, conversation.public_id)
    doc = _insert(engine, place)
    with writer_connection(engine) as conn, conn.begin():
        rows = repo.chunks_by_id(
            conn,
            list(
                conn.execute(
                    sa.select(document_chunks.c.id).where(document_chunks.c.document_id == doc.id)
                ).scalars()
            ),
        )
        first, second = sorted(rows.values(), key=lambda r: r.ordinal)[:2]
        repo.insert_citations(
            conn,
            turn.message.id,
            [
                NewCitation(doc.id, second.id, doc.filename, None, second.ordinal, 0.75),
                NewCitation(doc.id, first.id, doc.filename, None, first.ordinal, 0.5),
            ],
        )
        assert repo.has_documents(conn, conversation.id)
    found = store.get_message(conversation.id, turn.message.public_id)
    assert found is not None
    assert [(c.ordinal, c.chunk_ordinal, c.score) for c in found.citations] == [
        (1, 1, 0.75),
        (2, 0, 0.5),
    ]
    assert found.citations[0].document_public_id == doc.public_id
    with writer_connection(engine) as conn, conn.begin():
        repo.delete_document(conn, doc.id)
    tree = store.load(Admin(), conversation.public_id)
    assert tree is not None
    [message] = tree.messages
    assert [(c.document_public_id, c.filename, c.chunk_ordinal) for c in message.citations] == [
        (None, "prose.txt", 1),
        (None, "prose.txt", 0),
    ]


def _asked(engine: sa.Engine) -> tuple[Conversations, Conversation, Turn]:
    """A conversation with one user message, as a send leaves it before the answer."""
    store = Conversations(engine)
    conversation = store.create(user_id=None, api_key_id=None, default_model="up/m")
    turn = store.add_user_message(
        LOCAL, conversation.public_id, Message("user", "hi"), user_id=None, api_key_id=None
    )
    assert turn is not None
    return store, conversation, turn


def test_an_answer_keeps_the_citations_of_a_document_deleted_while_it_was_made(
    migrated_engine: sa.Engine,
) -> None:
    """The document goes between retrieval and the answer's commit: its citation is
    stored like that of a deleted document, and the answer's other citations with it
    (they used to be refused all together by the foreign keys)."""
    engine = migrated_engine
    store, conversation, turn = _asked(engine)
    place = Place(None, conversation.id, conversation.public_id)
    gone, kept = _insert(engine, place), _insert(engine, place)

    def first_chunk(doc: repo.DocumentRow) -> repo.ChunkRow:
        with engine.connect() as conn:
            ids = conn.execute(
                sa.select(document_chunks.c.id).where(document_chunks.c.document_id == doc.id)
            ).scalars()
            return min(repo.chunks_by_id(conn, list(ids)).values(), key=lambda r: r.ordinal)

    cited = [first_chunk(gone), first_chunk(kept)]
    with writer_connection(engine) as conn, conn.begin():
        repo.delete_document(conn, gone.id)
    with writer_connection(engine) as conn, conn.begin():
        alive = repo.insert_citations(
            conn,
            turn.message.id,
            [NewCitation(c.document_id, c.id, c.filename, None, c.ordinal, 0.5) for c in cited],
        )
    assert alive == {kept.id}
    found = store.get_message(conversation.id, turn.message.public_id)
    assert found is not None
    assert [(c.ordinal, c.document_public_id, c.filename) for c in found.citations] == [
        (1, None, "prose.txt"),
        (2, kept.public_id, "prose.txt"),
    ]


def test_an_answer_deleted_before_its_citations_are_stored_gets_none_without_an_error(
    migrated_engine: sa.Engine,
) -> None:
    """The message is deleted between the answer's commit and its citations (the chat
    service stores them just after): nothing to cite, and no foreign-key error."""
    engine = migrated_engine
    store, conversation, turn = _asked(engine)
    document = _insert(engine, Place(None, conversation.id, conversation.public_id))
    with engine.connect() as conn:
        chunk_id = conn.execute(
            sa.select(sa.func.min(document_chunks.c.id)).where(
                document_chunks.c.document_id == document.id
            )
        ).scalar_one()
    assert store.delete_message(LOCAL, conversation.public_id, turn.message.public_id) == set()
    with writer_connection(engine) as conn, conn.begin():
        alive = repo.insert_citations(
            conn,
            turn.message.id,
            [NewCitation(document.id, chunk_id, document.filename, None, 0, 0.5)],
        )
    assert alive == {document.id}
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(citations)).scalar() == 0


def test_an_upload_into_a_conversation_deleted_meanwhile_is_a_404_and_leaves_nothing(
    migrated_engine: sa.Engine, tmp_path: Path
) -> None:
    """The conversation is looked up when the form arrives and deleted before the upload
    is recorded (a large document takes seconds to read): the same 404 as when it was
    deleted before, not a foreign-key error (a 500); no row, no blob."""
    engine = migrated_engine
    blobs = BlobStore(tmp_path / "blobs")
    blobs.ensure()
    store = Conversations(engine)
    conversation = store.create(user_id=None, api_key_id=None, default_model="up/m")
    library, uploads = DocumentLibrary(engine, blobs), Attachments(engine, blobs)
    place = library.place(
        conversation=conversation.public_id, collection=None, user_id=None, may_see=_anyone
    )
    ref = uploads.conversation(conversation.public_id, _anyone)
    assert store.delete(LOCAL, conversation.public_id) == set()
    text = extract(PROSE.encode(), TEXT)

    def pending() -> PendingBlob:
        blob = blobs.begin()
        blob.write(PROSE.encode())
        return blob

    with pytest.raises(NotFound, match="no such conversation"):
        library.record(pending(), place, filename="p.txt", extracted=text, chunks=chunk(text))
    with pytest.raises(NotFound, match="no such conversation"):
        uploads.record(pending(), user_id=None, conversation=ref, filename="p.txt", mime_type=TEXT)
    for table in (documents, document_chunks, files_table):
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0
    assert [p for p in blobs.root.rglob("*") if p.is_file()] == []


def _anyone(owner: int | None) -> bool:
    return True
