"""Adapter for Anthropic's Messages API (``/v1/messages``), and the upstreams that copy it.

This module owns the HTTP side (URLs, headers, timeouts, connection lifecycle, error
mapping); translating requests and reading answers is ``anthropic_wire``'s.

URLs: ``base_url`` is the API root, e.g. ``https://api.anthropic.com``; the adapter appends
``/v1/messages``, ``/v1/messages/count_tokens`` and ``/v1/models``. A ``base_url`` that
already ends in ``/v1`` gets ``/messages`` (and so on) only, so both spellings work.

Headers: ``x-api-key`` (when a key is configured) and ``anthropic-version: 2023-06-01``;
``config.headers`` may replace either (names compared without case) or add others, e.g.
``anthropic-beta``. An Anthropic client's own ``anthropic-beta`` features are sent on
with its body, together with the configured ones (the body may use fields only they
enable); a client of another protocol has none.

Invariants:

- ``Chunk.raw`` is what an Anthropic client should receive: the upstream body unchanged
  for a non-streaming call; for a stream each SSE event as ``event: <type>\\ndata:
  <json>\\n\\n`` (the JSON bytes as received), ``message_stop`` being the ``final`` chunk.
- A client that spoke Anthropic (``client_protocol == "anthropic"`` with ``raw``) has its
  body passed through with only ``model`` and ``stream`` set, so no field is lost.
- ``max_tokens`` is required upstream: when the client set none (nor OpenAI's
  ``max_completion_tokens``) it is ``anthropic_wire.DEFAULT_MAX_TOKENS`` (4096).
- A request Anthropic cannot take (image forms, content parts, arguments that are not a
  JSON object) raises ``InvalidRequest`` before any HTTP call; so does ``embeddings``.
- A response goes back to the pool only when read to its end; on any other exit it is
  closed, so a half-read connection is never reused.
- Before the first chunk is yielded, failures are the retryable kinds of ``errors.py``:
  ``UpstreamConnectError``, connect / first-byte ``UpstreamTimeout``, ``UpstreamHTTPError``
  (an ``error`` event before any other is the HTTP error its type stands for, e.g. a
  retryable 529 for ``overloaded_error``). After it: ``UpstreamInterrupted`` (reset, an
  ``error`` event, EOF before ``message_stop``), ``UpstreamTimeout`` ("idle" / "total")
  or ``UpstreamProtocolError``.
- Timeouts: ``connect`` through aiohttp; ``first_byte`` covers the response headers and
  the first SSE event (the whole body when not streaming is bounded by ``total``);
  ``idle`` each later read; ``total`` the whole attempt.
- No error message carries request headers, the API key or an auth-like header value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest
from parley.errors import Unsupported, UpstreamError, UpstreamProtocolError
from parley.providers import anthropic_wire as wire
from parley.providers.base import EmbeddingsResult
from parley.providers.http import UpstreamHTTP, finish
from parley.providers.sse import SSEDecoder
from parley.providers.wire import dumps, loads_object
from parley.settings import ProviderConfig

# list_models follows ``has_more`` for at most this many pages of this many models.
BETA_HEADER = "anthropic-beta"
MODEL_PAGES = 5
MODEL_PAGE_SIZE = 1000


class AnthropicProvider:
    """The provider seam (``providers.base.Provider``) over one Anthropic Messages API."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        root = config.base_url.rstrip("/")
        if not root.endswith("/v1"):
            root += "/v1"
        self._chat_url = f"{root}/messages"
        self._count_url = f"{root}/messages/count_tokens"
        self._models_url = f"{root}/models"
        key = config.api_key.get() if config.api_key is not None else ""
        headers = {"anthropic-version": wire.API_VERSION}
        if key:
            headers["x-api-key"] = key
        configured = {name.lower() for name in config.headers}
        headers = {k: v for k, v in headers.items() if k not in configured}
        self._http = UpstreamHTTP(config, session, headers, (key,))
        self._betas = _betas(
            next((v for k, v in config.headers.items() if k.lower() == BETA_HEADER), "")
        )

    @property
    def protocol(self) -> str:
        return wire.PROTOCOL

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        """Send ``request`` to upstream ``model``; see the module docstring for the contract."""
        return self._stream(request, model) if request.stream else self._complete(request, model)

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        raise Unsupported(f"provider {self.config.name} (anthropic) has no embeddings API")

    async def list_models(self) -> list[str]:
        """``GET /v1/models``, following ``has_more`` / ``last_id`` for a few pages."""
        ids: list[str] = []
        after: str | None = None
        for _ in range(MODEL_PAGES):
            url = f"{self._models_url}?limit={MODEL_PAGE_SIZE}"
            if after is not None:
                url += f"&after_id={quote(after, safe='')}"
            deadline, phase = self._http.first_deadline()
            _, raw = await self._http.open(
                url, None, deadline, phase, self._error_for, whole=True, method="GET"
            )
            page = loads_object(raw, "model list")
            data = page.get("data")
            if not isinstance(data, list):
                raise UpstreamProtocolError(f"upstream {self.config.name}: model list has no data")
            ids += [
                item["id"]
                for item in data
                if isinstance(item, dict) and isinstance(item.get("id"), str)
            ]
            last = page.get("last_id")
            if page.get("has_more") is not True or not isinstance(last, str) or not last:
                break
            after = last
        return ids

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        """``POST /v1/messages/count_tokens``: the input tokens ``request`` would use."""
        body = self.chat_body(request, model)
        payload = {key: body[key] for key in wire.COUNT_FIELDS if key in body}
        deadline, phase = self._http.first_deadline()
        _, raw = await self._http.open(
            self._count_url,
            dumps(payload),
            deadline,
            phase,
            self._error_for,
            whole=True,
            headers=self._client_headers(request),
        )
        tokens = loads_object(raw, "token count").get("input_tokens")
        if type(tokens) is not int:
            raise UpstreamProtocolError(f"upstream {self.config.name}: token count has no count")
        return tokens

    # -- chat -------------------------------------------------------------------------

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        """The upstream JSON body for ``request`` (public for tests and dry runs)."""
        if request.raw is not None and request.client_protocol == wire.PROTOCOL:
            body = dict(request.raw)
            body["model"] = model
        else:
            body = wire.messages_body(request, model)
        if request.stream:
            body["stream"] = True
        else:
            body.pop("stream", None)
        return body

    async def _complete(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(self.chat_body(request, model))
        created = int(time.time())
        # The headers of a non-streaming answer come once it is all made, so only
        # ``total`` bounds it; such a timeout is not retried (it would bill twice).
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._chat_url,
            data,
            deadline,
            phase,
            self._error_for,
            whole=True,
            headers=self._client_headers(request),
        )
        obj = loads_object(raw, "response")
        if not isinstance(obj.get("content"), list):
            raise self._body_error(obj, "response has no content")
        try:
            events = wire.message_events(obj, model, created)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError("upstream response has an unexpected shape") from exc
        yield Chunk(events=events, raw=raw, protocol=wire.PROTOCOL, final=True)

    async def _stream(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(self.chat_body(request, model))
        http = self._http
        total_at = http.now() + self.config.timeouts.total
        deadline, phase = http.first_deadline()
        resp, _ = await http.open(
            self._chat_url,
            data,
            deadline,
            phase,
            self._error_for,
            headers=self._client_headers(request),
        )
        try:
            if resp.content_type == "application/json":
                # An upstream may answer a stream request with a JSON body (often an error).
                raw = await http.read_all(resp, deadline, phase)
                obj = loads_object(raw, "response")
                raise self._body_error(obj, "upstream answered a stream request with JSON")
            frames = wire.StreamFrames(model, int(time.time()), http.scrub)
            # Closed with this generator (a client leaving closes it early).
            async with contextlib.aclosing(
                http.frames(
                    resp,
                    SSEDecoder(),
                    lambda payload, yielded, more: frames.chunk(payload, yielded, more=more),
                    (deadline, phase),
                    total_at,
                    "the stream ended before message_stop",
                )
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            finish(resp)

    def _client_headers(self, request: ChatRequest) -> dict[str, str] | None:
        """The client's ``anthropic-beta`` features, with the configured ones: the body
        passed on as sent may use fields only they enable."""
        if request.client_protocol != wire.PROTOCOL:
            return None
        client = _betas(request.client_headers.get(BETA_HEADER, ""))
        if not client:
            return None
        return {BETA_HEADER: ",".join(dict.fromkeys((*client, *self._betas)))}

    def _error_for(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return wire.http_error(status, body, headers, self._http.scrub)

    def _body_error(self, obj: dict[str, Any], otherwise: str) -> UpstreamError:
        if obj.get("type") == "error" or obj.get("error"):
            return wire.error_object(obj.get("error"), False, self._http.scrub)
        return UpstreamProtocolError(f"upstream {self.config.name}: {otherwise}")


def _betas(value: str) -> tuple[str, ...]:
    """The features of an ``anthropic-beta`` value (comma-separated)."""
    return tuple(part.strip() for part in value.split(",") if part.strip())
