"""Online backups: one verified, timestamped archive per backup, and list/verify/prune.

``create_backup`` snapshots the database while the server keeps serving (SQLite: the
online backup API into a temporary file in the destination directory, fsynced, then
``PRAGMA integrity_check``; PostgreSQL: ``pg_dump -Fc`` of an exported snapshot), adds
the blob directory and the vector store directory when they exist, and streams it all
into an archive (``ops.archive``) written under a temporary name, fsynced, and linked
into place under its final name (never over another file), the directory fsynced after.

Invariants:
- an archive under its final name is complete: its checksums were computed as it was
  written and its database passed the integrity check first;
- the manifest's per-table row counts and digests describe exactly the database in the
  archive (SQLite: read from the snapshot file; PostgreSQL: read in the dump's snapshot);
- directories this module creates have mode 0700, every file it writes mode 0600;
- the primary directory (``settings.backup.dir``) is used unless it cannot be written, in
  which case the fallback directory is (logged); an explicit ``to`` has no fallback;
- the encryption key (``PARLEY_BACKUP_KEY``) and database passwords never appear in an
  archive's unencrypted bytes, a manifest, a log line or an error;
- ``prune_backups`` deletes only files named like parley archives (and its own temporary
  directories a day old, left by a crash); nothing else in the directory is touched.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

import parley
from parley import paths
from parley.errors import BackupError
from parley.ops import archive, pgtools
from parley.search import vector_lock
from parley.settings import Settings
from parley.store import snapshot
from parley.store.engine import create_engine, driver_message, sqlite_path

log = logging.getLogger(__name__)

SQLITE_MEMBER = "database/parley.db"
PG_MEMBER = "database/parley.pgdump"
# Errors that mean "this directory cannot take the archive": try the fallback.
_TARGET_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
}
_STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """One archive. ``manifest`` is the full manifest from ``create_backup`` and
    ``verify_backup``, the summary (see ``ops.archive``) from ``list_backups``."""

    path: Path
    manifest: dict[str, Any]
    created_at: datetime
    size: int
    encrypted: bool


class _TargetFailed(Exception):
    """The destination directory could not take the archive (fallback applies)."""


def create_backup(
    settings: Settings, to: Path | None = None, *, reason: str | None = None
) -> BackupInfo:
    """Take a backup into ``to``, else the configured directory (or its fallback).

    ``reason`` (e.g. "before restoring ...") is kept in the summary. Raises
    ``BackupError`` when the database cannot be read or no directory can take it.
    """
    if to is not None:
        try:
            return _backup_into(settings, to, reason)
        except _TargetFailed as exc:
            raise BackupError(f"cannot write the backup into {to}: {exc}") from None
    failures: list[tuple[Path, str]] = []
    for directory in (settings.backup.dir, settings.backup.fallback_dir):
        try:
            info = _backup_into(settings, directory, reason)
        except _TargetFailed as exc:
            failures.append((directory, str(exc)))
            continue
        # Said once it is known where the backup went: when the fallback fails too, the
        # error names both directories and nothing else is printed.
        for failed, why in failures:
            log.warning(
                "backup directory %s is not writable (%s); the backup went to %s",
                *(failed, why, directory),
            )
        return info
    raise BackupError(
        "no backup directory could be written: "
        + "; ".join(f"{failed}: {why}" for failed, why in failures)
    )


def verify_backup(path: Path, settings: Settings) -> dict[str, Any]:
    """Read the whole archive and check it; return its manifest, else ``BackupError``.

    Checks: every checksum, the summary against the manifest, and the database itself
    (SQLite: ``PRAGMA integrity_check`` and every table's count and digest against the
    manifest; PostgreSQL: the dump is readable by ``pg_restore``).
    """
    path = Path(path)
    why = paths.unreadable(path)
    if why is not None:
        raise BackupError(f"cannot read {path}: {why}")
    # The database copy can be large: beside the archive, unless that is read-only.
    near = path.parent if os.access(path.parent, os.W_OK) else None
    with archive.private_dir(near) as scratch:
        manifest = archive.unpack(
            path,
            settings.backup.encryption_key,
            lambda name: scratch / name if name.startswith("database/") else None,
        )
        check_database(manifest, scratch, path.name)
    return manifest


def check_database(manifest: dict[str, Any], unpacked: Path, name: str) -> dict[str, Any]:
    """Check the unpacked database member against ``manifest``; return its tables."""
    database = manifest.get("database")
    if not isinstance(database, dict) or database.get("kind") not in ("sqlite", "postgresql"):
        raise BackupError(f"{name} has a damaged manifest (no database entry)")
    member = database.get("member")
    if member not in (SQLITE_MEMBER, PG_MEMBER) or not (unpacked / member).is_file():
        raise BackupError(f"{name} holds no database file")
    tables = database.get("tables")
    if not isinstance(tables, dict):
        raise BackupError(f"{name} has a damaged manifest (no tables)")
    if database["kind"] == "postgresql":
        pgtools.check_dump(unpacked / member)
        return tables
    found = inspect_sqlite(unpacked / member, name)
    if found["tables"] != tables or found["schema_revision"] != manifest.get("schema_revision"):
        raise BackupError(f"{name}: the database does not match its manifest's counts/digests")
    return tables


def inspect_sqlite(path: Path, name: str) -> dict[str, Any]:
    """Integrity check, revision and table summaries of one SQLite file."""
    engine = snapshot.sqlite_file_engine(path)
    try:
        with engine.connect() as conn:
            problems = snapshot.integrity_problems(conn)
            if problems:
                raise BackupError(f"{name}: the database fails its integrity check: {problems[0]}")
            return {
                "schema_revision": snapshot.schema_revision(conn),
                "tables": snapshot.table_summaries(conn),
            }
    except BackupError:
        raise
    except Exception as exc:  # sqlite3.DatabaseError: "file is not a database" and kin
        raise BackupError(f"{name}: the database cannot be read: {exc}") from exc
    finally:
        engine.dispose()


def list_backups(settings: Settings, directory: Path | None = None) -> list[BackupInfo]:
    """parley's archives in ``directory`` (default: the backup and fallback directories),
    newest first. An unreadable archive is listed with ``{"error": ...}`` as manifest.
    A configured directory not made yet holds none; a ``directory`` given must exist."""
    found: list[BackupInfo] = []
    for folder in _directories(settings, directory):
        try:
            # Only a given directory is listed when missing, for the system's reason.
            entries = sorted(folder.iterdir()) if directory or folder.is_dir() else []
        except OSError as exc:
            raise BackupError(f"cannot list {folder}: {paths.reason(exc, folder)}") from exc
        for path in entries:
            created = archive.created_from_name(path.name)
            if created is None or not path.is_file() or path.is_symlink():
                continue
            try:
                size = path.stat().st_size
                head = archive.read_summary(path)
            except BackupError as exc:
                head = {"error": exc.message}
            except FileNotFoundError:  # pruned meanwhile
                continue
            found.append(BackupInfo(path, head, created, size, path.name.endswith(".enc")))
    found.sort(key=lambda info: (info.created_at, info.path.name), reverse=True)
    return found


def prune_backups(
    settings: Settings, keep: int | None = None, directory: Path | None = None
) -> list[Path]:
    """Delete all but the newest ``keep`` archives (default ``settings.backup.keep``);
    return the deleted paths. Only parley archive names are ever deleted."""
    keep = settings.backup.keep if keep is None else keep
    if keep < 1:
        raise BackupError(f"keep must be at least 1, got {keep}")
    deleted: list[Path] = []
    for info in list_backups(settings, directory)[keep:]:
        try:
            info.path.unlink(missing_ok=True)
        except OSError as exc:
            raise BackupError(f"cannot delete {info.path}: {exc.strerror or exc}") from exc
        deleted.append(info.path)
        log.info("pruned backup %s", info.path)
    for folder in _directories(settings, directory):
        _remove_stale_temporaries(folder)
    return deleted


def _directories(settings: Settings, directory: Path | None) -> list[Path]:
    if directory is not None:
        return [Path(directory)]
    primary, fallback = settings.backup.dir, settings.backup.fallback_dir
    return [primary] if fallback == primary else [primary, fallback]


def _backup_into(settings: Settings, directory: Path, reason: str | None) -> BackupInfo:
    with ExitStack() as stack:
        try:
            shared = _ensure_directory(directory)
            staging = stack.enter_context(archive.private_dir(directory))
        except OSError as exc:
            raise _TargetFailed(paths.reason(exc)) from exc
        try:
            info = _write(settings, directory, staging, reason)
        except OSError as exc:
            if exc.errno in _TARGET_ERRNOS and _within(exc, directory):
                raise _TargetFailed(paths.reason(exc)) from exc
            # Another path failed (the database's directory, the blobs...): name it.
            where = f"cannot use {exc.filename}: " if exc.filename else ""
            raise BackupError(f"backup failed: {where}{paths.reason(exc)}") from exc
    if shared is not None:
        log.warning("backup directory %s is readable by other users (mode %o)", directory, shared)
    log.info("backup written to %s (%d bytes)", info.path, info.size)
    return info


def _within(exc: OSError, directory: Path) -> bool:
    """Whether ``exc`` is about ``directory`` or a path in it (or names no path)."""
    if exc.filename is None:
        return True
    path = Path(os.fsdecode(exc.filename))
    return path == directory or directory in path.parents


def _write(settings: Settings, directory: Path, staging: Path, reason: str | None) -> BackupInfo:
    created = datetime.now(UTC)
    created = created.replace(microsecond=created.microsecond // 1000 * 1000)
    secret = settings.backup.encryption_key
    head: dict[str, Any] = {
        "format": archive.FORMAT,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "parley_version": parley.__version__,
        "encrypted": secret is not None,
    }
    if reason:
        head["reason"] = reason
    partial = staging / "archive.partial"
    with archive.new_file(partial) as raw, _snapshot_dir(settings, staging) as snapshots:
        # No vector is written from before the database snapshot until the vectors are
        # copied: they are one version of the store, and every change after it is still
        # in the snapshot's search outbox, which the indexer drains after a restore.
        with vector_lock.frozen(settings.vector_uri) as vector_root:
            database, dumped = _snapshot_database(settings, snapshots)
            head["database_kind"] = database["kind"]
            head["schema_revision"] = database.pop("schema_revision")
            writer = archive.ArchiveWriter(raw, head, secret)
            writer.add(database["member"], dumped)
            dumped.unlink()  # the archive holds it now; free the space before the rest
            skipped = _add_tree(writer, "vectors", vector_root)
        if vector_root is None:
            log.warning(
                "the vector store (%s) is not on this machine: it is not in the backup; "
                "after a restore, 'parley reindex' rebuilds it",
                settings.vector_uri,
            )
        skipped += _add_tree(writer, "blobs", settings.blob_dir, skip_top={"tmp"})
        if skipped:
            log.warning("%d file(s) vanished or were not regular files during the backup", skipped)
        manifest = writer.finish({"database": database})
        raw.flush()
        os.fsync(raw.fileno())
    final = _publish(partial, directory, created, encrypted=secret is not None)
    return BackupInfo(final, manifest, created, final.stat().st_size, secret is not None)


@contextmanager
def _snapshot_dir(settings: Settings, staging: Path) -> Iterator[Path]:
    """Where the database snapshot is made before it goes into the archive: the staging
    directory, except for an encrypted backup, whose plain snapshot must never reach the
    backup directory (which may be remote or shared): it is made beside the database."""
    if settings.backup.encryption_key is None:
        yield staging
        return
    database = sqlite_path(settings)
    with archive.private_dir(database.parent if database else settings.data_dir) as path:
        yield path


def _add_tree(
    writer: archive.ArchiveWriter,
    prefix: str,
    root: Path | None,
    skip_top: Collection[str] = (),
) -> int:
    """Add every file under ``root`` as ``prefix/...``; how many vanished meanwhile."""
    skipped = 0
    if root is not None:
        for relative, file in archive.walk_files(root, skip_top):
            if writer.add(f"{prefix}/{relative}", file) is None:
                skipped += 1
    return skipped


def vector_dir(settings: Settings) -> Path | None:
    """The vector store's directory when it is on this machine (the default, under the
    data directory, or a ``PARLEY_VECTOR_URI`` path), else None."""
    return vector_lock.local_path(settings.vector_uri)


def _snapshot_database(settings: Settings, staging: Path) -> tuple[dict[str, Any], Path]:
    """The database entry of the manifest, and the snapshot file in ``staging``."""
    if settings.is_sqlite:
        source = sqlite_path(settings)
        if source is None:
            raise BackupError("an in-memory database cannot be backed up")
        target = staging / "parley.db"
        try:
            snapshot.copy_sqlite(source, target)
        except FileNotFoundError:
            raise BackupError(f"there is no database at {source} to back up") from None
        except Exception as exc:  # sqlite3.Error: the source or the target failed
            _raise_sqlite_copy_error(exc, source, target)
        target.chmod(0o600)
        archive.fsync_file(target)
        found = inspect_sqlite(target, str(source))
        entry = {"kind": "sqlite", "member": SQLITE_MEMBER, **found}
        return entry, target
    target = staging / "parley.pgdump"
    engine = create_engine(settings)
    try:
        with snapshot.exported_snapshot(engine) as (conn, snapshot_id):
            entry = {
                "kind": "postgresql",
                "member": PG_MEMBER,
                "server_version": snapshot.server_version(conn),
                "schema_revision": snapshot.schema_revision(conn),
                "tables": snapshot.table_summaries(conn),
            }
            pgtools.dump(settings.database_url, snapshot_id, target)
    except BackupError:
        raise
    except DBAPIError as exc:  # the driver's message names host and user, never a password
        raise BackupError(f"cannot read the database: {driver_message(exc)}") from exc
    finally:
        engine.dispose()
    archive.fsync_file(target)
    return entry, target


def _raise_sqlite_copy_error(exc: Exception, source: Path, target: Path) -> None:
    text = str(exc)
    if "full" in text:
        # The target file is the one being written: its directory cannot take it.
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(target)) from exc
    if "disk I/O" in text or "unable to open" in text:
        raise OSError(errno.EACCES, text, os.fspath(target)) from exc
    raise BackupError(f"cannot copy the database {source}: {text}") from exc


def _ensure_directory(directory: Path) -> int | None:
    """Make ``directory`` (mode 0700) if it is missing; the mode of an existing one that
    others may read, to be said once the backup is in it (None: private)."""
    if not directory.is_dir():
        paths.make_directory(directory)
        directory.chmod(0o700)  # mkdir's mode is masked by the umask
        return None
    mode = directory.stat().st_mode & 0o777
    return mode if mode & 0o077 else None


def _publish(partial: Path, directory: Path, created: datetime, *, encrypted: bool) -> Path:
    """Link the finished archive into place under its name, never over another file."""
    moment = created
    for _ in range(1000):
        final = directory / archive.archive_name(moment, encrypted=encrypted)
        try:
            os.link(partial, final)
        except FileExistsError:
            # Two backups in one millisecond: the later one takes the next free name.
            moment = moment + timedelta(milliseconds=1)
            continue
        partial.unlink()
        archive.fsync_directory(directory)
        return final
    raise BackupError(f"no free archive name in {directory}")


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove this module's temporary directories left by a crash a day ago or more."""
    if not folder.is_dir():
        return
    cutoff = time.time() - _STALE_TMP_SECONDS
    for path in folder.iterdir():
        ours = path.name.startswith(archive.TMP_PREFIX) and path.is_dir() and not path.is_symlink()
        if ours and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by an interrupted backup", path)
