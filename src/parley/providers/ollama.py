"""Adapter for Ollama's native API: ``/api/chat`` (NDJSON streams), ``/api/embed`` and
``/api/tags``.

This module owns the HTTP side (URLs, headers, timeouts, connection lifecycle, error
mapping); translating requests and reading answers is ``ollama_wire``'s.

Invariants:

- ``config.base_url`` is the server's root, e.g. ``http://127.0.0.1:11434``. A trailing
  ``/`` and then a trailing ``/api`` or ``/v1`` are stripped (people paste the API root,
  or the OpenAI-compatible root they used before), so every spelling reaches
  ``<root>/api/chat``.
- Ollama needs no key; a configured one is sent as ``Authorization: Bearer`` for the
  reverse proxies that guard an Ollama server, and scrubbed from every error message.
- Chunks carry events only (``raw=None``, ``protocol=None``): no client speaks Ollama. A
  stream's ``final`` chunk is the one of its ``done: true`` line; a non-streaming answer
  is one ``final`` chunk.
- A response goes back to the pool only when read to its end; on any other exit (error,
  cancellation, consumer stopping early) it is closed, so a half-read connection is never
  reused.
- Before the first chunk is yielded, failures are the retryable kinds of ``errors.py``:
  ``UpstreamConnectError`` (also for a stream that ends before any line), connect /
  first-byte ``UpstreamTimeout``, ``UpstreamHTTPError`` (an ``{"error": ...}`` line or
  body in a 200 answer included, as a 500). After it: ``UpstreamInterrupted`` (reset, EOF
  before the ``done`` line, an error line), ``UpstreamTimeout`` ("idle" / "total") or
  ``UpstreamProtocolError`` (a line that is not a JSON object, one over 16 MiB).
- Timeouts: ``connect`` through aiohttp; ``first_byte`` covers the response headers and
  the first line (the whole body when not streaming is bounded by ``total`` only);
  ``idle`` each later read; ``total`` the whole attempt.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest
from parley.errors import UpstreamError, UpstreamProtocolError
from parley.providers import ollama_wire as wire
from parley.providers.base import EmbeddingsResult
from parley.providers.http import UpstreamHTTP, finish
from parley.providers.wire import dumps, loads_object
from parley.settings import ProviderConfig


def server_root(base_url: str) -> str:
    """The Ollama server's root URL from a configured base URL (see the module docstring)."""
    root = base_url.rstrip("/")
    for suffix in ("/api", "/v1"):
        if root.endswith(suffix):
            return root.removesuffix(suffix)
    return root


class OllamaProvider:
    """The provider seam (``providers.base.Provider``) over one Ollama server."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        root = server_root(config.base_url)
        self._chat_url = f"{root}/api/chat"
        self._embed_url = f"{root}/api/embed"
        self._tags_url = f"{root}/api/tags"
        key = config.api_key.get() if config.api_key is not None else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = UpstreamHTTP(config, session, headers, (key,))

    @property
    def protocol(self) -> str:
        return wire.PROTOCOL

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        """Send ``request`` to upstream ``model``; see the module docstring for the contract."""
        return self._stream(request, model) if request.stream else self._complete(request, model)

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        """The upstream JSON body for ``request`` (public for tests and dry runs)."""
        return wire.chat_body(request, model)

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        """``POST /api/embed``; ``raw`` is the OpenAI embeddings JSON built from its answer."""
        payload = wire.embed_body(body, model)
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._embed_url, dumps(payload), deadline, phase, self._error_for, whole=True
        )
        obj = loads_object(raw, "embeddings response")
        if obj.get("error"):
            raise wire.error_object(obj["error"], False, self._http.scrub)
        openai_raw, returned, usage, vectors = wire.embeddings_response(
            obj, model, body.get("encoding_format")
        )
        return EmbeddingsResult(
            raw=openai_raw, protocol="openai", model=returned, usage=usage, count=vectors
        )

    async def list_models(self) -> list[str]:
        """``GET /api/tags``: the names of the models the server has pulled."""
        deadline, phase = self._http.first_deadline()
        _, raw = await self._http.open(
            self._tags_url, None, deadline, phase, self._error_for, whole=True, method="GET"
        )
        return wire.model_names(loads_object(raw, "model list"))

    # -- chat -------------------------------------------------------------------------

    async def _complete(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(wire.chat_body(request, model))
        # A non-streaming answer's headers come only once it is all made, so only ``total``
        # bounds it; such a timeout is not retried (it would run the model twice).
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._chat_url, data, deadline, phase, self._error_for, whole=True
        )
        obj = loads_object(raw, "response")
        chunk = wire.Answer(model, self._http.scrub).chunk(obj, yielded=False)
        if not chunk.final:
            raise UpstreamProtocolError(
                f"upstream {self.config.name} answered without its done marker"
            )
        yield chunk

    async def _stream(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(wire.chat_body(request, model))
        http = self._http
        total_at = http.now() + self.config.timeouts.total
        deadline, phase = http.first_deadline()
        resp, _ = await http.open(self._chat_url, data, deadline, phase, self._error_for)
        try:
            # Read as NDJSON whatever the content type: a proxy or an old server may label
            # the stream application/json, and one JSON object is one line either way.
            answer = wire.Answer(model, http.scrub)
            # Closed with this generator (a client leaving closes it early).
            async with contextlib.aclosing(
                http.frames(
                    resp,
                    wire.NDJSONDecoder(),
                    lambda line, yielded, more: answer.line(line, yielded, more=more),
                    (deadline, phase),
                    total_at,
                    "the stream ended before its done line",
                )
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            finish(resp)

    def _error_for(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return wire.http_error(status, body, headers, self._http.scrub)
