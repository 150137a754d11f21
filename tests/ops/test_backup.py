"""Backups on a real SQLite file and a real PostgreSQL database: the archive, its manifest
and checks, encryption, the fallback directory, listing and pruning."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import re
import stat
import tarfile
import time
from pathlib import Path

import pytest

from parley.errors import BackupError
from parley.ops import migrate, pgtools
from parley.ops.backup import create_backup, list_backups, prune_backups, verify_backup
from parley.ops.presence import ServerPresence
from parley.settings import Settings
from parley.store import snapshot
from tests.ops.backup_support import CANARY, backup_settings, counts, files, flip_byte, seed

HEAD = migrate.heads()[0]

NAME = re.compile(r"^parley-\d{8}T\d{6}\.\d{3}Z\.tar\.gz$")


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return backup_settings(tmp_path, database_url)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}  # type: ignore[union-attr]


def test_a_backup_is_one_private_archive_whose_manifest_describes_it(
    settings: Settings,
) -> None:
    seed(settings)
    with ServerPresence(settings):  # online: a server holds the database meanwhile
        info = create_backup(settings)

    assert info.path.parent == settings.backup.dir and NAME.match(info.path.name)
    assert mode(settings.backup.dir) == 0o700 and mode(info.path) == 0o600
    assert sorted(os.listdir(settings.backup.dir)) == [info.path.name]  # no leftovers

    inside = members(info.path)
    names = list(inside)
    assert names[0] == "summary.json" and names[-1] == "manifest.json"
    manifest = info.manifest
    kind = "sqlite" if settings.is_sqlite else "postgresql"
    assert manifest["database_kind"] == kind and manifest["database"]["kind"] == kind
    assert manifest["schema_revision"] == HEAD and manifest["encrypted"] is False
    assert manifest["parley_version"] == "0.1.0"
    assert {t: v["rows"] for t, v in manifest["database"]["tables"].items()} == counts(settings)
    assert manifest["database"]["tables"]["request_log"]["rows"] == 20
    # Every file is listed with its real checksum; the data directories are all there.
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(inside[name]).hexdigest() == entry["sha256"]
        assert len(inside[name]) == entry["size"]
    blobs = {f"blobs/{k}" for k in files(settings.blob_dir) if not k.startswith("tmp/")}
    assert blobs and blobs <= set(manifest["files"])
    assert "vectors/chunks.lance/data.bin" in manifest["files"]
    assert ("database/parley.db" if settings.is_sqlite else "database/parley.pgdump") in inside

    assert verify_backup(info.path, settings) == manifest
    [listed] = list_backups(settings)
    assert listed.path == info.path and listed.created_at == info.created_at
    assert listed.manifest["schema_revision"] == HEAD and not listed.encrypted


def test_a_damaged_archive_fails_verification(settings: Settings, tmp_path: Path) -> None:
    seed(settings)
    info = create_backup(settings)
    original = info.path.read_bytes()

    flip_byte(info.path)
    with pytest.raises(BackupError, match=r"damaged|not a readable"):
        verify_backup(info.path, settings)

    # A well-formed archive with one member changed: only the manifest can tell.
    inside = members(Path(_write(tmp_path / "orig.tar.gz", original)))
    blob = next(n for n in inside if n.startswith("blobs/"))
    inside[blob] = b"tampered" + inside[blob][8:]
    rebuilt = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=rebuilt, mode="wb") as gz,
        tarfile.open(fileobj=gz, mode="w|") as tar,
    ):
        for name, data in inside.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    info.path.write_bytes(rebuilt.getvalue())
    with pytest.raises(BackupError, match=f"checksum mismatch for {blob}"):
        verify_backup(info.path, settings)

    info.path.write_bytes(original[: len(original) // 2])
    with pytest.raises(BackupError):
        verify_backup(info.path, settings)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_an_encrypted_archive_hides_everything_but_its_summary(
    tmp_path: Path,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = backup_settings(tmp_path, database_url, PARLEY_BACKUP_KEY=CANARY)
    seed(settings)
    # Spy on where the plain database snapshot is written: never in the backup directory.
    plain: list[Path] = []
    for module, name, index in ((snapshot, "copy_sqlite", 1), (pgtools, "dump", 2)):
        real = getattr(module, name)

        def spy(*args: object, _real: object = real, _index: int = index) -> object:
            plain.append(Path(str(args[_index])))
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(module, name, spy)
    with caplog.at_level(logging.DEBUG):
        info = create_backup(settings)
    assert info.path.name.endswith(".tar.gz.enc") and info.encrypted
    assert len(plain) == 1 and not plain[0].is_relative_to(settings.backup.dir)
    assert not plain[0].exists()  # and it is gone

    raw = info.path.read_bytes()
    assert not raw.startswith(b"\x1f\x8b")  # not a readable gzip
    for secret in (CANARY.encode(), b"request_log", b"question 1", b"database/parley"):
        assert secret not in raw
    for path in settings.backup.dir.rglob("*"):
        assert not path.is_file() or CANARY.encode() not in path.read_bytes()
    assert CANARY not in caplog.text

    [listed] = list_backups(settings)  # the summary is readable without the key
    assert listed.encrypted and listed.manifest["schema_revision"] == HEAD
    assert set(listed.manifest) == {
        "created_at", "database_kind", "encrypted", "format", "parley_version",
        "schema_revision",
    }  # fmt: skip

    assert (
        verify_backup(info.path, settings)["database"]["tables"]
        == (info.manifest["database"]["tables"])
    )
    wrong = backup_settings(tmp_path, database_url, PARLEY_BACKUP_KEY="another key")
    with pytest.raises(BackupError, match="encrypted with a different key") as refused:
        verify_backup(info.path, wrong)
    assert CANARY not in str(refused.value)
    with pytest.raises(BackupError, match="is encrypted: set PARLEY_BACKUP_KEY"):
        verify_backup(info.path, backup_settings(tmp_path, database_url))

    # The readable header is authenticated too: an edited summary fails decryption.
    edited = raw.replace(f'"schema_revision": "{HEAD}"'.encode(), b'"schema_revision": "0900"', 1)
    assert edited != raw
    info.path.write_bytes(edited)
    assert list_backups(settings)[0].manifest["schema_revision"] == "0900"
    with pytest.raises(BackupError, match="damaged"):
        verify_backup(info.path, settings)
    info.path.write_bytes(raw)
    flip_byte(info.path, len(raw) - 100)
    with pytest.raises(BackupError, match="damaged"):
        verify_backup(info.path, settings)
    info.path.write_bytes(raw[:-20])
    with pytest.raises(BackupError, match="truncated"):
        verify_backup(info.path, settings)


def test_the_fallback_directory_takes_the_backup_when_the_primary_cannot(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "backups").write_text("a file where the directory should be")
    settings = backup_settings(tmp_path, database_url)
    seed(settings, count=3)
    with caplog.at_level(logging.WARNING, logger="parley.ops.backup"):
        info = create_backup(settings)
    assert info.path.parent == tmp_path / "fallback"
    assert mode(tmp_path / "fallback") == 0o700
    assert "is not writable" in caplog.text and str(tmp_path / "fallback") in caplog.text
    assert [b.path for b in list_backups(settings)] == [info.path]

    # An explicit destination has no fallback; neither directory usable: a clear error.
    with pytest.raises(BackupError, match="backups"):
        create_backup(settings, to=tmp_path / "backups")
    (tmp_path / "fallback2").write_text("")
    stuck = backup_settings(
        tmp_path, database_url, PARLEY_BACKUP_FALLBACK_DIR=str(tmp_path / "fallback2")
    )
    with pytest.raises(BackupError, match="no backup directory could be written") as error:
        create_backup(stuck)
    assert "backups" in str(error.value) and "fallback2" in str(error.value)


def test_prune_keeps_the_newest_and_touches_nothing_else(settings: Settings) -> None:
    seed(settings, count=2)
    made = [create_backup(settings).path for _ in range(4)]
    directory = settings.backup.dir
    others = ["notes.txt", "parley-latest.tar.gz", "parley-20200101T000000.000Z.tar.gz.bak"]
    for name in others:
        (directory / name).write_text("not ours")
    stale = directory / ".parley-tmp-crashed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    fresh = directory / ".parley-tmp-running"
    fresh.mkdir()

    assert prune_backups(settings, keep=2) == made[:2][::-1]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [made[2].name, made[3].name, *others, fresh.name]
    )
    assert [b.path for b in list_backups(settings)] == [made[3], made[2]]
    assert prune_backups(settings) == []  # default keep (7) is more than there are
    with pytest.raises(BackupError, match="at least 1"):
        prune_backups(settings, keep=0)


def test_nothing_to_back_up_is_an_error_not_an_empty_archive(tmp_path: Path) -> None:
    missing = backup_settings(tmp_path, f"sqlite:///{tmp_path / 'none' / 'parley.db'}")
    with pytest.raises(BackupError, match="no database at"):
        create_backup(missing)
    assert not (tmp_path / "none" / "parley.db").exists()  # never created by a backup
    assert list_backups(missing) == []
    with pytest.raises(BackupError, match="in-memory"):
        create_backup(backup_settings(tmp_path, "sqlite://"))


def test_symlinks_in_the_data_directories_are_not_followed(
    tmp_path: Path, database_url: str
) -> None:
    settings = backup_settings(tmp_path, database_url)
    seed(settings, count=1)
    secret = tmp_path / "outside.txt"
    secret.write_text("private file outside the data directory")
    (settings.blob_dir / "ab").mkdir(exist_ok=True)
    (settings.blob_dir / "ab" / ("ab" + "0" * 62)).symlink_to(secret)
    (settings.data_dir / "vectors" / "link").symlink_to(tmp_path)
    info = create_backup(settings)
    assert not any("ab000" in name or "link" in name for name in info.manifest["files"])
    assert all(b"private file" not in data for data in members(info.path).values())
