"""Attachments and export / import over real HTTP to a real parley (SQLite and PostgreSQL).

Uploads go through httpx multipart (or hand-made bodies where httpx would clean a name
up first); the blob directory and the data directory are inspected on disk to show that
a refused upload leaves nothing behind and that nothing is ever written outside the blob
directory."""

from __future__ import annotations

import copy
import hashlib
import random
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from parley.security import tokens
from parley.store.schema import api_keys, users
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config

LIMIT = 256 * 1024
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
ALLOWED_HINT = "upload PNG, JPEG, GIF or WebP images, PDF, or UTF-8 text"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    write_config(
        tmp_path,
        [{"name": "up", "kind": "openai", "base_url": upstream.base_url, "models": ["m"]}],
    )
    settings = settings_for(tmp_path, database_url, PARLEY_MAX_UPLOAD_BYTES=str(LIMIT))
    with ParleyServer(settings) as running:
        yield running


@pytest.fixture
def http(server: ParleyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root, timeout=30) as client:
        yield client


def blob_dir(server: ParleyServer) -> Path:
    return server.settings.blob_dir


def blob_files(server: ParleyServer) -> list[str]:
    """Every file under the blob directory, relative to it (temporary area included)."""
    root = blob_dir(server)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def data_files(server: ParleyServer) -> set[str]:
    root = server.settings.data_dir
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def upload(
    http: httpx.Client,
    data: bytes,
    name: str = "file.txt",
    content_type: str = "application/octet-stream",
    **fields: str,
) -> httpx.Response:
    return http.post("/api/attachments", files={"file": (name, data, content_type)}, data=fields)


def raw_upload(http: httpx.Client, disposition: bytes, data: bytes) -> httpx.Response:
    """A multipart body made by hand: the file part's Content-Disposition exactly as given."""
    boundary = b"parley-test-boundary"
    body = (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="file"; ' + disposition + b"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
        b"--" + boundary + b"--\r\n"
    )
    return http.post(
        "/api/attachments",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=" + boundary.decode()},
    )


def error_message(response: httpx.Response) -> str:
    message: str = response.json()["error"]["message"]
    return message


# --- upload, download, delete --------------------------------------------------------


def test_upload_metadata_download_and_delete(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    sent = upload(http, PNG, "cat picture.png", "image/png")
    assert sent.status_code == 201, sent.text
    body = sent.json()
    sha = hashlib.sha256(PNG).hexdigest()
    assert {k: body[k] for k in ("filename", "mime_type", "size", "sha256")} == {
        "filename": "cat picture.png",
        "mime_type": "image/png",
        "size": len(PNG),
        "sha256": sha,
    }
    assert body["conversation_id"] is None and body["created_at"]
    assert http.get(f"/api/attachments/{body['id']}").json() == body
    assert blob_files(server) == [f"{sha[:2]}/{sha}"]

    got = http.get(f"/api/attachments/{body['id']}/content")
    assert got.status_code == 200 and got.content == PNG
    assert got.headers["content-type"] == "image/png"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"cat picture.png\"; filename*=UTF-8''cat%20picture.png"
    )
    assert "sandbox" in got.headers["content-security-policy"]

    deleted = http.delete(f"/api/attachments/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "attachment", "deleted": True}
    for path in ("", "/content"):
        assert http.get(f"/api/attachments/{body['id']}{path}").status_code == 404
    assert http.delete(f"/api/attachments/{body['id']}").status_code == 404
    assert blob_files(server) == []
    assert rows(database_url, "SELECT count(*) AS n FROM attachments") == [{"n": 0}]


def test_mime_type_comes_from_the_content_never_from_the_client(http: httpx.Client) -> None:
    cases = [
        (PNG, "looks-like.txt", "text/plain", "image/png"),
        (b"\xff\xd8\xff\xe0" + bytes(32), "x.bin", "text/html", "image/jpeg"),
        (b"GIF89a" + bytes(32), "a.gif", "image/gif", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(32), "w.webp", "image/webp", "image/webp"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "doc.pdf", "application/pdf", "application/pdf"),
        ("# Titre\n\nnaïve".encode(), "notes.MD", "text/plain", "text/markdown"),
        (b"a,b\n1,2\n", "t.csv", "text/csv", "text/csv"),
        (b'{"a": 1}', "d.json", "application/json", "application/json"),
        (b"<script>alert(1)</script>", "page.html", "text/html", "text/plain"),
        (b"BMW sales were up\n", "bmw.txt", "text/plain", "text/plain"),  # "BM": bitmap magic
        (b"no extension at all", "README", "application/octet-stream", "text/plain"),
    ]
    for data, name, claimed, expected in cases:
        sent = upload(http, data, name, claimed)
        assert sent.status_code == 201, (name, sent.text)
        assert sent.json()["mime_type"] == expected, name
    page = http.get(f"/api/attachments/{sent.json()['id']}/content")
    assert page.headers["content-type"] == "text/plain; charset=utf-8"
    assert page.content == b"no extension at all"


REFUSED = [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(120), "application/x-executable"),
    (b"MZ\x90\x00\x03" + bytes(120), "application/x-msdownload"),
    (b"PK\x03\x04\x14\x00\x00\x00" + bytes(60), "application/zip"),
    (random.Random(7).randbytes(4096), None),
    ("text that ends mid-character é".encode()[:-1], None),
    (b"text with a NUL \x00 inside", None),
]


def test_types_outside_the_allowlist_are_415(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    for data, detected in REFUSED:
        refused = upload(http, data, "harmless.txt", "text/plain")
        assert refused.status_code == 415, refused.text
        # The file's detected type was wrong (not the Content-Type its part announced).
        assert refused.json()["error"]["param"] == "file"
        assert refused.json()["error"]["code"] == "unsupported_media_type"
        message = error_message(refused)
        assert ALLOWED_HINT in message
        assert (detected or "binary files of unknown type") in message
    assert blob_files(server) == []
    assert rows(database_url, "SELECT count(*) AS n FROM attachments") == [{"n": 0}]


def test_oversized_uploads_are_413_and_leave_no_temporary_file(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    # Just over the limit: refused while streaming, after part of it was written.
    streamed = upload(http, b"a" * (LIMIT + 1), "big.txt")
    assert streamed.status_code == 413, streamed.text
    assert str(LIMIT) in error_message(streamed)
    assert streamed.json()["error"]["param"] == "file"
    # Far over it: refused from Content-Length before a byte is read.
    announced = upload(http, b"b" * (LIMIT * 8), "bigger.txt")
    assert announced.status_code == 413
    assert announced.json()["error"]["param"] == "file"
    assert blob_files(server) == []
    assert rows(database_url, "SELECT count(*) AS n FROM attachments") == [{"n": 0}]
    # Exactly at the limit is fine, and the connection pool still works.
    assert upload(http, b"c" * LIMIT, "fits.txt").status_code == 201


def test_a_client_gone_mid_upload_leaves_no_temporary_file(server: ParleyServer) -> None:
    part = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /api/attachments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {LIMIT}\r\n\r\n".encode()
            + part
            + b"a" * 100_000
        )
        wait_for(lambda: blob_files(server))  # the upload's temporary file is there
    wait_for(lambda: blob_files(server) == [])


def test_empty_missing_and_malformed_uploads_are_400(
    http: httpx.Client, server: ParleyServer
) -> None:
    empty = upload(http, b"", "empty.txt")
    assert (empty.status_code, error_message(empty)) == (400, "the file is empty")
    no_file = http.post("/api/attachments", files={"other": ("x.txt", b"x")})
    assert no_file.status_code == 400 and "unknown form field" in error_message(no_file)
    assert blob_files(server) == []


def test_a_body_that_is_not_a_form_is_415_naming_the_content_type(
    http: httpx.Client, server: ParleyServer
) -> None:
    for headers in ({}, {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}):
        refused = http.post("/api/attachments", content=b"hello", headers=headers)
        assert refused.status_code == 415, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("Content-Type", "unsupported_media_type")
        assert "multipart/form-data" in error["message"]
    assert blob_files(server) == []


def test_two_files_are_400(http: httpx.Client, server: ParleyServer) -> None:
    two = http.post(
        "/api/attachments", files=[("file", ("a.txt", b"a")), ("file", ("b.txt", b"b"))]
    )
    assert two.status_code == 400 and "one file" in error_message(two)
    assert blob_files(server) == []


def test_file_names_are_metadata_only_and_sanitised(
    http: httpx.Client, server: ParleyServer
) -> None:
    for content in (b"x", b"y"):  # the directories exist before the "before" snapshot
        upload(http, content)
    before = data_files(server)
    long_name = "a" * 4996 + ".txt"
    cases: list[tuple[bytes, str]] = [
        (b'filename="../../etc/passwd"', "passwd"),
        (b'filename="/abs/path/secret.txt"', "secret.txt"),
        (b'filename="..\\\\..\\\\windows\\\\win.ini"', "win.ini"),
        (b"filename*=UTF-8''evil%00name.txt", "evilname.txt"),
        (b"filename*=UTF-8''line%0D%0Abreak%E2%80%AEtxt.exe", "linebreaktxt.exe"),
        (b'filename=".."', "upload"),
        (b'filename="' + long_name.encode() + b'"', "a" * 251 + ".txt"),
        (b"filename*=UTF-8''%E6%97%A5%E6%9C%AC.md", "日本.md"),
    ]
    created = []
    for i, (disposition, expected) in enumerate(cases):
        sent = raw_upload(http, disposition, f"payload {i}\n".encode())
        assert sent.status_code == 201, (disposition, sent.text)
        assert sent.json()["filename"] == expected
        created.append(sent.json())
    # What appeared on disk: only content-addressed blobs inside the blob directory.
    expected_blobs = {f"blobs/{a['sha256'][:2]}/{a['sha256']}" for a in created}
    new = data_files(server) - before
    assert {p for p in new if not p.startswith("blobs/")} <= {"parley.db-journal"}
    assert {p for p in new if "/" in p[len("blobs/") :]} == expected_blobs
    assert blob_dir(server).joinpath("tmp").exists() and not any(
        blob_dir(server).joinpath("tmp").iterdir()
    )
    # The stored name comes back safely quoted in the download header.
    got = http.get(f"/api/attachments/{created[-1]['id']}/content")
    assert got.headers["content-disposition"] == (
        "attachment; filename=\"__.md\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.md"
    )
    assert got.headers["content-type"] == "text/markdown; charset=utf-8"


def test_a_symlink_planted_in_the_blob_directory_is_never_followed(
    http: httpx.Client, server: ParleyServer, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-secret.txt"
    outside.write_bytes(b"top secret")
    data = b"innocent upload\n"
    sha = hashlib.sha256(data).hexdigest()
    shard = blob_dir(server) / sha[:2]
    shard.mkdir(mode=0o700)
    (shard / sha).symlink_to(outside)

    # Writing replaces the link with the blob; the link's target is untouched.
    sent = upload(http, data, "innocent.txt")
    assert sent.status_code == 201
    assert outside.read_bytes() == b"top secret"
    assert not (shard / sha).is_symlink()
    assert http.get(f"/api/attachments/{sent.json()['id']}/content").content == data

    # Reading refuses a link planted over an existing blob.
    (shard / sha).unlink()
    (shard / sha).symlink_to(outside)
    refused = http.get(f"/api/attachments/{sent.json()['id']}/content")
    assert refused.status_code == 404
    assert b"top secret" not in refused.content


def test_same_bytes_twice_are_one_blob_until_the_last_row_goes(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    first = upload(http, b"same bytes", "one.txt").json()
    second = upload(http, b"same bytes", "two.txt").json()
    assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
    assert len(blob_files(server)) == 1
    assert len(rows(database_url, "SELECT id FROM attachments")) == 2

    assert http.delete(f"/api/attachments/{first['id']}").status_code == 200
    assert http.get(f"/api/attachments/{second['id']}/content").content == b"same bytes"
    assert http.delete(f"/api/attachments/{second['id']}").status_code == 200
    assert blob_files(server) == []


def test_uploads_into_a_conversation(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    imported = http.post("/api/import", json=PARLEY_DOC)
    [conv_id] = imported.json()["conversations"]
    sent = upload(http, b"for this chat", "c.txt", conversation_id=conv_id)
    assert sent.status_code == 201 and sent.json()["conversation_id"] == conv_id
    for bad in (str(uuid.uuid4()), "not-a-uuid"):
        refused = upload(http, b"lost", "c.txt", conversation_id=bad)
        assert refused.status_code == 404
        assert error_message(refused).startswith("no such conversation")
    assert len(blob_files(server)) == 1  # the refused ones left nothing


# --- export and import ---------------------------------------------------------------

PARLEY_DOC: dict[str, Any] = {
    "format": "parley",
    "version": 1,
    "conversations": [
        {
            "id": "x",
            "title": "Imported",
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:01:00Z",
            "messages": [
                {
                    "id": "1",
                    "parent_id": None,
                    "created_at": "2024-01-01T00:00:00Z",
                    "message": {"role": "user", "content": "hi"},
                },
                {
                    "id": "2",
                    "parent_id": "1",
                    "created_at": "2024-01-01T00:01:00Z",
                    "model": "gpt-4o-mini",
                    "message": {"role": "assistant", "content": "echo: hi"},
                },
            ],
        }
    ],
}


def tree(conv: dict[str, Any]) -> dict[str, Any]:
    """A conversation without the ids an import renews."""
    conv = copy.deepcopy(conv)
    position = {m["id"]: i for i, m in enumerate(conv["messages"])}
    conv.pop("id")
    conv.pop("source")
    conv["active_leaf_id"] = position.get(conv["active_leaf_id"])
    for m in conv["messages"]:
        m["id"], m["parent_id"] = position[m["id"]], position.get(m["parent_id"])
    return conv


def test_a_conversation_made_through_v1_exports_and_imports_back_to_the_same_tree(
    http: httpx.Client, server: ParleyServer, database_url: str
) -> None:
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    history: list[Any] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
    ]
    answer = sdk.chat.completions.create(model="up/m", messages=history)
    history.append({"role": "assistant", "content": answer.choices[0].message.content})
    history.append({"role": "user", "content": "second question"})
    sdk.chat.completions.create(model="up/m", messages=history)
    # The same history again: a regenerated answer, a sibling branch.
    sdk.chat.completions.create(model="up/m", messages=history)
    [conv] = rows(database_url, "SELECT public_id FROM conversations")
    conv_id = str(uuid.UUID(str(conv["public_id"])))

    exported = http.get(f"/api/conversations/{conv_id}/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/json"
    assert exported.headers["content-disposition"].startswith("attachment;")
    original = exported.json()
    [source] = original["conversations"]
    assert [m["message"]["role"] for m in source["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "assistant",
    ]
    assert source["messages"][4]["parent_id"] == source["messages"][5]["parent_id"]

    imported = http.post("/api/import", json=original)
    assert imported.status_code == 201
    [new_id] = imported.json()["conversations"]
    assert imported.json()["imported"] == 1 and new_id != conv_id
    [copy_] = http.get(f"/api/conversations/{new_id}/export").json()["conversations"]
    assert tree(copy_) == tree(source)
    assert copy_["source"] == "import"

    everything = http.get("/api/export").json()["conversations"]
    assert [c["id"] for c in everything] == [conv_id, new_id]
    jsonl = http.get(f"/api/conversations/{new_id}/export", params={"format": "jsonl"})
    assert jsonl.headers["content-type"] == "application/x-ndjson"
    [line] = jsonl.text.splitlines()
    roles = [m["role"] for m in httpx.Response(200, content=line).json()["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert len(http.get("/api/export?format=jsonl").text.splitlines()) == 2


def test_import_and_export_errors(http: httpx.Client) -> None:
    assert http.get(f"/api/conversations/{uuid.uuid4()}/export").status_code == 404
    assert http.get("/api/conversations/nope/export").status_code == 404
    bad_format = http.get("/api/export", params={"format": "xml"})
    assert bad_format.status_code == 400 and "json or jsonl" in error_message(bad_format)
    for body, message in [
        (b"", "empty"),
        (b"[1, 2]", "not an export parley can import"),
        (b"{", "not valid JSON"),
    ]:
        refused = http.post("/api/import", content=body)
        assert refused.status_code == 400 and message in error_message(refused)
    refused = http.post("/api/import", params={"format": "chatgpt"}, json=PARLEY_DOC)
    assert refused.status_code == 400 and "ChatGPT" in error_message(refused)
    chatgpt = [
        {
            "title": "From ChatGPT",
            "create_time": 1_700_000_000.0,
            "current_node": "b",
            "mapping": {
                "a": {
                    "id": "a",
                    "parent": None,
                    "children": ["b"],
                    "message": {
                        "author": {"role": "user"},
                        "content": {"content_type": "text", "parts": ["hello"]},
                    },
                },
                "b": {
                    "id": "b",
                    "parent": "a",
                    "children": [],
                    "message": {
                        "author": {"role": "assistant"},
                        "content": {"content_type": "text", "parts": ["hi!"]},
                    },
                },
            },
        }
    ]
    done = http.post("/api/import", params={"format": "chatgpt"}, json=chatgpt)
    assert done.status_code == 201 and done.json()["imported"] == 1


# --- ownership over HTTP (master key: user API keys) ---------------------------------


def add_user_with_key(database_url: str, name: str) -> str:
    engine = sa.create_engine(database_url)
    key = tokens.new_api_key()
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            user_id = conn.execute(
                sa.insert(users)
                .values(
                    public_id=uuid.uuid4(),
                    email=f"{name}@example.com",
                    username=name,
                    password_hash="not-a-real-hash",
                    role="user",
                    is_active=True,
                    preferences="{}",
                    created_at=now,
                    updated_at=now,
                )
                .returning(users.c.id)
            ).scalar_one()
            conn.execute(
                sa.insert(api_keys).values(
                    public_id=uuid.uuid4(),
                    user_id=user_id,
                    name="test",
                    prefix=tokens.display_prefix(key),
                    key_hash=tokens.digest(key),
                    created_at=now,
                )
            )
    finally:
        engine.dispose()
    return key


def test_attachments_and_exports_belong_to_their_owner(tmp_path: Path, database_url: str) -> None:
    settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY="master-key-for-tests")
    with ParleyServer(settings) as server:
        alice_key = add_user_with_key(database_url, "alice")
        bob_key = add_user_with_key(database_url, "bob")
        alice = httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {alice_key}"})
        bob = httpx.Client(base_url=server.root, headers={"x-api-key": bob_key})
        master = httpx.Client(
            base_url=server.root, headers={"Authorization": "Bearer master-key-for-tests"}
        )
        anonymous = httpx.Client(base_url=server.root)
        with alice, bob, master, anonymous:
            [conv_id] = alice.post("/api/import", json=PARLEY_DOC).json()["conversations"]
            mine = upload(alice, b"alice's file", "a.txt", conversation_id=conv_id).json()
            assert mine["conversation_id"] == conv_id

            for path in (
                f"/api/attachments/{mine['id']}",
                f"/api/attachments/{mine['id']}/content",
            ):
                assert bob.get(path).status_code == 404
                assert anonymous.get(path).status_code == 401
                assert master.get(path).status_code == 200  # admins see all
            assert bob.delete(f"/api/attachments/{mine['id']}").status_code == 404
            assert upload(bob, b"x", conversation_id=conv_id).status_code == 404
            assert bob.get(f"/api/conversations/{conv_id}/export").status_code == 404
            assert bob.get("/api/export").json()["conversations"] == []
            assert anonymous.post("/api/import", json=PARLEY_DOC).status_code == 401

            [exported] = alice.get("/api/export").json()["conversations"]
            assert exported["id"] == conv_id
            assert master.get(f"/api/conversations/{conv_id}/export").status_code == 200
            assert alice.get(f"/api/attachments/{mine['id']}/content").content == b"alice's file"
            assert alice.delete(f"/api/attachments/{mine['id']}").status_code == 200
        owners = rows(database_url, "SELECT DISTINCT user_id FROM messages")
        assert len(owners) == 1 and owners[0]["user_id"] is not None
