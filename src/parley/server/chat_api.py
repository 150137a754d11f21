"""The chat API's conversations and messages (``/api/conversations``): HTTP only.

Handlers parse and validate JSON, ask ``identity.current`` who calls, and hand the work
to ``chat.service`` (sending) or the conversation repository (everything else); neither
is called with anything a handler has not validated. Invariants:

- every id in a URL or a body is a public UUID; a malformed, unknown or not-yours
  conversation id is the same 404 (``Viewer.may_see`` decides, in the repository); a
  message id (``message_id`` in a regenerate URL, ``parent_id``, ``active_leaf_id``) that
  is malformed or not of the conversation is a 400 naming it;
- the conversation's own fields are checked by ``chat.fields``, as an import checks them;
- a message send or regenerate answers as SSE or one JSON body (``chat_replies``, which
  also holds the JSON shapes of conversations and messages);
- a send may carry ``attachments``: ids of the caller's own uploads (any other id is the
  404 of a missing one, before anything is stored); messages show their files as
  metadata (id, file name, MIME type, size), never their bytes;
- deleting a conversation, or a message with its replies, sweeps, after the commit, the
  blobs its attachments named that no other attachment names (``files_api``'s
  attachment store). The message id in a message's DELETE URL names the resource
  deleted: malformed or not of the conversation, it is a 404.

The service is built in a cleanup context that runs after the app's lifespan has made
``Services`` (whose engine it shares).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from parley.chat import fields
from parley.chat.interface import Options
from parley.chat.service import ChatService
from parley.domain.exchange import MAX_TOKENS_LIMIT
from parley.domain.messages import Message
from parley.errors import InvalidRequest, NotFound
from parley.search.documents_library import collection_name
from parley.search.rag import MAX_COLLECTIONS
from parley.server import identity
from parley.server.api_body import read_object
from parley.server.chat_content import message_content
from parley.server.chat_replies import answer, conversation_json, json_response, tree_json
from parley.server.documents_api import DOCUMENTS
from parley.server.files_api import FILES
from parley.server.params import page_size
from parley.server.shutdown import DRAIN
from parley.server.state import SERVICES
from parley.store.conversations import (
    ACTIVE_LEAF,
    MAX_PAGE,
    Conversations,
    Parent,
)
from parley.store.provider_configs import ProviderConfigStore

CHAT = web.AppKey("parley.chat", ChatService)

_CREATE_FIELDS = frozenset({"title", "default_model", "system_prompt", "provider_configuration"})
_SEND_FIELDS = frozenset(
    {
        "content",
        "attachments",
        "parent_id",
        "model",
        "stream",
        "temperature",
        "max_tokens",
        "collections",
    }
)
# Files one message may carry.
MAX_ATTACHMENTS = 20
_REGENERATE_FIELDS = frozenset({"model", "stream", "temperature", "max_tokens", "collections"})


def add_routes(app: web.Application) -> None:
    """Register this module's routes on ``app``."""
    app.router.add_post("/api/conversations", create_conversation)
    app.router.add_get("/api/conversations", list_conversations)
    app.router.add_get("/api/conversations/{id}", get_conversation)
    app.router.add_patch("/api/conversations/{id}", update_conversation)
    app.router.add_delete("/api/conversations/{id}", delete_conversation)
    app.router.add_post("/api/conversations/{id}/messages", send_message)
    app.router.add_delete("/api/conversations/{id}/messages/{message_id}", delete_message)
    app.router.add_post(
        "/api/conversations/{id}/messages/{message_id}/regenerate", regenerate_message
    )
    app.cleanup_ctx.append(_chat_service)


async def _chat_service(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    chat = ChatService(
        Conversations(services.engine),
        services.gateway,
        services,
        # Journal mode too: the chat API reads its answer back once it is committed.
        durable=services.settings.recording != "async",
        # files_api's lifespan runs after this one: its service is looked up when needed.
        attachments=lambda: app[FILES].attachments,
        # documents_api's lifespan runs after this one too.
        sources=lambda: app[DOCUMENTS].retriever if DOCUMENTS in app else None,
        interruptions=app.get(DRAIN),
    )
    app[CHAT] = chat
    try:
        yield
    finally:
        await chat.close()


# -- conversations -----------------------------------------------------------------------


async def create_conversation(request: web.Request) -> web.Response:
    """Create a conversation.

    Body: ``default_model`` (``provider/model`` or an alias; unknown: 400), ``title?``,
    ``system_prompt?``, ``provider_configuration?`` (the name of an active provider
    configuration: its system prompt applies unless the conversation has one, and it is
    the default model when ``default_model`` is not given). 201 with the conversation.
    """
    caller = identity.current(request)
    chat = request.app[CHAT]
    body = await _body(request, _CREATE_FIELDS)
    config_id: int | None = None
    config_name = fields.text(body.get("provider_configuration"), "provider_configuration")
    if config_name is not None:
        store = ProviderConfigStore(request.app[SERVICES].engine)
        stored = await asyncio.to_thread(store.get_by_name, config_name)
        if stored is None or not stored.is_active:
            raise InvalidRequest(
                f"no active provider configuration named '{config_name}'",
                "provider_configuration",
            )
        config_id = stored.id
    model = (
        fields.model_id(body.get("default_model"), "default_model", required=config_name is None)
        or config_name
    )
    assert model is not None
    conversation = await asyncio.to_thread(
        chat.store.create,
        user_id=caller.user_id,
        api_key_id=caller.api_key_id,
        default_model=await chat.check_model(model, "default_model"),
        title=fields.title(body.get("title")),
        system_prompt=fields.text(body.get("system_prompt"), "system_prompt", empty_ok=True),
        provider_config_id=config_id,
    )
    return json_response(conversation_json(conversation), status=201)


async def list_conversations(request: web.Request) -> web.Response:
    """List your conversations: pinned first, then newest activity first.

    Query: ``limit`` (1-200, default 50), ``cursor`` (a page's ``next_cursor``),
    ``archived`` (false by default, true, all), ``pinned`` (true, false, all by default),
    ``q`` (title substring). ``{"data": [...], "next_cursor": ...}``; conversations that
    ``/v1`` traffic made are listed too, with ``source`` ``api``.
    """
    caller = identity.current(request)
    query = request.query
    page = await asyncio.to_thread(
        request.app[CHAT].store.list_page,
        caller,
        limit=page_size(query.get("limit"), MAX_PAGE),
        cursor=query.get("cursor") or None,
        archived=_flag(query, "archived", default=False),
        pinned=_flag(query, "pinned", default=None),
        q=query.get("q") or None,
    )
    return json_response(
        {"data": [conversation_json(c) for c in page.items], "next_cursor": page.next_cursor}
    )


async def get_conversation(request: web.Request) -> web.Response:
    """A conversation with every message of every branch.

    ``messages`` (oldest first, each with its ``parent_id``), ``active_path`` (ids from
    the root to the active leaf) and ``active_leaf_id``.
    """
    caller = identity.current(request)
    tree = await asyncio.to_thread(request.app[CHAT].store.load, caller, _path_id(request))
    if tree is None:
        raise _missing()
    return json_response(tree_json(tree))


async def update_conversation(request: web.Request) -> web.Response:
    """Change a conversation's settings or select a branch.

    Body: any of ``title``, ``default_model``, ``archived``, ``pinned``, ``is_active``,
    ``system_prompt``, ``active_leaf_id`` (a message of this conversation, or null).
    """
    caller = identity.current(request)
    chat = request.app[CHAT]
    body = await _body(request, frozenset(_PATCHERS) | {"default_model"})
    changes = {name: _PATCHERS[name](body) for name in body if name in _PATCHERS}
    if "default_model" in body:
        # The only check that may consult the provider directory, hence async; made only
        # once the others passed (a coroutine made before one of them raised was left
        # unawaited).
        changes["default_model"] = await _patch_model(chat, body)
    conversation = await asyncio.to_thread(chat.store.update, caller, _path_id(request), changes)
    if conversation is None:
        raise _missing()
    return json_response(conversation_json(conversation))


async def delete_conversation(request: web.Request) -> web.Response:
    """Delete a conversation with its messages and attachments (204).

    The request log keeps its rows, unlinked from the conversation.
    """
    caller = identity.current(request)
    blobs = await asyncio.to_thread(request.app[CHAT].store.delete, caller, _path_id(request))
    if blobs is None:
        raise _missing()
    await _sweep(request, blobs)
    return web.Response(status=204)


async def _sweep(request: web.Request, blobs: set[str]) -> None:
    files = request.app.get(FILES)
    if blobs and files is not None:
        # After the commit: a blob goes once no attachment row names it any more.
        await asyncio.to_thread(files.attachments.sweep, blobs)


# -- messages ----------------------------------------------------------------------------


async def send_message(request: web.Request) -> web.StreamResponse:
    """Send a user message and get the answer, streamed as SSE by default.

    Body: ``content`` (a string or OpenAI content parts; may be empty with attachments),
    ``attachments?`` (ids of your uploads: images reach the model as image parts, text
    files as text), ``parent_id?`` (default: the active leaf; null: a new root; a
    message's parent: an edit, a new branch), ``model?`` (this message only), ``stream?``,
    ``temperature?``, ``max_tokens?``, ``collections?`` (document collections of yours to
    answer from, besides the conversation's documents; the answer lists its
    ``citations``; a 503 before anything is stored when they cannot be searched). The
    user message is stored, with its attachments, before the model is called; the
    answer has a ``notice`` (stored with it) when the conversation's documents could not
    be searched.
    Events: ``message``, ``delta``..., then ``done`` or ``error``; with ``stream`` false,
    ``{user_message, assistant_message}``.
    """
    caller = identity.current(request)
    conversation_id = _path_id(request)
    body = await _body(request, _SEND_FIELDS)
    attachments = _attachment_ids(body.get("attachments"))
    message = Message("user", message_content(body.get("content"), empty_ok=bool(attachments)))
    parent: Parent = ACTIVE_LEAF
    if "parent_id" in body:
        raw = body["parent_id"]
        parent = None if raw is None else _body_id(raw, "parent_id")
    options = _options(request, body)
    reply = await request.app[CHAT].send(
        caller, conversation_id, message, options, parent, attachments
    )
    return await answer(request, reply, options.stream)


async def regenerate_message(request: web.Request) -> web.StreamResponse:
    """Answer again: a new sibling of an answer (or a new answer to a user message).

    Body (optional): ``model?``, ``stream?``, ``temperature?``, ``max_tokens?``,
    ``collections?``. Answers
    like a send; the old answer stays and remains selectable.
    """
    caller = identity.current(request)
    conversation_id = _path_id(request)
    # Malformed: the 400 of an id this conversation does not hold (the store's), not a 404.
    message_id = _body_id(request.match_info["message_id"], "message_id")
    body = await _body(request, _REGENERATE_FIELDS, allow_empty=True)
    options = _options(request, body)
    reply = await request.app[CHAT].regenerate(caller, conversation_id, message_id, options)
    return await answer(request, reply, options.stream)


async def delete_message(request: web.Request) -> web.Response:
    """Delete a message with every reply below it, their files and search entries (204).

    When the active branch ran through it, its parent becomes the active leaf. The
    request log keeps its rows. An unknown, malformed or not-yours message id is a 404.
    """
    caller = identity.current(request)
    conversation_id = _path_id(request)
    try:
        message_id = uuid.UUID(request.match_info["message_id"])
    except ValueError:
        # The message is the resource here: a malformed id is as missing as an unknown one.
        raise NotFound(f"no such message: {request.match_info['message_id'][:64]}") from None
    blobs = await asyncio.to_thread(
        request.app[CHAT].store.delete_message, caller, conversation_id, message_id
    )
    if blobs is None:
        raise _missing()
    await _sweep(request, blobs)
    return web.Response(status=204)


# -- input -------------------------------------------------------------------------------


async def _body(
    request: web.Request, allowed: frozenset[str], *, allow_empty: bool = False
) -> dict[str, Any]:
    data = await read_object(request, allow_empty=allow_empty)
    fields.known_fields(data, allowed)
    return data


def _missing() -> NotFound:
    return NotFound("no such conversation")


def _path_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise _missing() from None


def _body_id(value: Any, param: str) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a message id (a UUID string) or null", param)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest(f"'{param}' is not a message id", param) from None


async def _patch_model(chat: ChatService, body: Mapping[str, Any]) -> str:
    model = fields.model_id(body.get("default_model"), "default_model", required=True)
    assert model is not None
    return await chat.check_model(model, "default_model")


def _patch_leaf(body: Mapping[str, Any]) -> uuid.UUID | None:
    value = body.get("active_leaf_id")
    return None if value is None else _body_id(value, "active_leaf_id")


# The fields checked without the provider directory (default_model is, by _patch_model).
_PATCHERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "title": lambda body: fields.title(body.get("title")),
    "archived": lambda body: fields.flag(body.get("archived"), "archived"),
    "pinned": lambda body: fields.flag(body.get("pinned"), "pinned"),
    "is_active": lambda body: fields.flag(body.get("is_active"), "is_active"),
    "system_prompt": lambda body: fields.text(
        body.get("system_prompt"), "system_prompt", empty_ok=True
    ),
    "active_leaf_id": _patch_leaf,
}


def _attachment_ids(value: Any) -> list[uuid.UUID]:
    """Upload ids, in order: a list of strings, each at most once; one that is not a
    UUID is as missing as an unknown one (404)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest("'attachments' must be an array of attachment ids", "attachments")
    if len(value) > MAX_ATTACHMENTS:
        raise InvalidRequest(
            f"a message carries at most {MAX_ATTACHMENTS} attachments", "attachments"
        )
    ids: list[uuid.UUID] = []
    for raw in value:
        try:
            public_id = uuid.UUID(raw)
        except ValueError:
            raise NotFound(f"no such attachment: {raw[:64]}") from None
        if public_id in ids:
            raise InvalidRequest(f"attachment {public_id} is listed twice", "attachments")
        ids.append(public_id)
    return ids


def _options(request: web.Request, body: Mapping[str, Any]) -> Options:
    model = fields.model_id(body.get("model"), "model")
    stream = fields.flag(body.get("stream", True), "stream")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise InvalidRequest("'temperature' must be a number between 0 and 2", "temperature")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_TOKENS_LIMIT
    ):
        raise InvalidRequest(
            f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}", "max_tokens"
        )
    return Options(
        model=model,
        stream=stream,
        temperature=None if temperature is None else float(temperature),
        max_tokens=max_tokens,
        origin=request.remote,
        collections=_collections(body.get("collections")),
    )


def _collections(value: Any) -> tuple[str, ...]:
    """Names of the caller's document collections to answer from, each once."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_COLLECTIONS:
        raise InvalidRequest(
            f"'collections' must be an array of at most {MAX_COLLECTIONS} names", "collections"
        )
    names = [collection_name(v, "collections") for v in value]
    return tuple(dict.fromkeys(names))


def _flag(query: Mapping[str, str], key: str, *, default: bool | None) -> bool | None:
    """A filter: true, false, or all (None). Spelled out: 1 and 0 are refused, as a
    boolean field of a body refuses them."""
    value = query.get(key)
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if lowered == "all":
        return None
    raise InvalidRequest(f"'{key}' must be true, false or all", key)
