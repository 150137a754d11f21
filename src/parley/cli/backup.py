"""``parley backup`` (with ``list``, ``verify``, ``prune``) and ``parley restore``.

A thin client of ``parley.ops.backup`` and ``parley.ops.restore``. Settings are read the
way the server reads them (``DATABASE_URL``, ``PARLEY_BACKUP_*``, the config file), so
each command acts on the database and backup directory the server would use. A
``BackupError`` or ``ConfigError`` is one line on stderr and exit status 1, never a
traceback; nothing printed ever includes the backup key or a database password.

``parley restore`` replaces the current data, so it asks first on a terminal; anywhere
else (scripts, cron, CI) it refuses unless ``--yes`` says so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from parley.cli.common import run as _run
from parley.ops import migrate
from parley.ops.backup import BackupInfo, create_backup, list_backups, prune_backups
from parley.ops.backup import verify_backup as verify_archive
from parley.ops.restore import restore_backup
from parley.settings import Settings, load_settings


def _settings() -> Settings:
    return _run(load_settings)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _tables(manifest: dict[str, Any]) -> dict[str, int]:
    tables = (manifest.get("database") or {}).get("tables") or {}
    return {name: int(value["rows"]) for name, value in tables.items()}


def _echo_counts(tables: dict[str, int], files: dict[str, int]) -> None:
    width = max((len(n) for n in [*tables, *files]), default=0)
    for name, rows in tables.items():
        click.echo(f"  {name:<{width}}  {rows} rows")
    for name, count in files.items():
        if count:
            click.echo(f"  {name:<{width}}  {count} files")


def _file_counts(manifest: dict[str, Any]) -> dict[str, int]:
    files = manifest.get("files") or {}
    return {
        prefix: sum(1 for n in files if n.startswith(prefix + "/"))
        for prefix in ("blobs", "vectors")
    }


@click.group(invoke_without_command=True)
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the archive into DIR instead of the backup directory (no fallback).",
)
@click.pass_context
def backup(ctx: click.Context, to: Path | None) -> None:
    """Back up the database, blobs and vector store into one verified archive.

    The backup is online: the server may keep serving. The archive goes to
    PARLEY_BACKUP_DIR (default <data dir>/backups), or to PARLEY_BACKUP_FALLBACK_DIR when
    that is not writable, named parley-<UTC time>.tar.gz (.tar.gz.enc when
    PARLEY_BACKUP_KEY is set). Prints the archive's path and its row counts. A database
    that is not parley's (another application's) is refused.
    """
    if ctx.invoked_subcommand is not None:
        if to is not None:
            raise click.UsageError("--to applies to `parley backup` itself")
        return
    settings = _settings()
    # Another application's database (DATABASE_URL pointed at the wrong one) would make an
    # archive that ``parley restore`` takes for parley's.
    _run(lambda: migrate.refuse_not_parleys(settings))
    info = _run(lambda: create_backup(settings, to))
    extra = ", encrypted" if info.encrypted else ""
    click.echo(f"{info.path} ({_size(info.size)}{extra})")
    _echo_counts(_tables(info.manifest), _file_counts(info.manifest))


@backup.command("list")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="List DIR instead of the backup and fallback directories.",
)
def list_command(directory: Path | None) -> None:
    """List parley's archives, newest first: time, size, database, schema revision."""
    settings = _settings()
    found = _run(lambda: list_backups(settings, directory))
    if not found:
        click.echo("no backups")
        return
    for info in found:
        click.echo(_describe(info))


def _describe(info: BackupInfo) -> str:
    head = info.manifest
    when = info.created_at.strftime("%Y-%m-%d %H:%M:%S.") + f"{info.created_at:%f}"[:3] + "Z"
    if "error" in head:
        return f"{info.path}  {when}  {_size(info.size)}  unreadable: {head['error']}"
    parts = [
        str(info.path),
        when,
        _size(info.size),
        str(head.get("database_kind", "?")),
        f"revision {head.get('schema_revision') or 'none'}",
        f"parley {head.get('parley_version', '?')}",
    ]
    if info.encrypted:
        parts.append("encrypted")
    if head.get("reason"):
        parts.append(f"({head['reason']})")
    return "  ".join(parts)


@backup.command("verify")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
def verify_command(archive: Path) -> None:
    """Check ARCHIVE completely: checksums, the database's integrity and its row counts
    and digests against the manifest. Exit 1 when anything is wrong."""
    settings = _settings()
    manifest = _run(lambda: verify_archive(archive, settings))
    tables = _tables(manifest)
    click.echo(
        f"ok: {archive} ({manifest['database']['kind']}, schema revision "
        f"{manifest.get('schema_revision') or 'none'}, {len(tables)} tables, "
        f"{sum(tables.values())} rows, {len(manifest.get('files', {}))} files)"
    )


@backup.command("prune")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="How many of the newest archives to keep (default PARLEY_BACKUP_KEEP, 7).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Prune DIR instead of the backup and fallback directories.",
)
def prune_command(keep: int | None, directory: Path | None) -> None:
    """Delete all but the newest archives. Only files named like parley archives are
    ever deleted; nothing else in the directory is touched."""
    settings = _settings()
    deleted = _run(lambda: prune_backups(settings, keep, directory))
    for path in deleted:
        click.echo(f"deleted {path}")
    kept = settings.backup.keep if keep is None else keep
    click.echo(f"{len(deleted)} deleted, newest {kept} kept")


@click.command("restore")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed off a terminal).")
@click.option(
    "--no-safety-backup",
    is_flag=True,
    help="Do not back up the current state first (for a database too damaged to back "
    "up); whatever is replaced is kept aside as <name>.pre-restore-<time> instead.",
)
def restore_command(archive: Path, yes: bool, no_safety_backup: bool) -> None:
    """Replace the database, blobs and vector store with ARCHIVE's.

    The archive is verified first (checksums, integrity, schema revision known to this
    parley) and a safety backup of the current state is taken before anything is
    replaced. Refuses while a parley server is using the database: stop it first. An
    archive from an older parley is migrated to the current schema afterwards.
    """
    settings = _settings()
    if not yes:
        if not sys.stdin.isatty():
            click.echo("error: restore replaces the current data: pass --yes to confirm", err=True)
            raise SystemExit(1)
        click.confirm(
            f"Replace the current parley data with {archive}? (a safety backup is taken first)",
            abort=True,
        )
    report = _run(lambda: restore_backup(settings, archive, safety_backup=not no_safety_backup))
    click.echo(f"restored {report.archive} ({report.database})")
    if report.safety_backup is not None:
        click.echo(f"safety backup of the previous state: {report.safety_backup}")
    for path in report.kept_aside:
        click.echo(f"kept aside: {path}")
    if report.migrated_to is not None:
        click.echo(f"migrated from {report.schema_revision} to {report.migrated_to}")
    _echo_counts(report.tables, {"blobs": report.blobs, "vectors": report.vectors})
