"""Query parameters of the metrics API: windows, buckets, groupings and filters.

Names in the API are public: ``user`` and ``api_key`` take and show public ids; inside,
they are the rollup dimensions ``user_id`` and ``api_key_id``. A caller who is not an
admin is always filtered to their own user: a ``user`` filter naming anyone else matches
nothing.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from parley.errors import InvalidRequest
from parley.server.identity import Identity
from parley.store.metrics import MetricsStore

DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=3660)
# API name -> dimension name.
DIMENSIONS = {
    "model": "model",
    "provider": "provider",
    "origin": "origin",
    "success": "success",
    "error_type": "error_type",
    "user": "user_id",
    "api_key": "api_key_id",
}
# Digits capped so a long string fails the match, not int() or timedelta().
_DURATION = re.compile(r"^(\d{1,12})\s*([smhd])$")
_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
# A time of day, then a space where its offset's '+' was: "2026-11-24T10:00:00 05:30".
_SPACED_OFFSET = re.compile(
    r"^(.*\d[T ]\d{2}(?::?\d{2}(?::?\d{2}(?:\.\d+)?)?)?) (\d{2}(?::?\d{2})?)$"
)
# Moments outside these years are refused: a ten-year window, a day's baseline or a bucket
# around them would step past datetime.min or datetime.max.
FIRST_YEAR, LAST_YEAR = 1000, 9998


@dataclass(frozen=True, slots=True)
class Query:
    start: datetime
    end: datetime
    filters: dict[str, Any]
    group_by: tuple[str, ...]


def duration(text: str, name: str) -> timedelta:
    """A positive duration of at most ten years, such as ``15m``, ``1h`` or ``7d``."""
    match = _DURATION.match(text.strip())
    amount = int(match.group(1)) if match else 0
    if match is None or amount == 0:
        raise InvalidRequest(f"'{name}' must be a positive duration such as 15m, 1h or 7d", name)
    unit = _UNITS[match.group(2)]
    # Compared before multiplying: a huge amount overflows timedelta.
    if amount > MAX_WINDOW / unit:
        raise InvalidRequest(f"'{name}' may be at most ten years", name)
    return amount * unit


def duration_text(span: timedelta) -> str:
    """``span`` as ``duration`` reads it: the largest unit that divides it (``90m``)."""
    for suffix, unit in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        if span % unit == timedelta(0):
            return f"{span // unit}{suffix}"
    return f"{span.total_seconds():g}s"  # unreachable: durations are whole seconds


def moment(text: str, name: str) -> datetime:
    spaced = _SPACED_OFFSET.match(text)
    if spaced:
        # A '+' sent unencoded in a URL (curl, a browser's address bar) reads as a space.
        text = f"{spaced[1]}+{spaced[2]}"
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 time", name) from None
    # Checked before the conversion to UTC, which can itself overflow near the ends.
    if not FIRST_YEAR <= parsed.year <= LAST_YEAR:
        raise InvalidRequest(
            f"'{name}' must be a time between the years {FIRST_YEAR} and {LAST_YEAR}", name
        )
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def window(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    q = request.query
    end = moment(q["until"], "until") if q.get("until") else now
    if q.get("since"):
        start = moment(q["since"], "since")
    else:
        start = end - (duration(q["window"], "window") if q.get("window") else DEFAULT_WINDOW)
    if start >= end:
        raise InvalidRequest("'since' must be before 'until'", "since")
    if end - start > MAX_WINDOW:
        raise InvalidRequest("the window may span at most ten years", "since")
    return start, end


def cursor(request: web.Request) -> uuid.UUID | None:
    """The ``cursor`` of ``/requests``: the public id of the row that ended a previous
    page (its ``next_cursor``), or None."""
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidRequest("'cursor' must be a page's next_cursor", "cursor") from None


def group_by(request: web.Request) -> tuple[str, ...]:
    raw = request.query.get("group_by", "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in DIMENSIONS]
    if unknown:
        raise InvalidRequest(
            f"cannot group by {', '.join(unknown)}: choose from {', '.join(DIMENSIONS)}",
            "group_by",
        )
    return tuple(DIMENSIONS[n] for n in dict.fromkeys(names))


async def filters(request: web.Request, caller: Identity, store: MetricsStore) -> dict[str, Any]:
    """Dimension filters from the query (repeat a parameter or comma-separate for any of)."""
    out: dict[str, Any] = {}
    for name in ("model", "provider", "origin", "error_type"):
        values = [v for raw in request.query.getall(name, []) for v in raw.split(",") if v]
        if any("\x00" in v for v in values):
            # PostgreSQL text cannot hold NUL, so no stored value could match.
            raise InvalidRequest(f"'{name}' must not contain NUL characters", name)
        if values:
            out[name] = values if len(values) > 1 else values[0]
    if "success" in request.query:
        value = request.query["success"].lower()
        if value not in ("true", "false"):
            raise InvalidRequest("'success' must be true or false", "success")
        out["success"] = value == "true"
    for name, table, column in (
        ("user", "users", "user_id"),
        ("api_key", "api_keys", "api_key_id"),
    ):
        raw = request.query.get(name)
        if raw:
            out[column] = await _internal(store, table, raw, name)
    if not caller.is_admin:
        # Users see their own traffic only: asked for someone else's, they get none (as
        # for an unknown id), never their own in its place.
        asked = out.get("user_id", caller.user_id)
        out["user_id"] = caller.user_id if asked == caller.user_id else -1
    return out


async def _internal(store: MetricsStore, table: str, raw: str, name: str) -> int:
    try:
        public_id = uuid.UUID(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an id", name) from None
    found = await asyncio.to_thread(store.internal_id, table, public_id)
    # An unknown id matches nothing (-1 is never a row id), like a filter on a quiet key.
    return found if found is not None else -1


async def publish(entries: list[dict[str, Any]], store: MetricsStore) -> list[dict[str, Any]]:
    """Replace internal user and key ids in report groups by public ids."""
    return await asyncio.to_thread(published, entries, store)


def published(entries: list[dict[str, Any]], store: MetricsStore) -> list[dict[str, Any]]:
    """``publish`` for a caller off the event loop (``parley stats``)."""
    groups = [e["group"] for e in entries if "group" in e] + [
        g["group"] for e in entries for g in e.get("groups", [])
    ]
    user_ids = {g["user_id"] for g in groups if g.get("user_id") is not None}
    key_ids = {g["api_key_id"] for g in groups if g.get("api_key_id") is not None}
    users, keys = store.public_ids(user_ids, key_ids)
    for group in groups:
        if "user_id" in group:
            value = group.pop("user_id")
            group["user"] = str(users[value]) if value in users else None
        if "api_key_id" in group:
            value = group.pop("api_key_id")
            group["api_key"] = str(keys[value]) if value in keys else None
    return entries
