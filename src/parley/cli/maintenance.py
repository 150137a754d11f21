"""``parley maintenance`` and ``parley retention``: thin clients of ``parley.ops``.

Both read settings the way the server does, so they act on the server's database.
Exit status: 0 when all is well; 1 when the command could not run (one line on stderr,
never a traceback) or a maintenance step failed; 3 when the integrity report found a
problem (2 stays click's, for a wrong command line).
"""

from __future__ import annotations

import click
import orjson

from parley.cli.common import run as _run
from parley.ops.maintenance import MaintenanceReport, run_maintenance
from parley.ops.retention import RetentionReport, run_retention
from parley.settings import load_settings

EXIT_FAILED = 1
EXIT_PROBLEMS = 3


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


@click.command()
@click.option(
    "--no-vacuum",
    is_flag=True,
    help="Only the steps that are safe while the server runs (no VACUUM, sampled ANALYZE).",
)
@click.option(
    "--remove-orphan-blobs",
    is_flag=True,
    help="Delete blob files that no attachment names (safe alongside uploads).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def maintenance(no_vacuum: bool, remove_orphan_blobs: bool, as_json: bool) -> None:
    """VACUUM, ANALYZE and an integrity report of the database and the blob directory.

    By default this is offline maintenance: it refuses while a parley server uses the
    database, then checkpoints, checks integrity (PRAGMA integrity_check, foreign keys,
    messages without conversation, orphan and missing blobs), VACUUMs (on SQLite a
    large file is rewritten to a new file and renamed into place) and runs ANALYZE.
    With --no-vacuum it runs beside a live server and never blocks it for long.

    Exit status: 0 all well, 1 could not run or a step failed, 3 the integrity report
    found a problem.
    """
    settings = _run(load_settings)
    report = _run(
        lambda: run_maintenance(
            settings, vacuum=not no_vacuum, remove_orphan_blobs=remove_orphan_blobs
        )
    )
    click.echo(_json(report.to_dict()) if as_json else render_maintenance(report))
    if report.problems:
        raise SystemExit(EXIT_PROBLEMS)
    if report.failed_steps:
        raise SystemExit(EXIT_FAILED)


@click.command()
@click.option("--dry-run", is_flag=True, help="Count the rows that would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def retention(dry_run: bool, as_json: bool) -> None:
    """Delete request-log (and HTTP metrics) rows older than their configured age.

    Ages come from [retention] in parley.toml or PARLEY_RETENTION_REQUEST_LOG_DAYS /
    PARLEY_RETENTION_HTTP_METRICS_DAYS (0 keeps rows forever). Rows go in batches of
    retention.batch_size, each its own short transaction, so a running server stays
    responsive. Conversations, messages and answers are never deleted: they only lose
    their link to the request-log row.
    """
    settings = _run(load_settings)
    report = _run(lambda: run_retention(settings, dry_run=dry_run))
    click.echo(_json(report.to_dict()) if as_json else render_retention(report))


def render_retention(report: RetentionReport) -> str:
    lines = []
    for t in report.tables:
        cutoff = "" if t.cutoff is None else t.cutoff.strftime("%Y-%m-%d %H:%M:%S UTC")
        if t.status == "kept forever":
            lines.append(f"{t.table}: kept forever (days = 0)")
        elif t.status == "no such table":
            lines.append(f"{t.table}: no such table yet, nothing to do")
        elif t.status == "dry run":
            lines.append(f"{t.table}: {t.deleted} row(s) older than {cutoff} would be deleted")
        else:
            lines.append(
                f"{t.table}: {t.deleted} row(s) older than {cutoff} deleted in {t.batches} "
                f"batch(es), {t.seconds:.1f} s"
                + (" (stopped early)" if t.status == "stopped" else "")
            )
        if not t.indexed:
            lines.append(f"  note: no index on {t.table}'s timestamp; batches walked ids")
    lines.append(f"total {report.seconds:.1f} s")
    return "\n".join(lines)


def render_maintenance(report: MaintenanceReport) -> str:
    lines = [f"maintenance ({report.backend}, {report.mode}) in {report.seconds:.1f} s"]
    if report.size_before is not None and report.size_after is not None:
        lines.append(f"size: {_size(report.size_before)} -> {_size(report.size_after)}")
    lines.append("steps:")
    for step in report.steps:
        took = f" ({step.seconds:.2f} s)" if step.status == "done" else ""
        lines.append(f"  {step.status.upper():<8} {step.name}: {step.detail}{took}")
    lines.append("integrity:")
    for check in report.checks:
        status = "SKIPPED" if check.skipped else "OK" if check.ok else "PROBLEM"
        lines.append(f"  {status:<8} {check.name}: {check.detail}")
        lines.extend(f"           {item}" for item in check.items)
    problems, failed = len(report.problems), len(report.failed_steps)
    if not problems and not failed:
        lines.append("result: ok")
    else:
        lines.append(f"result: {problems} integrity problem(s), {failed} failed step(s)")
    return "\n".join(lines)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
