"""Answering a chat request in the client's protocol, whatever protocol the upstream spoke.

Both front doors (OpenAI ``/v1/chat/completions`` and Anthropic ``/v1/messages``) parse
their request into a neutral ``ChatRequest`` and hand it here with a ``Front``: the
client's protocol, an encoder for upstreams that speak another one, and the protocol's
error response. A chunk in the client's protocol is forwarded as its raw bytes (no
encoder work on that path); any other chunk is encoded from its events.

Durability: in the default ``durable`` recording mode a non-streaming body, or the final
frame of a stream (``data: [DONE]``, ``event: message_stop``), is sent only after the
exchange's record is committed. If the commit fails the client gets an error instead of
an acknowledgement. An upstream that dies mid-stream gives the client an error event,
never a clean end. A client that goes away mid-stream cancels the upstream call; the
partial exchange is still recorded.

Shutdown (see ``shutdown``): while it waits on the upstream an answer is registered with
the application's ``Drain``. When the grace period runs out the drain cancels it; the
exchange is then recorded with error type ``interrupted`` and finish reason
``server_shutdown`` (distinct from a client that left, ``cancelled`` /
``client_disconnected``), and the client gets a 503, or an error event if its stream had
begun. An answer that aiohttp cancels after the drain (its client read too slowly to take
that error event) is recorded the same way: the shutdown cut it off, not its client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from aiohttp import web

from parley.domain.events import Chunk
from parley.domain.exchange import Exchange
from parley.domain.messages import ChatRequest
from parley.errors import ParleyError, ServerShuttingDown, StoreError
from parley.gateway.recording import ERROR_MESSAGE_CHARS, INTERRUPTED_MESSAGE, mark_interrupted
from parley.gateway.service import finish
from parley.server import identity
from parley.server.shutdown import Drain, drain_of
from parley.server.state import Services

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class Encoder(Protocol):
    """Builds one response in the client's protocol from neutral events."""

    def body(self, chunk: Chunk) -> bytes:
        """The whole body of a non-streaming answer (one final chunk)."""
        ...

    def frames(self, chunk: Chunk) -> bytes:
        """The stream frames for one chunk; for the final chunk, ending with the final frame."""
        ...


@dataclass(frozen=True, slots=True)
class Front:
    """How one client protocol answers."""

    protocol: str
    encoder: Encoder
    error_response: Callable[[ParleyError], web.Response]
    sse_error: Callable[[ParleyError], bytes]


def exchange_for(request: web.Request, endpoint: str, chat: ChatRequest) -> Exchange:
    caller = identity.current(request)
    return Exchange(
        model_requested=chat.model,
        messages=chat.messages,
        started_at=datetime.now(UTC),
        endpoint=endpoint,
        origin=request.remote,
        client_protocol=chat.client_protocol,
        is_streaming=chat.stream,
        max_tokens=chat.max_tokens,
        temperature=chat.temperature,
        top_p=chat.top_p,
        user_id=caller.user_id,
        api_key_id=caller.api_key_id,
    )


async def answer(
    request: web.Request,
    services: Services,
    chat: ChatRequest,
    exchange: Exchange,
    front: Front,
) -> web.StreamResponse:
    """Run ``chat`` through the gateway and answer the client, recording the exchange."""
    drain = drain_of(request)
    await services.admit(identity.current(request))
    stream = services.gateway.stream(chat, exchange)
    try:
        with answering(drain):
            first = await anext(stream)
    except ParleyError as exc:
        # Every upstream candidate failed before answering: the attempts are still facts.
        await services.record_quietly(exchange)
        return front.error_response(exc)
    except asyncio.CancelledError:
        if await shutdown_cut_off(services, exchange, drain):
            return front.error_response(ServerShuttingDown(INTERRUPTED_MESSAGE))
        raise

    if not chat.stream:
        try:
            body = (
                first.raw
                if first.raw is not None and first.protocol == front.protocol
                else front.encoder.body(first)
            )
        except Exception as exc:
            # The upstream's answer could not be given to the client: recorded as failed.
            await finish(stream)
            error = exc if isinstance(exc, ParleyError) else _internal("encoding an answer", exc)
            mark_failed(exchange, error)
            await services.record_quietly(exchange)
            return front.error_response(error)
        await finish(stream)
        try:
            await services.record(exchange)
        except StoreError as exc:
            return front.error_response(exc)
        return web.Response(body=body, content_type="application/json")
    return await _stream(request, services, exchange, stream, first, front, drain)


async def _stream(
    request: web.Request,
    services: Services,
    exchange: Exchange,
    chunks: AsyncGenerator[Chunk, None],
    first: Chunk,
    front: Front,
    drain: Drain | None,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    protocol = front.protocol
    encoder = front.encoder
    chunk = first
    # Frames read together are written together: one send per upstream read.
    pending: list[bytes] = []
    try:
        # Left before the record is committed: a shutdown never cuts an acknowledgement.
        with answering(drain):
            await response.prepare(request)
            while not chunk.final:
                raw = chunk.raw
                if raw is not None and chunk.protocol == protocol:
                    if not chunk.internal:
                        pending.append(raw)
                else:
                    # Internal chunks are encoded too: usage the client did not ask for
                    # still feeds the encoder (Anthropic's message_delta needs it).
                    data = encoder.frames(chunk)
                    if data:
                        pending.append(data)
                if pending and not chunk.more:
                    await response.write(pending[0] if len(pending) == 1 else b"".join(pending))
                    pending.clear()
                chunk = await anext(chunks)
            raw = chunk.raw
            final = raw if raw is not None and chunk.protocol == protocol else encoder.frames(chunk)
    except (ConnectionError, OSError):
        # The client went away: closing the stream cancels the upstream call and marks
        # the attempt client_disconnected; the partial answer is still recorded.
        await chunks.aclose()
        services.record_in_background(exchange)
        return response
    except Exception as exc:
        # The upstream broke after the stream began, its answer could not be encoded, or
        # a bug: headers are sent, so the error middleware cannot answer any more. Record
        # it, then end the stream with an error event, never a clean-looking end.
        error = exc if isinstance(exc, ParleyError) else _internal("streaming", exc)
        await chunks.aclose()
        mark_failed(exchange, error)
        await services.record_quietly(exchange)
        await _write_quietly(response, b"".join(pending) + front.sse_error(error))
        return response
    except asyncio.CancelledError:
        interrupted = drain is not None and drain.interrupted()
        await chunks.aclose()
        if interrupted:
            # The grace period ran out: the partial answer is recorded as interrupted and
            # the client gets an error event, never a clean-looking end.
            mark_interrupted(exchange)
            await services.record_quietly(exchange)
            error = ServerShuttingDown(INTERRUPTED_MESSAGE)
            if not response.prepared:
                return front.error_response(error)
            await _write_quietly(response, b"".join(pending) + front.sse_error(error))
            return response
        _abandoned(services, exchange, drain)
        raise
    except BaseException:
        await chunks.aclose()
        _abandoned(services, exchange, drain)
        raise
    try:
        await services.record(exchange)
    except StoreError as exc:
        await chunks.aclose()
        await _write_quietly(response, b"".join(pending) + front.sse_error(exc))
        return response
    await _write_quietly(response, b"".join(pending) + final)
    await finish(chunks)
    return response


def mark_failed(exchange: Exchange, error: ParleyError) -> None:
    """Record the last attempt as failed with ``error`` when parley itself could not give
    the client the upstream's answer (it could not encode it, or a bug).

    The gateway closed that attempt as complete, or as cancelled when its stream was closed
    early: it cannot tell why its consumer stopped. An attempt that failed on its own (the
    upstream's error) keeps that error.
    """
    if not exchange.attempts:
        return
    attempt = exchange.attempts[-1]
    if not attempt.success and attempt.error_type != "cancelled":
        return
    attempt.success = False
    attempt.error_type = error.error_type
    attempt.error_message = error.message[:ERROR_MESSAGE_CHARS]
    attempt.finish_reason = "error"
    for choice in exchange.choices:
        choice.finish_reason = "error"


def _internal(doing: str, exc: Exception) -> ParleyError:
    log.error("internal error while %s", doing, exc_info=exc)
    return ParleyError(f"internal error while {doing}")


def answering(drain: Drain | None) -> AbstractContextManager[None]:
    """Mark the current task as waiting on an upstream (see ``Drain.answering``)."""
    return nullcontext() if drain is None else drain.answering()


async def shutdown_cut_off(services: Services, exchange: Exchange, drain: Drain | None) -> bool:
    """After a ``CancelledError`` while the upstream was thinking: True when the
    shutdown's grace ran out (the exchange is recorded as interrupted; the caller answers
    ``ServerShuttingDown``), False when the client left (the gateway cancelled the upstream
    call; the attempts are recorded in the background and the caller re-raises)."""
    if drain is not None and drain.interrupted():
        mark_interrupted(exchange)
        await services.record_quietly(exchange)
        return True
    _abandoned(services, exchange, drain)
    return False


def _abandoned(services: Services, exchange: Exchange, drain: Drain | None) -> None:
    """Record, without waiting, an answer cancelled without the drain's interruption: its
    client left, or aiohttp cancelled it after the drain (``Drain.drained``), which is the
    shutdown's doing and recorded as such."""
    if drain is not None and drain.drained():
        mark_interrupted(exchange)
    services.record_in_background(exchange)


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    try:
        # The last frames and the end of the body in one send, not two.
        await response.write_eof(data)
    except (ConnectionError, OSError):
        log.info("client left before the end of its stream")
