"""``parley stats`` and ``parley limits``: the metrics API's reports and the limits, from the
shell; thin clients of ``parley.metrics.report``, ``store.metrics`` and ``store.limits``.

Commands read settings the way the server does and need the database at the schema head:
they never migrate it (``cli.common.engine_at_head``). Errors are one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
import orjson
import sqlalchemy

from parley.cli.common import engine_at_head, fail, run
from parley.errors import InvalidRequest
from parley.metrics import report
from parley.server.metrics_query import duration, published
from parley.store.limits import MAX_PER_MINUTE, LimitStore
from parley.store.metrics import MetricsStore
from parley.store.users import Users

_GROUPS = {
    "model": "model",
    "provider": "provider",
    "origin": "origin",
    "user": "user_id",
    "api_key": "api_key_id",
    "success": "success",
    "error_type": "error_type",
}


@click.command("stats")
@click.option("--window", default="24h", show_default=True, help="How far back: 30m, 24h, 7d...")
@click.option(
    "--group-by",
    default="model",
    show_default=True,
    help=f"Comma-separated: {', '.join(_GROUPS)} (empty: one total).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def stats(window: str, group_by: str, as_json: bool) -> None:
    """Requests, errors, latency percentiles, tokens and cost over the window that ends
    now (the same figures as GET /api/metrics/summary): its first line is the window
    counted, rounded out to whole hours where the raw log was pruned."""
    try:
        # The API's rules: positive, at most ten years.
        span = duration(window, "--window")
    except InvalidRequest as exc:
        fail(f"{exc}, not {window!r}")
    names = [n.strip() for n in group_by.split(",") if n.strip()]
    unknown = [n for n in names if n not in _GROUPS]
    if unknown:
        fail(f"cannot group by {', '.join(unknown)}: choose from {', '.join(_GROUPS)}")
    end = datetime.now(UTC)
    with engine_at_head() as engine:
        grouping = [_GROUPS[n] for n in names]
        store = MetricsStore(engine)
        counted = store.window(end - span, end, {}, grouping)
        # Users and keys by their public ids, as the API and `parley limits` name them.
        entries = published(report.summary(counted.rows, grouping), store)
    if as_json:
        since, until = _iso(counted.start), _iso(counted.end)
        body = {"window": window, "since": since, "until": until, "data": entries}
        click.echo(orjson.dumps(body, default=str).decode())
        return
    rounded = counted.start != end - span or counted.end != end
    click.echo(
        f"{_iso(counted.start, 'seconds')} to {_iso(counted.end, 'seconds')}"
        + (" (rounded out to whole hours: the raw log there was pruned)" if rounded else "")
    )
    labels = [", ".join(f"{k}={v}" for k, v in e["group"].items()) or "(all)" for e in entries]
    # Wide enough for every label: a public id cut short names nobody.
    width = max([40, *map(len, labels)])
    header = (
        f"{'group':<{width}} {'requests':>8} {'err %':>6} {'p50 ms':>8} {'p90 ms':>8} "
        f"{'p99 ms':>8} {'ttft p50':>8} {'tokens':>10} {'cost $':>10}"
    )
    click.echo(header)
    for e, label in zip(entries, labels, strict=True):
        lat, ttft = e["latency_ms"], e["time_to_first_token_ms"]
        rate = "" if e["error_rate"] is None else f"{100 * e['error_rate']:.1f}"
        cost = "" if e["cost_usd"] is None else f"{e['cost_usd']:.4f}"
        click.echo(
            f"{label:<{width}} {e['requests']:>8} {rate:>6} {_ms(lat['p50']):>8} "
            f"{_ms(lat['p90']):>8} {_ms(lat['p99']):>8} {_ms(ttft['p50']):>8} "
            f"{e['total_tokens']:>10} {cost:>10}"
        )


def _iso(moment: datetime, timespec: str = "auto") -> str:
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


@click.group("limits")
def limits() -> None:
    """Per-user and per-API-key limits: requests and tokens per minute, spend per day and
    month (the same as /api/admin/limits)."""


@limits.command("list")
def list_limits() -> None:
    """Every limit set."""
    with engine_at_head() as engine:
        for row in LimitStore(engine).listing():
            subject = f"user {row['user']}" if row["user"] else f"key {row['api_key']}"
            values = ", ".join(
                f"{k}={v}" for k, v in row.items() if k not in ("user", "api_key") and v is not None
            )
            click.echo(f"{subject}: {values or 'no limits'}")


def _subject_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--user", "user_ref", help="A username or email.")(command)
    return click.option("--key", "key_ref", help="An API key's id.")(command)


# What the limit columns hold (``store.limits.check_values``), refused as option errors.
_PER_MINUTE = click.IntRange(min=1, max=MAX_PER_MINUTE)
_USD = click.FloatRange(min=0)


def _finite(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    # FloatRange lets "inf" and "nan" through: neither is a budget.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.", param=param)
    return value


# The option of each limit field, as `set` takes it and `clear` names it.
_OPTIONS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "usd_day": "usd_per_day",
    "usd_month": "usd_per_month",
}


@limits.command("set")
@_subject_options
@click.option("--rpm", type=_PER_MINUTE, help="Requests per minute.")
@click.option("--tpm", type=_PER_MINUTE, help="Tokens per minute.")
@click.option("--usd-day", type=_USD, callback=_finite, help="Spend per day (UTC), in USD.")
@click.option("--usd-month", type=_USD, callback=_finite, help="Spend per month, in USD.")
def set_limit(user_ref: str | None, key_ref: str | None, **given: float | None) -> None:
    """Set the given limits of a user or an API key; its other limits stay as they are
    (remove one with `parley limits clear --rpm` etc.)."""
    values = {_OPTIONS[option]: value for option, value in given.items() if value is not None}
    if not values:
        fail("give at least one of --rpm, --tpm, --usd-day and --usd-month")
    with engine_at_head() as engine:
        user_id, key_id = _subject(engine, user_ref, key_ref)
        store = LimitStore(engine)
        limit = run(lambda: store.set_limit(user_id=user_id, api_key_id=key_id, values=values))
    click.echo(
        f"limits set: {_describe(limit.values())} (running servers apply them within 5 seconds)"
    )


@limits.command("clear")
@_subject_options
@click.option("--rpm", is_flag=True, help="Remove only the requests-per-minute limit.")
@click.option("--tpm", is_flag=True, help="Remove only the tokens-per-minute limit.")
@click.option("--usd-day", is_flag=True, help="Remove only the daily spend limit.")
@click.option("--usd-month", is_flag=True, help="Remove only the monthly spend limit.")
def clear_limit(user_ref: str | None, key_ref: str | None, **chosen: bool) -> None:
    """Remove every limit of a user or an API key or, with --rpm, --tpm, --usd-day or
    --usd-month, only those (the others stay)."""
    fields = [_OPTIONS[option] for option, on in chosen.items() if on]
    with engine_at_head() as engine:
        user_id, key_id = _subject(engine, user_ref, key_ref)
        store = LimitStore(engine)
        if not fields:
            if not store.delete_limit(user_id=user_id, api_key_id=key_id):
                fail("no limits are set for it")
            click.echo("limits cleared")
            return
        left = store.remove_limits(user_id=user_id, api_key_id=key_id, fields=fields)
    if left is None:
        fail("no limits are set for it")
    click.echo(f"limits cleared: {', '.join(fields)}; left: {_describe(left.values())}")


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if v is not None) or "no limits"


def _subject(
    engine: sqlalchemy.Engine, user_ref: str | None, key_ref: str | None
) -> tuple[int | None, int | None]:
    if (user_ref is None) == (key_ref is None):
        fail("give exactly one of --user and --key")
    users = Users(engine)
    if user_ref is not None:
        user = users.find_user(user_ref)
        if user is None:
            fail(f"no user {user_ref!r}")
        return user.id, None
    assert key_ref is not None
    try:
        key = users.get_key(uuid.UUID(key_ref))
    except ValueError:
        key = None
    if key is None:
        fail(f"no API key {key_ref!r}")
    return None, key.id
