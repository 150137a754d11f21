"""The Anthropic Messages API front door: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Any configured model answers Anthropic clients. A request is parsed into the neutral form
(``anthropic_parse``), routed like a chat completion (retries, fallbacks, budgets) and
recorded as an exchange with endpoint ``messages`` and client protocol ``anthropic``. An
Anthropic upstream's bytes are forwarded as they came; any other upstream's events are
encoded by ``anthropic_encode``. Durability is ``relay``'s: the body, or the final
``message_stop`` event, goes out only after the record is committed.

Every error is Anthropic error JSON (``{"type": "error", "error": {"type", "message"}}``),
with the status parley chose and its ``Retry-After``. ``count_tokens`` asks the model's
first candidate whose adapter can count (``providers.base.TokenCounter``); it spends no
generation and is not recorded as an exchange.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from parley.errors import InvalidRequest, ModelNotFound, ParleyError
from parley.providers.base import TokenCounter
from parley.server import identity
from parley.server.anthropic_encode import AnthropicEncoder, error_body, sse_error
from parley.server.anthropic_parse import PROTOCOL, parse_messages_request
from parley.server.openai_parse import parse_json_object
from parley.server.relay import Front, answer, exchange_for
from parley.server.state import SERVICES, read_body


def error_response(error: ParleyError) -> web.Response:
    return web.Response(
        body=orjson.dumps(error_body(error)),
        status=error.status,
        content_type="application/json",
        headers=error.headers(),
    )


def is_anthropic_path(path: str) -> bool:
    """Whether errors on ``path`` are answered in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


async def messages(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    chat = parse_messages_request(data)
    chat.client_headers = _protocol_headers(request)
    front = Front(
        protocol=PROTOCOL,
        encoder=AnthropicEncoder(chat.model),
        error_response=error_response,
        sse_error=sse_error,
    )
    return await answer(request, services, chat, exchange_for(request, "messages", chat), front)


async def count_tokens(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    data = parse_json_object(await read_body(request, services.settings.max_body_bytes))
    chat = parse_messages_request(data, require_max_tokens=False)
    chat.client_headers = _protocol_headers(request)
    candidates = await services.gateway.candidates(chat.model, identity.current(request).user_id)
    if not candidates:
        raise ModelNotFound(f"no upstream candidate for model '{chat.model}'")
    # The first that can count: an alias may put an upstream that cannot first.
    counting = [c for c in candidates if isinstance(c.provider, TokenCounter)]
    if not counting:
        kinds = ", ".join(f"{c.provider_name} (kind {c.provider.config.kind})" for c in candidates)
        raise InvalidRequest(
            f"the upstreams of model '{chat.model}' cannot count tokens: {kinds}", "model"
        )
    candidate = counting[0]
    assert isinstance(candidate.provider, TokenCounter)
    tokens = await candidate.provider.count_tokens(chat, candidate.model)
    return web.Response(
        body=orjson.dumps({"input_tokens": tokens}), content_type="application/json"
    )


def _protocol_headers(request: web.Request) -> dict[str, str]:
    """The client's ``anthropic-beta``: an Anthropic upstream, which gets the body as
    sent, needs it for the fields it enables (Claude Code sends several)."""
    beta = request.headers.get("anthropic-beta")
    return {"anthropic-beta": beta} if beta else {}
