"""The backup archive: its name, its members, and streaming them in and out with checks.

An archive is a gzip-compressed tar, optionally inside the encrypted container of
``ops.encryption``, named ``parley-YYYYMMDDTHHMMSS.mmmZ.tar.gz`` (``.tar.gz.enc`` when
encrypted) after the UTC moment its snapshot was taken. Its members, in this order::

    summary.json          non-sensitive summary (``summary``): what ``list`` shows
    database/parley.db    the SQLite snapshot, or database/parley.pgdump (pg_dump -Fc)
    blobs/...             the blob directory, when there is one
    vectors/...           the vector store directory, when there is one
    manifest.json         the summary plus per-table row counts and digests, and the
                          size and SHA-256 of every other member

The manifest comes last because file checksums are computed while the files stream into
the archive (read once, hashed as they go). ``unpack`` reads an archive in one pass and
refuses it unless every member is a regular file under a known prefix with a safe path,
each member's size and SHA-256 match the manifest, nothing listed is missing, and the
summary agrees with the manifest. Members are written only where the caller's ``place``
says, created new (``O_EXCL``, no symlink followed) with mode 0600 in 0700 directories.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from parley.errors import BackupError
from parley.ops.encryption import SealedReader, SealedWriter, is_sealed, read_header
from parley.paths import make_directory
from parley.settings import Secret

FORMAT = 1
# Temporary directories of backups and restores (``prune`` removes stale ones).
TMP_PREFIX = ".parley-tmp-"
SUMMARY = "summary.json"
MANIFEST = "manifest.json"
PREFIXES = ("database/", "blobs/", "vectors/")
NAME = re.compile(r"^parley-(\d{8}T\d{6}\.\d{3})Z\.tar\.gz(\.enc)?$")
_COPY = 1024 * 1024
_MAX_JSON = 64 * 1024 * 1024
# Fields the summary may carry: nothing in them is secret (no paths, URLs or keys).
SUMMARY_FIELDS = (
    "format",
    "created_at",
    "parley_version",
    "database_kind",
    "schema_revision",
    "encrypted",
    "reason",
)


def archive_name(created_at: datetime, *, encrypted: bool) -> str:
    stamp = created_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    millis = created_at.microsecond // 1000
    return f"parley-{stamp}.{millis:03d}Z.tar.gz" + (".enc" if encrypted else "")


def created_from_name(name: str) -> datetime | None:
    """The UTC moment in an archive's name, None when it is not a parley archive name."""
    match = NAME.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in SUMMARY_FIELDS if k in manifest}


@dataclass(frozen=True, slots=True)
class FileEntry:
    size: int
    sha256: str


class ArchiveWriter:
    """Streams members into a new archive on ``raw``: summary first, manifest last."""

    def __init__(self, raw: BinaryIO, head: dict[str, Any], secret: Secret | None) -> None:
        self._head = summary(head)
        self._sealed = SealedWriter(raw, secret, self._head) if secret is not None else None
        target: Any = self._sealed if self._sealed is not None else raw
        # Level 1: most of the gain on text-heavy databases at a fraction of the CPU, and
        # a backup runs beside a serving process.
        self._gzip = gzip.GzipFile(fileobj=target, mode="wb", compresslevel=1, mtime=0)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by finish()
            fileobj=self._gzip, mode="w|", format=tarfile.PAX_FORMAT
        )
        self.files: dict[str, FileEntry] = {}
        self._json(SUMMARY, self._head)

    def add(self, arcname: str, path: Path) -> FileEntry | None:
        """Add the regular file at ``path``; None when it vanished or is not a regular
        file (a symlink is never followed)."""
        _check_name(arcname)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):  # vanished, or a symlink
                return None
            raise
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            info = tarfile.TarInfo(arcname)
            info.size = st.st_size
            info.mode = 0o600
            info.mtime = int(st.st_mtime)
            hashing = _HashingReader(handle, st.st_size, arcname)
            self._tar.addfile(info, hashing)
            entry = FileEntry(st.st_size, hashing.hexdigest())
        self.files[arcname] = entry
        return entry

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (``manifest`` plus the summary and file checksums) and end
        the archive; the caller flushes and closes ``raw``."""
        full = {
            **manifest,
            **self._head,
            "files": {n: {"size": e.size, "sha256": e.sha256} for n, e in self.files.items()},
        }
        self._json(MANIFEST, full)
        self._tar.close()
        self._gzip.close()
        if self._sealed is not None:
            self._sealed.close()
        return full

    def _json(self, name: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o600
        self._tar.addfile(info, io.BytesIO(data))


def read_summary(path: Path) -> dict[str, Any]:
    """An archive's summary, read from its first bytes (no key needed)."""
    with path.open("rb") as raw:
        if is_sealed(raw):
            header, _ = read_header(raw, path.name)
            found = header.get("summary")
            if not isinstance(found, dict):
                raise BackupError(f"{path.name} has a damaged header")
            return found
        try:
            with _tar_reader(raw) as tar:
                member = tar.next()
                if member is None or member.name != SUMMARY:
                    raise BackupError(f"{path.name} is not a parley backup (no summary)")
                return _read_json(tar, member, path.name)
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
            raise BackupError(f"{path.name} is not a readable parley backup: {exc}") from exc


def unpack(
    path: Path, secret: Secret | None, place: Callable[[str], Path | None]
) -> dict[str, Any]:
    """Read and check the whole archive (see the module docstring); return its manifest.

    Each member goes to ``place(name)``, or only through the checks when that is None.
    """
    name = path.name
    try:
        raw: BinaryIO = path.open("rb")
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror or exc}") from exc
    with raw:
        sealed = is_sealed(raw)
        if not sealed and raw.read(2) != b"\x1f\x8b":
            raise BackupError(f"{name} is not a readable parley backup (not a gzip file)")
        raw.seek(0)
        source: Any = SealedReader(raw, secret, name) if sealed else raw
        stream = gzip.GzipFile(fileobj=source, mode="rb")
        try:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    manifest = _unpack(tar, name, place)
            except BackupError:
                # A damaged stream can look like a short archive to tar: reading on to
                # gzip's checksum names the real cause.
                with contextlib.suppress(BackupError):
                    _drain(stream)
                raise
            _drain(stream)  # gzip's CRC and length cover every byte, padding included
            return manifest
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise BackupError(f"{name} is damaged: {exc}") from exc
        except OSError as exc:
            raise BackupError(f"cannot unpack {name}: {exc.strerror or exc}") from exc


def _unpack(tar: tarfile.TarFile, name: str, place: Callable[[str], Path | None]) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != SUMMARY:
        raise BackupError(f"{name} is not a parley backup (no summary)")
    head = _read_json(tar, first, name)
    seen: dict[str, FileEntry] = {}
    manifest: dict[str, Any] | None = None
    while (member := tar.next()) is not None:
        if manifest is not None:
            raise BackupError(f"{name} is damaged: members after the manifest")
        if member.name == MANIFEST:
            manifest = _read_json(tar, member, name)
            continue
        _check_name(member.name)
        if not member.isreg() or member.name in seen:
            raise BackupError(f"{name} holds an unexpected member {member.name!r}")
        seen[member.name] = _copy_member(tar, member, place(member.name), name)
    if manifest is None:
        raise BackupError(f"{name} is truncated: it has no manifest")
    _compare(manifest, head, seen, name)
    return manifest


def _compare(
    manifest: dict[str, Any], head: dict[str, Any], seen: dict[str, FileEntry], name: str
) -> None:
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{name} has format {manifest.get('format')!r}, expected {FORMAT}")
    if summary(manifest) != head:
        raise BackupError(f"{name} is damaged: its summary and manifest disagree")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise BackupError(f"{name} is damaged: its manifest lists no files")
    for member, entry in seen.items():
        want = listed.get(member)
        if want is None:
            raise BackupError(f"{name} holds {member}, which its manifest does not list")
        if (want.get("size"), want.get("sha256")) != (entry.size, entry.sha256):
            raise BackupError(f"{name} is damaged: checksum mismatch for {member}")
    missing = sorted(set(listed) - set(seen))
    if missing:
        raise BackupError(f"{name} is missing {len(missing)} file(s), first {missing[0]}")


def _copy_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path | None, name: str
) -> FileEntry:
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupError(f"{name} holds an unexpected member {member.name!r}")
    digest = hashlib.sha256()
    size = 0
    out: BinaryIO | None = None
    if target is not None:
        _make_dirs(target.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.fdopen(os.open(target, flags, 0o600), "wb")
    try:
        while chunk := handle.read(_COPY):
            digest.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return FileEntry(size, digest.hexdigest())


def _make_dirs(directory: Path) -> None:
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def _check_name(member: str) -> None:
    """Only relative paths under a known prefix, without ``..`` or empty parts."""
    parts = PurePosixPath(member).parts
    if (
        not member.startswith(PREFIXES)
        or member.startswith("/")
        or "\\" in member
        or any(p in ("", ".", "..") for p in member.split("/"))
        or len(parts) < 2
    ):
        raise BackupError(f"refusing an archive member with an unsafe name: {member!r}")


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> dict[str, Any]:
    handle = tar.extractfile(member)
    if handle is None or member.size > _MAX_JSON:
        raise BackupError(f"{name} has a damaged {member.name}")
    try:
        value = json.loads(handle.read())
    except ValueError:
        raise BackupError(f"{name} has a damaged {member.name}") from None
    if not isinstance(value, dict):
        raise BackupError(f"{name} has a damaged {member.name}")
    return value


def _drain(stream: gzip.GzipFile) -> None:
    while stream.read(_COPY):
        pass


def _tar_reader(source: Any) -> tarfile.TarFile:
    return tarfile.open(fileobj=gzip.GzipFile(fileobj=source, mode="rb"), mode="r|")


@contextmanager
def private_dir(near: Path | None) -> Iterator[Path]:
    """A new temporary directory (mode 0700) in ``near`` (the system's when None), removed
    with everything in it afterwards. Its name starts with ``TMP_PREFIX``."""
    if near is not None:
        make_directory(near)
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=near))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def new_file(path: Path) -> Iterator[BinaryIO]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, 0o600), "wb") as handle:
        yield handle


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_files(root: Path, skip_top: Collection[str]) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``root``, never following
    a symlink; nothing when ``root`` is missing."""
    if not root.is_dir() or root.is_symlink():
        return
    for current, dirs, files in os.walk(root, followlinks=False):
        base = Path(current)
        if base == root:
            dirs[:] = [d for d in dirs if d not in skip_top]
        dirs.sort()
        for name in sorted(files):
            path = base / name
            yield path.relative_to(root).as_posix(), path


class _HashingReader:
    """Reads exactly ``size`` bytes of ``handle`` for tarfile, hashing them as they pass."""

    def __init__(self, handle: BinaryIO, size: int, arcname: str) -> None:
        self._handle = handle
        self._left = size
        self._arcname = arcname
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._handle.read(want)
        if len(data) < want:
            # Shrunk while being copied: the tar stream can no longer be completed.
            raise BackupError(f"{self._arcname} changed while it was being backed up")
        self._left -= len(data)
        self._digest.update(data)
        return data

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
