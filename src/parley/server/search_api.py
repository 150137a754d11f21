"""Search over the caller's history (``GET /api/search``): HTTP only.

The handler validates the query string and hands the search to ``store.search``; the
store applies the scope inside its SQL. Invariants:

- a caller searches their own history; an admin may ask for everyone's
  (``scope=all``); a user who asks for it gets a 400, never someone else's rows;
- a ``conversation`` filter that names a conversation the caller may not see (or none)
  gives no results, the same as one without matches, so ids cannot be probed;
- ``mode``: ``keyword`` (the database's full-text index), ``semantic`` (nearest message
  vectors, ``search.hybrid``) or ``hybrid`` (the default: reciprocal rank fusion of both).
  Without an embedder ``semantic`` is a 503 that says so, and ``hybrid`` answers keyword
  results with ``"mode": "keyword"`` and a ``notice``; so with a vector store that cannot
  be used (files damaged or missing, a disk refusing): a 503 ``search_unavailable`` that
  says why without the store's location (logged with it), never a 500;
- snippets are HTML: the message text escaped, matched words in ``<mark>`` elements.
"""

from __future__ import annotations

import html
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from parley.domain.exchange import Exchange
from parley.errors import InvalidRequest, SearchUnavailable, VectorStoreUnusable
from parley.search.embedders import RemoteCall, vectors_of
from parley.search.hybrid import SemanticSearch, public_reason
from parley.server import identity
from parley.server.params import page_size
from parley.server.state import SERVICES, Services
from parley.store.search import MARK_END, MARK_START, MAX_LIMIT, Hit, Scope

MODES = ("keyword", "semantic", "hybrid")
DEFAULT_MODE = "hybrid"
DEFAULT_LIMIT = 20

log = logging.getLogger(__name__)


def add_routes(app: web.Application) -> None:
    """Register this module's routes on ``app``."""
    app.router.add_get("/api/search", search)


async def search(request: web.Request) -> web.Response:
    """Search your messages and conversation titles by words, by meaning, or both.

    Query: ``q`` (1-1,000 characters; keyword: every word must match; quotes, ``*`` and
    operators are plain text), ``mode`` (``hybrid`` by default, ``keyword``, ``semantic``),
    ``conversation?`` (a conversation id), ``limit`` (1-100, default 20), ``scope``
    (``own`` by default; ``all``: every user's history, admins only).
    ``{"data": [...], "mode": ..., "notice"?: ...}``, best first: each hit has ``type``
    (``message`` or ``title``), ``score``, ``snippet`` (HTML), ``conversation_id``,
    ``conversation_title``, ``message_id``, ``role``, ``created_at``. ``mode`` is the one
    that answered (``keyword`` when hybrid had no embedder; ``notice`` says why).
    """
    caller = identity.current(request)
    query = request.query
    mode = query.get("mode", DEFAULT_MODE)
    if mode not in MODES:
        raise InvalidRequest(
            f"unknown search mode '{mode}'; expected keyword, semantic or hybrid", "mode"
        )
    scope_name = query.get("scope", "own")
    if scope_name not in ("own", "all"):
        raise InvalidRequest("'scope' must be 'own' or 'all'", "scope")
    if scope_name == "all" and not caller.is_admin:
        raise InvalidRequest("only admins may search every user's history (scope=all)", "scope")
    services = request.app[SERVICES]
    search = services.search
    searcher = (
        search.searcher if search is not None else SemanticSearch(services.engine, None, None)
    )
    try:
        results = await searcher.search(
            query.get("q", ""),
            Scope(caller.user_id, everyone=scope_name == "all"),
            mode=mode,
            conversation=_conversation(query.get("conversation")),
            limit=page_size(query.get("limit"), MAX_LIMIT, DEFAULT_LIMIT),
        )
    except VectorStoreUnusable as exc:
        # The operator reads where the store is in the log; the caller, only what failed.
        log.warning("semantic search failed: %s", exc.message)
        raise SearchUnavailable(f"{public_reason(exc)}; use mode=keyword meanwhile") from None
    body: dict[str, Any] = {"data": [hit_json(hit) for hit in results.hits], "mode": results.mode}
    if results.notice is not None:
        body["notice"] = results.notice
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def remote_embeddings(services: Services) -> RemoteCall:
    """How a remote embedder reaches the gateway: one ``/v1/embeddings``-shaped request per
    batch to ``[search] model``, recorded in the request log like any other (no user)."""

    async def call(texts: list[str]) -> list[list[float]]:
        model = services.settings.search.model or ""
        exchange = Exchange(
            model_requested=model,
            messages=(),
            started_at=datetime.now(UTC),
            endpoint="embeddings",
            origin="search-indexer",
        )
        try:
            result = await services.gateway.embeddings(
                {"model": model, "input": texts}, model, exchange
            )
        finally:
            if exchange.attempts:
                services.writer.submit_nowait(exchange)
        return vectors_of(orjson.loads(result.raw))

    return call


def hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "type": hit.kind,
        "score": hit.score,
        "snippet": snippet_html(hit.snippet),
        "conversation_id": hit.conversation_id,
        "conversation_title": hit.conversation_title,
        "message_id": hit.message_id,
        "role": hit.role,
        "created_at": hit.created_at,
    }


def snippet_html(snippet: str) -> str:
    """The store's snippet as HTML: text escaped, marked words in ``<mark>``.

    Markers are paired here: a stray one (the text itself held the private-use
    character) never opens an element it does not close.
    """
    out: list[str] = []
    rest = snippet
    while True:
        start = rest.find(MARK_START)
        end = rest.find(MARK_END, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            out.append(html.escape(rest.replace(MARK_START, "").replace(MARK_END, "")))
            return "".join(out)
        before = rest[:start].replace(MARK_END, "")
        out.append(html.escape(before))
        out.append("<mark>" + html.escape(rest[start + 1 : end]) + "</mark>")
        rest = rest[end + 1 :]


def _conversation(raw: str | None) -> uuid.UUID | None:
    if raw is None or raw == "":
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise InvalidRequest("'conversation' is not a conversation id", "conversation") from None
