"""The OpenAI-compatible ``/v1`` endpoints: chat completions, models (listed and one by
id), embeddings.

Chat completions go through ``relay``: an OpenAI upstream's bytes are forwarded as they
came, any other upstream's events are encoded by ``openai_encode``. Durability: in the
default ``durable`` recording mode a non-streaming body, or the final ``data: [DONE]`` of a
stream, is sent only after the exchange's record is committed (see ``relay``); so is an
embeddings answer.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from parley.domain.exchange import Exchange
from parley.errors import ModelNotFound, ParleyError, ServerShuttingDown, StoreError
from parley.gateway.catalog import ModelEntry
from parley.gateway.recording import INTERRUPTED_MESSAGE
from parley.server import identity
from parley.server.openai_encode import OpenAIEncoder, sse_error
from parley.server.openai_parse import (
    parse_chat_request,
    parse_embeddings_request,
    parse_json_object,
)
from parley.server.relay import Front, answer, answering, exchange_for, shutdown_cut_off
from parley.server.shutdown import drain_of
from parley.server.state import SERVICES, read_body


def error_response(error: ParleyError) -> web.Response:
    return web.Response(
        body=orjson.dumps(error.to_openai()),
        status=error.status,
        content_type="application/json",
        headers=error.headers(),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    chat = parse_chat_request(data)
    # Built per request but used only for upstreams that do not speak OpenAI: a passthrough
    # stream never calls it.
    front = Front(
        protocol="openai",
        encoder=OpenAIEncoder(chat.model, include_usage=chat.include_usage),
        error_response=error_response,
        sse_error=sse_error,
    )
    return await answer(request, services, chat, exchange_for(request, "chat", chat), front)


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    created = int(services.started_at)
    data = [_model_object(entry, created) for entry in await services.catalog.entries()]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def retrieve_model(request: web.Request) -> web.Response:
    # Looked up in the very list /v1/models answers, so the two never disagree about
    # which ids exist or what they carry. aiohttp decodes the SDK's %2F back into '/'.
    services = request.app[SERVICES]
    model = request.match_info["model"]
    for entry in await services.catalog.entries():
        if entry.id == model:
            body = _model_object(entry, int(services.started_at))
            return web.Response(body=orjson.dumps(body), content_type="application/json")
    raise ModelNotFound(f"The model '{model}' does not exist")


def _model_object(entry: ModelEntry, created: int) -> dict[str, Any]:
    return {
        "id": entry.id,
        "object": "model",
        "created": created,
        "owned_by": entry.owned_by,
        # parley's addition (known fields only); OpenAI clients ignore it.
        "capabilities": entry.capabilities.known(),
    }


async def embeddings(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    # Refused before admission and before the exchange exists: nothing is recorded.
    model = parse_embeddings_request(data)
    await services.admit(identity.current(request))
    caller = identity.current(request)
    exchange = Exchange(
        model_requested=model,
        messages=(),
        started_at=datetime.now(UTC),
        endpoint="embeddings",
        origin=request.remote,
        user_id=caller.user_id,
        api_key_id=caller.api_key_id,
    )
    drain = drain_of(request)
    try:
        with answering(drain):
            result = await services.gateway.embeddings(data, model, exchange)
    except ParleyError as exc:
        await services.record_quietly(exchange)
        return error_response(exc)
    except asyncio.CancelledError:
        if await shutdown_cut_off(services, exchange, drain):
            return error_response(ServerShuttingDown(INTERRUPTED_MESSAGE))
        raise
    try:
        await services.record(exchange)
    except StoreError as exc:
        return error_response(exc)
    return web.Response(body=result.raw, content_type="application/json")
