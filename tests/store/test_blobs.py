"""The blob directory on a real file system, and the attachment rows that name its blobs
(real SQLite file and real PostgreSQL): content addressing, dedup, symlinks refused,
nothing left in the temporary area, sweeping only unreferenced blobs, ownership."""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.chat.attachments import Attachments, content_part
from parley.errors import NotFound, StoreError
from parley.server.identity import LOCAL, Identity
from parley.store import attachments as repo
from parley.store.blobs import BlobStore
from parley.store.engine import writer_connection
from parley.store.schema import conversations, users

DATA = b"hello, blob\n"
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path / "data" / "blobs")
    store.ensure()
    return store


def put(store: BlobStore, data: bytes) -> str:
    with store.begin() as pending:
        pending.write(data)
        sha = pending.finish()
        pending.settle()
    return sha


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_write_is_content_addressed_private_and_leaves_no_temporary_file(
    blobs: BlobStore,
) -> None:
    assert put(blobs, DATA) == SHA
    path = blobs.root / SHA[:2] / SHA
    assert path.read_bytes() == DATA
    assert mode(path) == 0o600
    assert mode(blobs.root) == mode(path.parent) == mode(blobs.root / "tmp") == 0o700
    assert blobs.temporary_files() == []
    assert blobs.read(SHA) == DATA


def test_same_bytes_twice_are_one_file(blobs: BlobStore) -> None:
    assert put(blobs, DATA) == put(blobs, DATA)
    assert [p.name for p in (blobs.root / SHA[:2]).iterdir()] == [SHA]


def test_a_discarded_upload_leaves_nothing(blobs: BlobStore) -> None:
    with blobs.begin() as pending:
        pending.write(b"half an upload")
        assert len(blobs.temporary_files()) == 1
    assert blobs.temporary_files() == []
    assert [p.name for p in blobs.root.iterdir()] == ["tmp"]


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", SHA.upper(), SHA[:63], SHA + "0", "/" + SHA[1:], ""]
)
def test_only_a_lower_case_sha256_names_a_blob(blobs: BlobStore, name: str) -> None:
    put(blobs, DATA)
    with pytest.raises(NotFound):
        blobs.open(name)
    assert not blobs.exists(name)


def test_a_symlink_planted_where_a_blob_goes_is_refused_on_read(
    blobs: BlobStore, tmp_path: Path
) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"not yours")
    (blobs.root / SHA[:2]).mkdir(mode=0o700)
    (blobs.root / SHA[:2] / SHA).symlink_to(secret)
    with pytest.raises(NotFound):
        blobs.read(SHA)
    assert not blobs.exists(SHA)


def test_writing_replaces_a_planted_symlink_and_never_follows_it(
    blobs: BlobStore, tmp_path: Path
) -> None:
    existing = tmp_path / "outside.txt"
    existing.write_bytes(b"keep me")
    missing = tmp_path / "created-through-a-link.txt"
    for target in (existing, missing):
        (blobs.root / SHA[:2]).mkdir(mode=0o700, exist_ok=True)
        link = blobs.root / SHA[:2] / SHA
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        assert put(blobs, DATA) == SHA
        assert not link.is_symlink() and link.read_bytes() == DATA
    assert existing.read_bytes() == b"keep me"
    assert not missing.exists()
    assert blobs.read(SHA) == DATA


def test_a_symlinked_shard_directory_is_refused_both_ways(blobs: BlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (blobs.root / SHA[:2]).symlink_to(outside, target_is_directory=True)
    (outside / SHA).write_bytes(b"planted")
    with pytest.raises(NotFound):
        blobs.read(SHA)
    with pytest.raises(StoreError):
        put(blobs, DATA)
    assert sorted(p.name for p in outside.iterdir()) == [SHA]
    assert (outside / SHA).read_bytes() == b"planted"
    assert blobs.temporary_files() == []


def test_sweep_deletes_only_unreferenced_blobs(blobs: BlobStore) -> None:
    put(blobs, DATA)
    assert not blobs.sweep(SHA, lambda _sha: True)
    assert blobs.read(SHA) == DATA
    assert blobs.sweep(SHA, lambda _sha: False)
    assert not blobs.exists(SHA)
    assert not blobs.sweep(SHA, lambda _sha: False)  # already gone
    assert blobs.temporary_files() == []


def test_an_upload_racing_a_sweep_of_the_same_bytes_keeps_its_blob(blobs: BlobStore) -> None:
    with blobs.begin() as pending:
        pending.write(DATA)
        pending.finish()
        # A sweep between the blob's publication and its row's commit sees no row...
        assert blobs.sweep(SHA, lambda _sha: False)
        # ...and the upload, once its row is committed, puts the blob back.
        pending.settle()
    assert blobs.read(SHA) == DATA
    assert blobs.temporary_files() == []


def test_stale_temporary_files_are_cleaned(blobs: BlobStore) -> None:
    stale = blobs.begin()
    stale.write(b"left by a crash")
    fresh = blobs.begin()
    old = time.time() - 2 * 86400
    [stale_name] = set(blobs.temporary_files()) - {fresh._name}
    os.utime(blobs.root / "tmp" / stale_name, (old, old))
    assert blobs.clean_temporary() == 1
    assert blobs.temporary_files() == [fresh._name]
    fresh.discard()
    stale.discard()


# --- attachment rows (both databases) ------------------------------------------------


def add_user(engine: sa.Engine, name: str) -> int:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        return int(
            conn.execute(
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
        )


def add_conversation(engine: sa.Engine, user_id: int | None) -> repo.ConversationRef:
    now = datetime.now(UTC)
    public_id = uuid.uuid4()
    with engine.begin() as conn:
        conv_id = conn.execute(
            sa.insert(conversations)
            .values(
                public_id=public_id, created_at=now, updated_at=now, source="chat", user_id=user_id
            )
            .returning(conversations.c.id)
        ).scalar_one()
    return repo.ConversationRef(conv_id, public_id, user_id)


def upload(
    files: Attachments, data: bytes, user_id: int | None, conv: repo.ConversationRef | None = None
) -> repo.AttachmentRow:
    with files.begin() as pending:
        pending.write(data)
        return files.record(
            pending, user_id=user_id, conversation=conv, filename="a.txt", mime_type="text/plain"
        )


def user(user_id: int) -> Identity:
    return Identity(user_id=user_id, api_key_id=None, role="user", via="api_key")


def test_attachments_are_visible_to_their_owner_only(
    migrated_engine: sa.Engine, blobs: BlobStore
) -> None:
    files = Attachments(migrated_engine, blobs)
    alice, bob = add_user(migrated_engine, "alice"), add_user(migrated_engine, "bob")
    hers = upload(files, b"alice's notes", alice)
    local = upload(files, b"the local admin's notes", None)

    assert files.get(hers.public_id, user(alice).may_see).sha256 == hers.sha256
    with pytest.raises(NotFound) as refused:
        files.get(hers.public_id, user(bob).may_see)
    with pytest.raises(NotFound) as missing:
        files.get(uuid.uuid4(), user(bob).may_see)
    # Not yours and does not exist read the same.
    assert refused.value.message.split(":")[0] == missing.value.message.split(":")[0]
    with pytest.raises(NotFound):
        files.get(local.public_id, user(alice).may_see)
    assert files.get(local.public_id, LOCAL.may_see).user_id is None
    assert files.get(hers.public_id, LOCAL.may_see).user_id == alice  # admins see all

    with pytest.raises(NotFound):
        files.for_message([local.public_id, hers.public_id], user(alice).may_see)
    assert files.for_message([hers.public_id], user(alice).may_see) == [hers]

    bobs_chat = add_conversation(migrated_engine, bob)
    with pytest.raises(NotFound):
        files.conversation(bobs_chat.public_id, user(alice).may_see)
    assert files.conversation(bobs_chat.public_id, user(bob).may_see) == bobs_chat


def test_dedup_and_sweeping_follow_the_rows(migrated_engine: sa.Engine, blobs: BlobStore) -> None:
    files = Attachments(migrated_engine, blobs)
    alice = add_user(migrated_engine, "alice")
    first = upload(files, DATA, alice)
    second = upload(files, DATA, None)
    assert first.public_id != second.public_id and first.sha256 == second.sha256 == SHA
    assert sorted(p.name for p in (blobs.root / SHA[:2]).iterdir()) == [SHA]

    files.delete(first)
    assert blobs.read(SHA) == DATA  # the other row still names it
    files.delete(second)
    assert not blobs.exists(SHA)
    assert blobs.temporary_files() == []


def test_deleting_a_conversation_then_sweeping_removes_its_blobs(
    migrated_engine: sa.Engine, blobs: BlobStore
) -> None:
    files = Attachments(migrated_engine, blobs)
    conv = add_conversation(migrated_engine, None)
    kept_elsewhere = upload(files, b"shared bytes", None)
    in_chat = [upload(files, b"shared bytes", None, conv), upload(files, b"only here", None, conv)]
    with migrated_engine.connect() as conn:
        hashes = repo.conversation_blobs(conn, conv.id)
        assert [a.public_id for a in repo.conversation_attachments(conn, conv.id)] == [
            a.public_id for a in in_chat
        ]
    assert hashes == {a.sha256 for a in in_chat}
    with writer_connection(migrated_engine) as conn, conn.begin():
        conn.execute(sa.delete(conversations).where(conversations.c.id == conv.id))
    assert files.sweep(hashes) == 1
    assert blobs.exists(kept_elsewhere.sha256)
    assert not blobs.exists(in_chat[1].sha256)
    with migrated_engine.connect() as conn:
        assert repo.unreferenced(conn, hashes | {SHA}) == {in_chat[1].sha256, SHA}


def test_content_parts_for_the_chat_service(migrated_engine: sa.Engine, blobs: BlobStore) -> None:
    files = Attachments(migrated_engine, blobs)
    png = b"\x89PNG\r\n\x1a\n" + bytes(32)
    with files.begin() as pending:
        pending.write(png)
        image = files.record(
            pending, user_id=None, conversation=None, filename="p.png", mime_type="image/png"
        )
    text = upload(files, "naïve notes".encode(), None)
    [image_part, text_part] = files.parts([image, text])
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert text_part == {
        "type": "text",
        "text": '<file name="a.txt" type="text/plain">\nnaïve notes\n</file>',
    }
    pdf = content_part(
        repo.AttachmentRow(
            1,
            uuid.uuid4(),
            None,
            None,
            None,
            None,
            None,
            'r"1.pdf',
            "application/pdf",
            4,
            SHA,
            datetime.now(UTC),
        ),
        b"%PDF",
    )
    assert pdf == {
        "type": "file",
        "file": {"filename": 'r"1.pdf', "file_data": "data:application/pdf;base64,JVBERg=="},
    }
