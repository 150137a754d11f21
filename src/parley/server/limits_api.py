"""Limits: ``/api/admin/limits`` (admins set them) and ``/api/me/usage`` (users read theirs).

Routes (JSON; errors are OpenAI error JSON):

- ``GET /api/admin/limits``: every limit, with its subject's public id;
- ``PUT /api/admin/limits/{kind}/{id}`` (``kind``: ``users`` or ``keys``): set some of a
  subject's limits: ``requests_per_minute`` and ``tokens_per_minute`` (integers from 1 to
  2,147,483,647), ``usd_per_day`` and ``usd_per_month`` (finite numbers of 0 or more). A
  field given sets that limit, null removes it, a field left out stays as it was (as
  ``parley limits set`` and ``clear --rpm`` etc.); any other value is a 400 naming the
  field (``store.limits.check_values``). The answer holds all of the subject's limits;
- ``DELETE /api/admin/limits/{kind}/{id}``: remove all of them;
- ``GET /api/me/usage``: the limits that apply to the caller (their key's and their
  user's), each with its current usage.

A change applies at once in this process and within the limiter's reload interval (5 s)
in every other process on the database.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from parley.errors import NotFound, StoreUnavailable
from parley.gateway.limits import Limiter
from parley.server import identity
from parley.server.api_body import read_object
from parley.server.state import SERVICES
from parley.store.metrics import MetricsStore


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/admin/limits", list_limits)
    app.router.add_put("/api/admin/limits/{kind}/{id}", put_limit)
    app.router.add_delete("/api/admin/limits/{kind}/{id}", delete_limit)
    app.router.add_get("/api/me/usage", my_usage)


async def list_limits(request: web.Request) -> web.Response:
    """Admins: every limit set, by user or API key."""
    identity.admin(request)
    found = await asyncio.to_thread(_limiter(request).store.listing)
    return _json({"data": found})


async def put_limit(request: web.Request) -> web.Response:
    """Admins: set limits of a user or an API key; the others stay (null removes one)."""
    identity.admin(request)
    limiter = _limiter(request)
    user_id, key_id = await _subject(request)
    # Checked by set_limit (``store.limits.check_values``): a bad value is a 400.
    values = await read_object(request)
    limit = await asyncio.to_thread(
        lambda: limiter.store.set_limit(user_id=user_id, api_key_id=key_id, values=values)
    )
    await limiter.reload()
    return _json(
        {"kind": request.match_info["kind"], "id": request.match_info["id"], **limit.values()}
    )


async def delete_limit(request: web.Request) -> web.Response:
    """Admins: remove every limit of a user or an API key."""
    identity.admin(request)
    limiter = _limiter(request)
    user_id, key_id = await _subject(request)
    deleted = await asyncio.to_thread(
        lambda: limiter.store.delete_limit(user_id=user_id, api_key_id=key_id)
    )
    if not deleted:
        raise NotFound("no limits are set for it")
    await limiter.reload()
    return web.Response(status=204)


async def my_usage(request: web.Request) -> web.Response:
    """The limits that apply to the caller, each with how much of it is used now."""
    caller = identity.current(request)
    limiter = _limiter(request)
    await limiter.reload()
    now = datetime.now(UTC)
    out = []
    for limit in limiter.limits_of(caller):
        usage = await asyncio.to_thread(limiter.store.usage, limit, now)
        out.append(
            {
                "applies_to": "api_key" if limit.api_key_id is not None else "user",
                "limits": limit.values(),
                "usage": {
                    "requests_this_minute": usage.requests_this_minute,
                    "tokens_last_minute": usage.tokens_last_minute,
                    "usd_today": usage.usd_today,
                    "usd_this_month": usage.usd_this_month,
                },
            }
        )
    return _json({"data": out})


async def _subject(request: web.Request) -> tuple[int | None, int | None]:
    kind = request.match_info["kind"]
    if kind not in ("users", "keys"):
        raise NotFound(f"no such endpoint: {request.method} {request.path}")
    try:
        public_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound("no such user or API key") from None
    store = MetricsStore(request.app[SERVICES].engine)
    table = "users" if kind == "users" else "api_keys"
    found = await asyncio.to_thread(store.internal_id, table, public_id)
    if found is None:
        raise NotFound("no such user or API key")
    return (found, None) if kind == "users" else (None, found)


def _limiter(request: web.Request) -> Limiter:
    limiter = request.app[SERVICES].limiter
    if limiter is None:
        raise StoreUnavailable("limits are not available in this server")
    return limiter


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
