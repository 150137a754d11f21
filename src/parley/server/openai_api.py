"""The OpenAI-compatible ``/v1`` endpoints: chat completions, models, embeddings.

Durability: in the default ``durable`` recording mode a non-streaming body, or the final
``data: [DONE]`` of a stream, is sent only after the exchange's record is committed. If the
commit fails the client gets an error instead of an acknowledgement. An upstream that dies
mid-stream gives the client an SSE ``error`` event, never a clean end. A client that goes
away mid-stream cancels the upstream call; the partial exchange is still recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

import orjson
from aiohttp import web

from parley.domain.events import Chunk
from parley.domain.exchange import Exchange
from parley.domain.messages import Message
from parley.errors import InvalidRequest, ParleyError, StoreError, UpstreamProtocolError
from parley.server.openai_parse import parse_chat_request, parse_json_object
from parley.server.state import SERVICES, Services, read_body

log = logging.getLogger(__name__)

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_response(error: ParleyError) -> web.Response:
    return web.Response(
        body=orjson.dumps(error.to_openai()),
        status=error.status,
        content_type="application/json",
        headers=error.headers(),
    )


def _sse_error(error: ParleyError) -> bytes:
    # Data-only, as OpenAI sends it: the SDKs raise on a data payload with an "error" key.
    return b"data: " + orjson.dumps(error.to_openai()) + b"\n\n"


def _new_exchange(
    request: web.Request,
    endpoint: str,
    model: str,
    messages: tuple[Message, ...] = (),
    *,
    is_streaming: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> Exchange:
    return Exchange(
        model_requested=model,
        messages=messages,
        started_at=datetime.now(UTC),
        endpoint=endpoint,
        origin=request.remote,
        client_protocol="openai",
        is_streaming=is_streaming,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    chat = parse_chat_request(data)
    exchange = _new_exchange(
        request,
        "chat",
        chat.model,
        chat.messages,
        is_streaming=chat.stream,
        max_tokens=chat.max_tokens,
        temperature=chat.temperature,
        top_p=chat.top_p,
    )

    services.check_recording()
    stream = services.gateway.stream(chat, exchange)
    try:
        first = await anext(stream)
    except ParleyError as exc:
        # Every upstream candidate failed before answering: the attempts are still facts.
        await services.record_quietly(exchange)
        return error_response(exc)
    except asyncio.CancelledError:
        # The client left while the upstream was thinking; the gateway cancelled it.
        services.record_in_background(exchange)
        raise

    if not chat.stream:
        try:
            body = _body(first)
        except ParleyError as exc:
            await _finish(stream)
            await services.record_quietly(exchange)
            return error_response(exc)
        await _finish(stream)
        try:
            await services.record(exchange)
        except StoreError as exc:
            return error_response(exc)
        return web.Response(body=body, content_type="application/json")
    return await _stream(request, services, exchange, stream, first)


async def _finish(chunks: AsyncGenerator[Chunk, None]) -> None:
    """Run a stream whose answer is complete to its end (its connection is reused)."""
    try:
        async for _ in chunks:
            pass
    except ParleyError as exc:
        log.info("upstream misbehaved after its answer was complete: %s", exc.message)
    finally:
        await chunks.aclose()


def _body(chunk: Chunk) -> bytes:
    if chunk.raw is None or chunk.protocol != "openai":
        raise UpstreamProtocolError("the upstream response cannot be encoded for OpenAI yet")
    return chunk.raw


async def _stream(
    request: web.Request,
    services: Services,
    exchange: Exchange,
    chunks: AsyncGenerator[Chunk, None],
    first: Chunk,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    chunk = first
    # Frames read together are written together: one send per upstream read.
    pending: list[bytes] = []
    try:
        await response.prepare(request)
        while not chunk.final:
            if not chunk.internal:
                pending.append(_body(chunk))
            if pending and not chunk.more:
                await response.write(pending[0] if len(pending) == 1 else b"".join(pending))
                pending.clear()
            chunk = await anext(chunks)
        final = _body(chunk)
    except ParleyError as exc:
        # The upstream broke after the stream began: record it, then tell the client.
        await chunks.aclose()
        await services.record_quietly(exchange)
        await _write_quietly(response, b"".join(pending) + _sse_error(exc))
        return response
    except (ConnectionError, OSError):
        # The client went away: closing the stream cancels the upstream call and marks
        # the attempt client_disconnected; the partial answer is still recorded.
        await chunks.aclose()
        services.record_in_background(exchange)
        return response
    except Exception:
        # Headers are sent: the error middleware cannot answer any more, so this stream
        # must end in an error event itself.
        log.exception("stream failed")
        await chunks.aclose()
        await services.record_quietly(exchange)
        error = ParleyError("internal error while streaming")
        await _write_quietly(response, b"".join(pending) + _sse_error(error))
        return response
    except BaseException:
        await chunks.aclose()
        services.record_in_background(exchange)
        raise
    try:
        await services.record(exchange)
    except StoreError as exc:
        await chunks.aclose()
        await _write_quietly(response, b"".join(pending) + _sse_error(exc))
        return response
    await _write_quietly(response, b"".join(pending) + final)
    await _finish(chunks)
    return response


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
        await response.write_eof()
    except (ConnectionError, OSError):
        log.info("client left before the end of its stream")


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    created = int(services.started_at)
    data = [
        {"id": model_id, "object": "model", "created": created, "owned_by": owner}
        for model_id, owner in services.gateway.router.model_ids()
    ]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def embeddings(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a non-empty string", "model")
    items = data.get("input")
    if not isinstance(items, str) and not (isinstance(items, list) and items):
        raise InvalidRequest("'input' must be a string or a non-empty array", "input")
    services.check_recording()
    exchange = _new_exchange(request, "embeddings", model)
    try:
        result = await services.gateway.embeddings(data, model, exchange)
    except ParleyError as exc:
        await services.record_quietly(exchange)
        return error_response(exc)
    try:
        await services.record(exchange)
    except StoreError as exc:
        return error_response(exc)
    return web.Response(body=result.raw, content_type="application/json")
