"""Restore a backup archive over the configured database, blob and vector directories.

The order, each step refusing before anything is changed:

0. refuse a database that is not parley's (another application's: ``ops.migrate.
   refuse_not_parleys``), read only; a damaged SQLite file is not refused (a restore is
   how it is replaced);
1. hold the database exclusively (``ops.presence.exclusive``) for the whole restore: a
   running server (or another restore or offline maintenance) makes it refuse at once;
2. unpack the archive into staging directories beside their targets (same file system,
   so the swap is a rename), checking every checksum (``ops.archive``); the database is
   checked too: SQLite's integrity check, every table's count and digest against the
   manifest, a PostgreSQL dump readable by ``pg_restore``; its schema revision must be one
   this parley knows (an older one is migrated after the restore, a newer one refused);
3. take a safety backup of the current state (``create_backup``), when there is one;
4. swap: SQLite's stale ``-wal``, ``-shm`` and ``-journal`` files are removed (replayed
   onto the restored file they would corrupt it), the staged file renamed over the
   database, and a crash marker left for the old file's log cleared; PostgreSQL's
   ``public`` schema is emptied and refilled from the dump in one transaction, then its
   tables' digests compared with the manifest. The blob and vector directories are
   replaced by the archive's (an archive without one leaves none);
5. migrate an older schema to head (``ops.migrate.upgrade``), and report the counts.

Without a safety backup (``safety_backup=False``: the current database is too damaged to
back up), the SQLite files and the blob and vector directories it replaces are kept
aside, renamed ``<name>.pre-restore-<time>``, and reported (a PostgreSQL database cannot
be set aside: the caller chose to lose it). Otherwise nothing the restore replaces is
deleted before a verified backup of it exists.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from parley import paths
from parley.errors import BackupError
from parley.ops import migrate, pgtools
from parley.ops.archive import fsync_directory, private_dir, unpack
from parley.ops.backup import (
    PG_MEMBER,
    SQLITE_MEMBER,
    check_database,
    create_backup,
    vector_dir,
)
from parley.ops.presence import exclusive, marker_path
from parley.settings import Settings
from parley.store import snapshot
from parley.store.engine import create_engine, driver_message, sqlite_path

log = logging.getLogger(__name__)

_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(slots=True)
class RestoreReport:
    """What a restore did. ``tables`` maps each table to its row count as restored."""

    archive: Path
    database: str
    schema_revision: str | None
    tables: dict[str, int]
    safety_backup: Path | None = None
    migrated_to: str | None = None
    kept_aside: list[Path] = field(default_factory=list)
    blobs: int = 0
    vectors: int = 0


def restore_backup(
    settings: Settings, archive: Path, *, safety_backup: bool = True
) -> RestoreReport:
    """Restore ``archive``; see the module docstring. Raises ``BackupError`` (nothing was
    swapped, unless the message says otherwise) or ``ConfigError`` (a server is running).
    """
    archive = Path(archive).resolve()
    why = paths.unreadable(archive)
    if why is not None:
        raise BackupError(f"cannot read the backup archive {archive}: {why}")
    # Before the lock file is made beside it: another application's database is not
    # parley's to replace (DATABASE_URL pointed at the wrong one).
    migrate.refuse_not_parleys(settings)
    try:
        return _exclusively(settings, archive, safety_backup)
    except DBAPIError as exc:  # the driver's message names host and user, never a password
        raise BackupError(f"database error during the restore: {driver_message(exc)}") from exc


def _exclusively(settings: Settings, archive: Path, safety_backup: bool) -> RestoreReport:
    with exclusive(settings):
        database = sqlite_path(settings)
        if settings.is_sqlite and database is None:
            raise BackupError("an in-memory database cannot be restored into")
        near = database.parent if database is not None else settings.data_dir
        try:
            with private_dir(near) as db_stage, private_dir(settings.data_dir) as data_stage:
                report = _restore(settings, archive, database, db_stage, data_stage, safety_backup)
        except OSError as exc:  # staging or unpacking, before anything was replaced
            raise BackupError(f"nothing was restored: {exc.strerror or exc}") from exc
        if report.schema_revision is not None and report.schema_revision not in migrate.heads():
            # The restored file is a new database: a crash marker left for the old one's
            # write-ahead log no longer applies (that log was removed with it).
            migrate.upgrade(settings, previous_run_unclean=False)
            report.migrated_to = migrate.current(settings)
    log.info("restored %s (%s, %d tables)", archive, report.database, len(report.tables))
    return report


def _restore(
    settings: Settings,
    archive: Path,
    database: Path | None,
    db_stage: Path,
    data_stage: Path,
    safety_backup: bool,
) -> RestoreReport:
    manifest = _unpack(settings, archive, db_stage, data_stage)
    tables = check_database(manifest, db_stage, archive.name)
    revision = _check_revision(manifest, archive.name, tables)
    report = RestoreReport(
        archive,
        manifest["database"]["kind"],
        revision,
        {table: int(value["rows"]) for table, value in tables.items()},
        blobs=_count(data_stage / "blobs"),
        vectors=_count(data_stage / "vectors"),
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    if safety_backup:
        report.safety_backup = _safety_backup(settings, archive)
    try:
        if database is not None:
            _swap_sqlite(database, db_stage / SQLITE_MEMBER, report, stamp)
        else:
            _restore_postgres(settings, db_stage / PG_MEMBER, tables, report)
        for name, target in (("blobs", settings.blob_dir), ("vectors", vector_dir(settings))):
            if target is None:
                log.warning(
                    "the vector store (%s) is not on this machine: it is left as it is; "
                    "run 'parley reindex --full' to rebuild it from the restored history",
                    settings.vector_uri,
                )
                continue
            _swap_directory(data_stage / name, target, report, stamp)
    except OSError as exc:
        before = report.safety_backup or ", ".join(map(str, report.kept_aside)) or "nowhere"
        raise BackupError(
            f"the restore of {archive.name} failed part-way ({exc.strerror or exc}); the "
            f"state before it is in {before}"
        ) from exc
    return report


def _unpack(settings: Settings, archive: Path, db_stage: Path, data_stage: Path) -> dict[str, Any]:
    def place(name: str) -> Path:
        return (db_stage if name.startswith("database/") else data_stage) / name

    manifest = unpack(archive, settings.backup.encryption_key, place)
    kind = (manifest.get("database") or {}).get("kind")
    ours = "sqlite" if settings.is_sqlite else "postgresql"
    if kind != ours:
        raise BackupError(
            f"{archive.name} holds a {kind} database and parley is configured for {ours}: "
            "move data between the two with `parley export` and `parley import`"
        )
    return manifest


def _check_revision(manifest: dict[str, Any], name: str, tables: dict[str, Any]) -> str | None:
    revision = manifest.get("schema_revision")
    if revision is None:
        held = sorted(set(tables) - {"alembic_version"})
        if held:
            # A backup of another application's database (made before `parley backup`
            # refused one): restoring it would put that database in parley's place.
            raise BackupError(
                f"{name} holds tables ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}) "
                "but no parley schema revision: it is not a backup of a parley database; "
                "refusing to restore it"
            )
        return None
    known = {rev for rev, _down, _doc in migrate.history()}
    unknown = [rev for rev in str(revision).split(",") if rev not in known]
    if unknown:
        raise BackupError(
            f"{name} is at schema revision {revision}, which this version of parley does "
            "not know (a newer parley made it): restore it with that version"
        )
    return str(revision)


def _safety_backup(settings: Settings, archive: Path) -> Path | None:
    """A backup of the current state, or None when there is nothing to back up."""
    database = sqlite_path(settings)
    if database is not None:
        present = database.exists()
    else:
        engine = create_engine(settings)
        try:
            with engine.connect() as conn:
                present = snapshot.has_tables(conn)
        finally:
            engine.dispose()
    if not present:
        return None
    try:
        info = create_backup(settings, reason=f"before restoring {archive.name}")
    except BackupError as exc:
        raise BackupError(
            f"nothing was restored: the safety backup of the current state failed "
            f"({exc.message}). Fix that, or restore without a safety backup "
            "(--no-safety-backup): what is replaced is then kept aside"
        ) from exc
    log.info("safety backup of the current state: %s", info.path)
    return info.path


def _swap_sqlite(database: Path, staged: Path, report: RestoreReport, stamp: str) -> None:
    if report.safety_backup is None and database.exists():
        aside = database.with_name(f"{database.name}.pre-restore-{stamp}")
        os.link(database, aside)
        report.kept_aside.append(aside)
    for suffix in _SIDE_FILES:
        side = database.with_name(database.name + suffix)
        if side.exists():
            if report.safety_backup is None:
                aside = side.with_name(f"{side.name}.pre-restore-{stamp}")
                os.replace(side, aside)
                report.kept_aside.append(aside)
            else:
                side.unlink()
            log.info("removed the stale %s", side)
    os.replace(staged, database)
    fsync_directory(database.parent)
    # The crash marker spoke of the old file's write-ahead log, which is gone with it.
    marker_path(database).unlink(missing_ok=True)


def _restore_postgres(
    settings: Settings, dump_file: Path, tables: dict[str, Any], report: RestoreReport
) -> None:
    pgtools.restore(settings.database_url, dump_file)
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            found = snapshot.table_summaries(conn)
    finally:
        engine.dispose()
    if found != tables:
        differ = sorted(t for t in set(found) | set(tables) if found.get(t) != tables.get(t))
        raise BackupError(
            f"{report.archive.name} was restored but the database does not match its "
            f"manifest (tables {', '.join(differ)}); the state before the restore is in "
            f"{report.safety_backup or 'no safety backup'}"
        )


def _swap_directory(staged: Path, target: Path, report: RestoreReport, stamp: str) -> None:
    """Put ``staged`` (possibly missing: the archive had none) where ``target`` is."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f"{target.name}.pre-restore-{stamp}")
        os.replace(target, old)
    if staged.exists():
        staged.chmod(0o700)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # A vector store on another file system than the data directory.
            shutil.copytree(staged, target, symlinks=True)
            shutil.rmtree(staged)
    fsync_directory(target.parent)
    if old is not None:
        if report.safety_backup is None and _count(old):
            report.kept_aside.append(old)
        elif old.is_symlink() or not old.is_dir():
            old.unlink()
        else:
            shutil.rmtree(old)


def _count(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory)) if directory.is_dir() else 0
