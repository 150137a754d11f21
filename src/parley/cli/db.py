"""``parley db``: schema migrations, a thin client of ``parley.ops.migrate``.

Every command reads settings the way the server does (``DATABASE_URL``, the config file),
so it acts on the database the server would use, and applies the server's checks: a
corrupt or foreign SQLite file is refused untouched, and ``upgrade`` / ``downgrade`` back
the database up first (``parley.ops.migrate``). Errors are one line on stderr and exit
status 1, never a traceback (``cli.common``); a downgrade refused because it would
discard data adds one line per table or column it would drop.
"""

from __future__ import annotations

import click

from parley.cli.common import run as _run
from parley.ops import migrate
from parley.settings import Settings, load_settings


def _settings() -> Settings:
    return _run(load_settings)


@click.group()
def db() -> None:
    """Database schema migrations (Alembic, shipped inside parley)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Migrate the database up to REVISION (default: head), the way server start does.

    A database that holds data is backed up first (a verified archive in the backup
    directory, or its fallback); in production, no backup means no migration. All
    revisions run in one transaction, and at head the schema is checked against parley's
    models before it is committed: on any failure nothing changes, and the error says
    what failed and where the backup is. Only one process migrates at a time.
    """
    settings = _settings()
    report = _run(lambda: migrate.upgrade(settings, revision))
    _report(report)


@db.command()
@click.argument("revision")
@click.option(
    "--discard-data",
    is_flag=True,
    help="Downgrade even if tables or columns holding data are dropped (they are listed).",
)
def downgrade(revision: str, discard_data: bool) -> None:
    """Migrate the database down to REVISION ("base" removes every parley table).

    Backed up first and run in one transaction, like ``upgrade``. A downgrade that would
    drop tables or columns holding data is refused and changes nothing: it lists each
    with its count ("attachments: 56 rows", "request_log.finished_at: 1,234 non-null
    values"). --discard-data goes ahead, prints what it discarded, and needs a verified
    backup even with PARLEY_ENV=development.
    """
    settings = _settings()
    report = _run(lambda: migrate.downgrade(settings, revision, discard_data=discard_data))
    _report(report)


def _report(report: migrate.MigrationReport) -> None:
    for loss in report.discarded:
        click.echo(f"discarded {loss}")
    if report.backup is not None:
        click.echo(f"backup taken before migrating: {report.backup}")
    click.echo(f"database at {report.after or 'base'}")


@db.command()
def current() -> None:
    """Print the database's schema revision ("none" for an empty database).

    A revision this parley does not know (a newer parley migrated the database) is
    printed too, then said on stderr with exit status 1: this parley cannot use it. A
    database that is not parley's (tables but no parley revision, or another
    application's revision) is said on stderr with exit status 1, nothing printed.
    """
    settings = _settings()
    revision = _run(lambda: migrate.current(settings))
    heads = migrate.heads()
    if revision is None:
        click.echo("none")
        return
    click.echo(f"{revision} (head)" if revision in heads else revision)
    _run(lambda: migrate.refuse_unknown(revision))


@db.command()
def history() -> None:
    """List the schema revisions this parley ships, newest first."""
    heads = set(migrate.heads())
    for revision, down, doc in migrate.history():
        marker = " (head)" if revision in heads else ""
        click.echo(f"{down or 'base'} -> {revision}{marker}: {doc}")


@db.command()
def check() -> None:
    """Compare the database's schema with parley's models; exit 1 on any difference.

    A database with no parley schema yet (``current`` says "none") is one line and exit 1:
    create the schema with ``parley db upgrade``.
    """
    settings = _settings()
    drift = _run(lambda: migrate.check(settings))
    if not drift:
        click.echo("no drift: the database matches the models")
        return
    for line in drift:
        click.echo(line)
    raise SystemExit(1)
