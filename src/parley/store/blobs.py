"""The content-addressed blob directory: attachment bytes, named by their SHA-256.

Layout under ``settings.blob_dir`` (directories mode 0700, files 0600)::

    blobs/ab/ab12...ef     one file per distinct content, named by its hash
    blobs/tmp/<random>     uploads being written, and blobs being swept

Invariants:
- nothing a user sends ever becomes part of a path: blobs are named by the hash of their
  bytes, temporary files by ``secrets``; a hash is checked to be 64 lower-case hex
  characters before it is used;
- no path component is ever followed if it is a symlink: every open and link goes
  through directory file descriptors with ``O_NOFOLLOW``, a read also checks that it
  opened a regular file whose resolved path lies inside the blob directory, so a symlink
  planted there is refused on read and replaced (never followed) on write;
- a blob appears complete or not at all: bytes go to a temporary file created with
  ``O_EXCL``, hashed while written, fsynced, then hard-linked into place (the directory
  fsynced too). An upload keeps its temporary file until its attachment row is committed
  and then makes sure the blob is still there (``PendingBlob.settle``), and a sweep moves a
  blob aside *before* it asks whether any row still references it (``sweep``): so an
  upload and a sweep of the same content, in any processes, never leave a row without
  its blob;
- a failed or refused upload leaves no temporary file behind.

Only the file system is touched here; whether a blob is referenced is the caller's
question (``store.attachments``), passed to ``sweep`` as a function.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from parley.errors import NotFound, StoreError

log = logging.getLogger(__name__)

_HASH = re.compile(r"[0-9a-f]{64}")
_TMP = "tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted where a blob should be must not hang the reader.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A temporary file this old belongs to no upload still running (an upload is bounded by
# the size limit and the client's speed, far below a day).
STALE_SECONDS = 24 * 3600


def is_blob_hash(value: str) -> bool:
    return _HASH.fullmatch(value) is not None


class BlobStore:
    """The blob directory at ``root``; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        """Create the blob directory and its temporary area (mode 0700) if missing."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _dir_fd(self.root) as root_fd:
            _mkdir_at(root_fd, _TMP)

    def begin(self) -> PendingBlob:
        """A new temporary file to stream an upload into."""
        self.ensure()
        return PendingBlob(self)

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes, opened for reading; ``NotFound`` when it is missing or is
        anything but a regular file inside the blob directory."""
        if not is_blob_hash(sha256):
            raise NotFound("attachment content not found")
        try:
            with _dir_fd(self.root) as root_fd, _sub_fd(root_fd, sha256[:2]) as shard_fd:
                fd = os.open(sha256, _READ_FLAGS, dir_fd=shard_fd)
        except FileNotFoundError:
            raise NotFound("attachment content not found") from None
        except OSError as exc:
            if _refused(exc):
                log.warning("refused a symlink in the blob directory for blob %s", sha256)
                raise NotFound("attachment content not found") from None
            raise
        try:
            mode = os.fstat(fd).st_mode
            resolved = Path(os.path.realpath(self.root / sha256[:2] / sha256))
            inside = resolved.is_relative_to(os.path.realpath(self.root))
            if not stat.S_ISREG(mode) or not inside:
                log.warning("refused a non-regular file in the blob directory: %s", sha256)
                raise NotFound("attachment content not found")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read(self, sha256: str) -> bytes:
        with self.open(sha256) as handle:
            return handle.read()

    def exists(self, sha256: str) -> bool:
        """Whether the blob is present as a regular file (a symlink does not count)."""
        if not is_blob_hash(sha256):
            return False
        try:
            with _dir_fd(self.root) as root_fd, _sub_fd(root_fd, sha256[:2]) as shard_fd:
                mode = os.stat(sha256, dir_fd=shard_fd, follow_symlinks=False).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode)

    def sweep(self, sha256: str, referenced: Callable[[str], bool]) -> bool:
        """Delete the blob unless ``referenced(sha256)``; True when it was deleted.

        The blob is moved into the temporary area first and only then is ``referenced``
        asked, so an upload that committed a row for the same content in the meantime is
        seen and the blob goes back (see the module docstring).
        """
        if not is_blob_hash(sha256):
            raise ValueError("not a blob hash")
        tomb = f"{secrets.token_hex(16)}.gone"
        try:
            with (
                _dir_fd(self.root) as root_fd,
                _sub_fd(root_fd, sha256[:2]) as shard_fd,
                _sub_fd(root_fd, _TMP) as tmp_fd,
            ):
                try:
                    os.replace(sha256, tomb, src_dir_fd=shard_fd, dst_dir_fd=tmp_fd)
                except FileNotFoundError:
                    return False
                try:
                    if not referenced(sha256):
                        return True
                    with contextlib.suppress(FileExistsError):  # an upload put it back
                        os.link(
                            tomb,
                            sha256,
                            src_dir_fd=tmp_fd,
                            dst_dir_fd=shard_fd,
                            follow_symlinks=False,
                        )
                    return False
                finally:
                    os.unlink(tomb, dir_fd=tmp_fd)
        except FileNotFoundError:
            return False  # no shard, no temporary area: nothing was ever stored there
        except OSError as exc:
            if not _refused(exc):
                raise
            log.warning("refused a symlink in the blob directory while sweeping %s", sha256)
            return False

    def temporary_files(self) -> list[str]:
        """Names in the temporary area (uploads in progress, or left by a crash)."""
        try:
            with _dir_fd(self.root) as root_fd, _sub_fd(root_fd, _TMP) as tmp_fd:
                return sorted(os.listdir(tmp_fd))
        except FileNotFoundError:
            return []

    def clean_temporary(self, older_than: float = STALE_SECONDS) -> int:
        """Remove temporary files older than ``older_than`` seconds (left by a crash)."""
        removed = 0
        cutoff = time.time() - older_than
        try:
            with _dir_fd(self.root) as root_fd, _sub_fd(root_fd, _TMP) as tmp_fd:
                for name in os.listdir(tmp_fd):
                    info = os.stat(name, dir_fd=tmp_fd, follow_symlinks=False)
                    if info.st_mtime < cutoff:
                        os.unlink(name, dir_fd=tmp_fd)
                        removed += 1
        except FileNotFoundError:
            return removed
        return removed


class PendingBlob:
    """One upload being written: ``write`` chunks, ``finish``, commit the row, ``settle``.

    Used as a context manager it discards its temporary file on any exit that did not
    settle, so a refused or failed upload leaves nothing behind.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256: str | None = None
        self._name = f"{secrets.token_hex(16)}.part"
        with _dir_fd(store.root) as root_fd:
            self._tmp_fd: int | None = os.open(_TMP, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root_fd)
        try:
            self._fd: int | None = os.open(self._name, _WRITE_FLAGS, 0o600, dir_fd=self._tmp_fd)
        except BaseException:
            os.close(self._tmp_fd)
            raise

    def write(self, chunk: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("write after finish")
        self._hash.update(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def finish(self) -> str:
        """Make the bytes durable and put the blob in place; its SHA-256."""
        if self._fd is None or self._tmp_fd is None:
            raise RuntimeError("finish twice")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self.sha256 = self._hash.hexdigest()
        self._publish()
        return self.sha256

    def settle(self) -> None:
        """After the row naming the blob is committed: make sure the blob is in place
        (a concurrent sweep may have removed it), then drop the temporary file."""
        if self.sha256 is None:
            raise RuntimeError("settle before finish")
        if not self._store.exists(self.sha256):
            self._publish()
        self.discard()

    def discard(self) -> None:
        """Remove the temporary file (the blob, if published, stays). Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name, dir_fd=self._tmp_fd)
            os.close(self._tmp_fd)
            self._tmp_fd = None

    def __enter__(self) -> PendingBlob:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def _publish(self) -> None:
        """Hard-link the temporary file into place; an existing regular file of the same
        size is the same content (dedup); anything else there is replaced, not followed."""
        try:
            self._link_into_place()
        except OSError as exc:
            if _refused(exc):
                raise StoreError(
                    "the blob directory holds a symlink or a file where a directory "
                    "belongs: refusing to write through it"
                ) from None
            raise

    def _link_into_place(self) -> None:
        assert self.sha256 is not None and self._tmp_fd is not None
        sha, tmp_fd = self.sha256, self._tmp_fd
        with _dir_fd(self._store.root) as root_fd:
            created = _mkdir_at(root_fd, sha[:2])
            with _sub_fd(root_fd, sha[:2]) as shard_fd:
                try:
                    os.link(
                        self._name,
                        sha,
                        src_dir_fd=tmp_fd,
                        dst_dir_fd=shard_fd,
                        follow_symlinks=False,
                    )
                except FileExistsError:
                    info = os.stat(sha, dir_fd=shard_fd, follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and info.st_size == self.size:
                        return
                    log.warning("replaced a non-blob entry in the blob directory: %s", sha)
                    spare = f"{secrets.token_hex(16)}.link"
                    os.link(self._name, spare, src_dir_fd=tmp_fd, dst_dir_fd=tmp_fd)
                    os.replace(spare, sha, src_dir_fd=tmp_fd, dst_dir_fd=shard_fd)
                os.fsync(shard_fd)
            if created:
                os.fsync(root_fd)


def _mkdir_at(parent_fd: int, name: str) -> bool:
    """Create directory ``name`` (0700) under ``parent_fd``; True if it was created."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    """An fd on the blob directory itself (which may be a symlink an operator made)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sub_fd(parent_fd: int, name: str) -> Iterator[int]:
    """An fd on directory ``name`` under ``parent_fd``; a symlink there fails with
    ``ELOOP`` (or ``ENOTDIR``), never followed."""
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _refused(exc: OSError) -> bool:
    """Whether ``exc`` is an ``O_NOFOLLOW`` / ``O_DIRECTORY`` refusal (a planted symlink
    or a file where a directory belongs)."""
    return exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)
