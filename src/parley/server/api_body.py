"""The JSON object body of a write to the chat and admin APIs (``/api``), read one way by
every route that takes one.

Invariants: the body is read within the server's ``max_body_bytes`` (413 past it); it must
be a JSON object in which no string holds a NUL (``openai_parse.parse_api_object``); a
route that names its fields refuses any other with one 400 listing them all, before it
looks at a single value.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from aiohttp import web

from parley.errors import refuse_unknown
from parley.server.openai_parse import parse_api_object
from parley.server.state import SERVICES, read_body


async def read_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object, within the server's body limit; with ``allow_empty``,
    an empty (or blank) body is an empty object."""
    raw = await read_body(request, request.app[SERVICES].settings.max_body_bytes)
    if allow_empty and not raw.strip():
        return {}
    return parse_api_object(raw)


async def read_fields(request: web.Request, allowed: Collection[str]) -> dict[str, Any]:
    """The request's JSON object, which may hold only the fields in ``allowed``."""
    return only_fields(await read_object(request), allowed)


def only_fields(data: Mapping[str, Any], allowed: Collection[str]) -> dict[str, Any]:
    """``data`` as a dict; ``InvalidRequest`` naming every field not in ``allowed``."""
    refuse_unknown(data, allowed)
    return dict(data)
