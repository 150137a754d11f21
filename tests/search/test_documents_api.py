"""The documents API end to end: a real parley with a master key, users A and B with API
keys of their own, uploads over HTTP, on a SQLite file and on PostgreSQL.

What is kept (rows, chunks, blobs) is read from the store and the blob directory; bad
files must leave none of it behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, write_config
from tests.search.pdfs import make_pdf

MASTER = "documents-master-key"
PASSWORD = "correct horse battery"
LIMIT = 64 * 1024


@pytest.fixture
def server(tmp_path: Path, database_url: str) -> Iterator[ParleyServer]:
    with FakeOpenAI() as upstream:
        provider = {
            "name": "up",
            "kind": "openai",
            "base_url": upstream.base_url,
            "models": ["gpt-4o-mini"],
            "list_models": False,
        }
        write_config(tmp_path, [provider], extra="[retry]\nattempts = 1\n")
        settings = settings_for(
            tmp_path,
            database_url,
            PARLEY_MASTER_KEY=MASTER,
            PARLEY_MAX_UPLOAD_BYTES=str(LIMIT),
        )
        with ParleyServer(settings) as running:
            yield running


def client(server: ParleyServer, name: str) -> httpx.Client:
    """An API client of a new user ``name`` (with a key the user made)."""
    master = {"Authorization": f"Bearer {MASTER}"}
    made = httpx.post(
        f"{server.root}/api/admin/users",
        json={"email": f"{name}@example.org", "username": name, "password": PASSWORD},
        headers=master,
        timeout=10,
    )
    assert made.status_code == 201, made.text
    key = httpx.post(
        f"{server.root}/api/keys", json={"name": "k", "user": name}, headers=master, timeout=10
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    return httpx.Client(base_url=f"{server.root}/api", headers=headers, timeout=30)


def upload(http: httpx.Client, name: str, data: bytes, **fields: str) -> httpx.Response:
    return http.post(
        "/documents", files={"file": (name, data, "application/octet-stream")}, data=fields
    )


def blob_files(server: ParleyServer) -> set[str]:
    root = server.settings.blob_dir
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def counts(server: ParleyServer) -> tuple[int, int]:
    url = server.settings.database_url
    documents = rows(url, "SELECT count(*) AS n FROM documents")[0]["n"]
    chunks = rows(url, "SELECT count(*) AS n FROM document_chunks")[0]["n"]
    return documents, chunks


def test_upload_list_get_delete_and_ownership(server: ParleyServer) -> None:
    with client(server, "alpha") as a, client(server, "bravo") as b:
        conversation = a.post("/conversations", json={"default_model": "up/gpt-4o-mini"})
        assert conversation.status_code == 201
        cid = conversation.json()["id"]
        pdf = make_pdf([["First page."], ["Second page, alpha canary 5f1c."]])
        made = upload(a, "report.pdf", pdf, conversation_id=cid)
        assert made.status_code == 201, made.text
        doc: dict[str, Any] = made.json()
        assert doc["object"] == "document" and doc["status"] == "pending"
        assert (doc["filename"], doc["mime_type"], doc["size"]) == (
            "report.pdf",
            "application/pdf",
            len(pdf),
        )
        assert (doc["page_count"], doc["chunk_count"], doc["error"]) == (2, 2, None)
        assert doc["conversation_id"] == cid and doc["collection"] is None
        notes = upload(a, "notes.md", b"# Notes\n\nSome *markdown*.", collection="handbook")
        assert notes.status_code == 201, notes.text
        assert notes.json()["mime_type"] == "text/markdown"
        page = upload(a, "page.html", b"<html><body><p>Hello</p></body></html>", collection="web")
        assert page.json()["mime_type"] == "text/html"

        listed = a.get("/documents").json()["data"]
        assert [d["id"] for d in listed] == [page.json()["id"], notes.json()["id"], doc["id"]]
        assert [
            d["id"] for d in a.get("/documents", params={"collection": "handbook"}).json()["data"]
        ] == [notes.json()["id"]]
        assert [
            d["id"] for d in a.get("/documents", params={"conversation_id": cid}).json()["data"]
        ] == [doc["id"]]
        first = a.get("/documents", params={"limit": 2}).json()
        rest = a.get("/documents", params={"limit": 2, "after": first["next_cursor"]}).json()
        assert [d["id"] for d in first["data"] + rest["data"]] == [d["id"] for d in listed]
        assert a.get(f"/documents/{doc['id']}").json() == doc
        # B sees none of it, and cannot put a document into A's conversation.
        assert b.get("/documents").json()["data"] == []
        assert b.get(f"/documents/{doc['id']}").status_code == 404
        assert b.get("/documents", params={"conversation_id": cid}).status_code == 404
        assert b.delete(f"/documents/{doc['id']}").status_code == 404
        into = upload(b, "x.txt", b"planted", conversation_id=cid)
        assert into.status_code == 404 and "error" in into.json()
        # The master key (an admin) sees A's document.
        master = httpx.get(
            f"{server.root}/api/documents/{doc['id']}",
            headers={"Authorization": f"Bearer {MASTER}"},
            timeout=10,
        )
        assert master.status_code == 200

        assert counts(server) == (3, 4)
        assert doc["sha256"] in blob_files(server)
        gone = a.delete(f"/documents/{doc['id']}")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert a.get(f"/documents/{doc['id']}").status_code == 404
        assert counts(server) == (2, 2)
        assert doc["sha256"] not in blob_files(server)
        # Deleting a conversation takes its documents and their blobs along.
        again = upload(a, "again.txt", b"kept in the conversation", conversation_id=cid)
        assert a.delete(f"/conversations/{cid}").status_code == 204
        assert a.get(f"/documents/{again.json()['id']}").status_code == 404
        assert again.json()["sha256"] not in blob_files(server)


@pytest.mark.parametrize(
    ("name", "data", "status", "code"),
    [
        ("empty.txt", b"", 400, "empty_file"),
        ("fake.pdf", b"just some text pretending", 400, "not_a_pdf"),
        ("damaged.pdf", b"%PDF-1.7\n%%%% not really", 400, "unreadable_pdf"),
        ("locked.pdf", make_pdf([["locked away"]], password="s3cret"), 400, "encrypted_pdf"),
        ("blank.pdf", make_pdf([[]]), 400, "no_text"),
        (
            "image.png",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64),
            415,
            "unsupported_media_type",
        ),
        ("big.txt", b"a" * (LIMIT + 1), 413, "request_too_large"),
    ],
    ids=["empty", "not-a-pdf", "damaged", "encrypted", "no-text", "image", "oversize"],
)
def test_bad_files_get_clear_errors_and_leave_nothing(
    server: ParleyServer, name: str, data: bytes, status: int, code: str
) -> None:
    with client(server, "alpha") as a:
        reply = upload(a, name, data, collection="inbox")
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["code"] == code and len(error["message"]) > 10
        assert error["param"] == "file"
        assert counts(server) == (0, 0)
        assert blob_files(server) == set()
        assert (
            rows(
                server.settings.database_url,
                "SELECT count(*) AS n FROM search_outbox WHERE kind = 'chunk'",
            )[0]["n"]
            == 0
        )
        assert a.get("/documents").json()["data"] == []


def test_the_form_must_say_where_the_document_goes(server: ParleyServer) -> None:
    with client(server, "alpha") as a:
        for fields in ({}, {"collection": "a", "conversation_id": str(uuid.uuid4())}):
            reply = upload(a, "n.txt", b"text", **fields)
            assert reply.status_code == 400, reply.text
        assert upload(a, "n.txt", b"text", collection="x" * 129).status_code == 400
        # Not a form at all: the Content-Type header is what is wrong.
        refused = a.post("/documents", json={"collection": "a"})
        assert refused.status_code == 415, refused.text
        assert refused.json()["error"]["param"] == "Content-Type"
        assert a.get("/documents", params={"status": "done"}).status_code == 400
        assert counts(server) == (0, 0) and blob_files(server) == set()


def test_a_pdf_whose_text_holds_nul_characters_is_read_without_them(
    server: ParleyServer,
) -> None:
    """pypdf gives NUL for glyphs a font cannot map; PostgreSQL text cannot hold one (the
    upload was a 500 there) and SQLite would keep it (sent to the embedder and upstream)."""
    pdf = make_pdf([["Heron\x00 code 7731", "\x00\x00"]])
    with client(server, "alpha") as a:
        reply = upload(a, "glyphs.pdf", pdf, collection="inbox")
        assert reply.status_code == 201, reply.text
        assert reply.json()["chunk_count"] == 1
        [stored] = rows(server.settings.database_url, "SELECT content FROM document_chunks")
        assert stored["content"] == "Heron code 7731"
        # A PDF with nothing but NUL for text has no text.
        blank = upload(a, "blank.pdf", make_pdf([["\x00 \x00"]]), collection="inbox")
        assert blank.status_code == 400 and blank.json()["error"]["code"] == "no_text"
