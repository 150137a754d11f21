"""Adapter for every upstream that speaks OpenAI's ``/chat/completions`` and ``/embeddings``.

OpenAI itself, vLLM, llama.cpp, LM Studio, Groq, OpenRouter and HF TGI all take the same
body and answer with the same JSON or SSE, so one adapter serves them. This module owns
the HTTP side (body, headers, timeouts, connection lifecycle, error mapping); reading the
wire format is ``openai_wire``'s.

Invariants:

- ``Chunk.raw`` is what an OpenAI client should receive: the upstream body unchanged for a
  non-streaming call; for a stream each SSE event as ``data: <json>\\n\\n`` (the JSON bytes
  as received) and ``data: [DONE]\\n\\n`` as the ``final`` chunk (synthesised when the
  upstream ends without it after every choice finished).
- A client that did not ask for usage never sees the usage-only frame parley asked for: it
  is marked ``internal``.
- A response goes back to the pool only when read to its end; on any other exit (error,
  cancellation, consumer stopping early) it is closed, so a half-read connection is never
  reused.
- Before the first chunk is yielded, failures are the retryable kinds of ``errors.py``:
  ``UpstreamConnectError`` (also for a connection dropped before any event), connect /
  first-byte ``UpstreamTimeout``, ``UpstreamHTTPError`` (an error object in a 200 answer
  included). After it: ``UpstreamInterrupted`` (reset, EOF before the end, an error object
  in the stream), ``UpstreamTimeout`` ("idle" / "total") or ``UpstreamProtocolError``.
- Timeouts: ``connect`` through aiohttp; ``first_byte`` covers a stream's response
  headers and first SSE event; ``idle`` each later read; ``total`` the whole attempt. A
  non-streaming answer's headers come only once it is all made, so only ``total`` bounds
  it, and that timeout is not retried (``UpstreamHTTP.total_deadline``).
- No error message carries request headers, the API key or an auth-like header value.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest
from parley.domain.usage import Usage
from parley.errors import UpstreamError, UpstreamProtocolError
from parley.providers import openai_wire as wire
from parley.providers.base import EmbeddingsResult
from parley.providers.http import UpstreamHTTP, finish
from parley.providers.sse import SSEDecoder
from parley.providers.wire import count, dumps, loads_object
from parley.settings import ProviderConfig

_FOREIGN_FIELDS = frozenset({"thinking"})


class OpenAIProvider:
    """The provider seam (``providers.base.Provider``) over one OpenAI-compatible base URL."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._chat_url = f"{config.base_url}/chat/completions"
        self._embeddings_url = f"{config.base_url}/embeddings"
        self._models_url = f"{config.base_url}/models"
        key = config.api_key.get() if config.api_key is not None else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = UpstreamHTTP(config, session, headers, (key,))

    @property
    def protocol(self) -> str:
        return wire.PROTOCOL

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        """Send ``request`` to upstream ``model``; see the module docstring for the contract."""
        return self._stream(request, model) if request.stream else self._complete(request, model)

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        """POST an OpenAI embeddings body (``model`` replaced); ``raw`` is the answer as is."""
        payload = dict(body)
        payload["model"] = model
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._embeddings_url,
            dumps(payload),
            deadline,
            phase,
            self._error_for,
            whole=True,
        )
        obj = loads_object(raw, "embeddings response")
        data = obj.get("data")
        if not isinstance(data, list):
            raise self._body_error(obj, "embeddings response has no data list")
        usage = obj.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        returned_model = obj.get("model")
        return EmbeddingsResult(
            raw=raw,
            protocol=wire.PROTOCOL,
            model=returned_model if isinstance(returned_model, str) else model,
            usage=Usage(
                prompt_tokens=count(usage.get("prompt_tokens")),
                total_tokens=count(usage.get("total_tokens")),
            ),
            count=len(data),
        )

    async def list_models(self) -> list[str]:
        """``GET /models``: the ids the upstream serves."""
        deadline, phase = self._http.first_deadline()
        _, raw = await self._http.open(
            self._models_url, None, deadline, phase, self._error_for, whole=True, method="GET"
        )
        data = loads_object(raw, "model list").get("data")
        if not isinstance(data, list):
            raise UpstreamProtocolError(f"upstream {self.config.name}: model list has no data")
        return [
            item["id"]
            for item in data
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ]

    # -- chat -------------------------------------------------------------------------

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        """The upstream JSON body for ``request`` (public for tests and dry runs)."""
        if request.raw is not None and request.client_protocol == wire.PROTOCOL:
            # The client spoke OpenAI: every field it sent goes through, known or not.
            body = dict(request.raw)
        else:
            # Fields of another protocol (Anthropic's ``thinking`` object) no OpenAI
            # server takes; ``top_k`` stays: vLLM and llama.cpp honour it.
            body = {k: v for k, v in request.extra.items() if k not in _FOREIGN_FIELDS}
            body["messages"] = [m.canonical() for m in request.messages]
            for key, value in (
                ("max_tokens", request.max_tokens),
                ("temperature", request.temperature),
                ("top_p", request.top_p),
                ("n", request.n),
                ("user", request.user),
                ("tool_choice", request.tool_choice),
            ):
                if value is not None:
                    body[key] = value
            if request.stop:
                body["stop"] = list(request.stop)
            if request.tools:
                body["tools"] = list(request.tools)
        body["model"] = model
        if request.stream:
            body["stream"] = True
            if self.config.stream_usage or request.include_usage:
                options = body.get("stream_options")
                body["stream_options"] = {
                    **(options if isinstance(options, Mapping) else {}),
                    "include_usage": True,
                }
        elif body.get("stream"):
            # The caller wants one body; stream_options without stream is a 400 upstream.
            body["stream"] = False
            body.pop("stream_options", None)
        return body

    async def _complete(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        data = dumps(self.chat_body(request, model))
        # A non-streaming upstream sends its headers only once the whole answer is made,
        # so only ``total`` bounds it; such a timeout is not retried (it would bill twice).
        deadline, phase = self._http.total_deadline()
        _, raw = await self._http.open(
            self._chat_url, data, deadline, phase, self._error_for, whole=True
        )
        obj = loads_object(raw, "response")
        if not isinstance(obj.get("choices"), list):
            raise self._body_error(obj, "response has no choices")
        try:
            events = wire.completion_events(obj, model)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError("upstream response has an unexpected shape") from exc
        yield Chunk(events=events, raw=raw, protocol=wire.PROTOCOL, final=True)

    async def _stream(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        body = self.chat_body(request, model)
        n = body.get("n")
        expected = n if type(n) is int and n > 1 else 1
        http = self._http
        total_at = http.now() + self.config.timeouts.total
        deadline, phase = http.first_deadline()
        resp, _ = await http.open(self._chat_url, dumps(body), deadline, phase, self._error_for)
        try:
            if resp.content_type == "application/json":
                # Some servers answer a stream request with a JSON body (often an error).
                raw = await http.read_all(resp, deadline, phase)
                obj = loads_object(raw, "response")
                raise self._body_error(obj, "upstream answered a stream request with JSON")
            frames = wire.StreamFrames(model, not request.include_usage, http.scrub)

            def parse(payload: bytes, yielded: bool, more: bool) -> Chunk:
                if payload != b"[DONE]":
                    return frames.chunk(payload, yielded, more=more)
                if not yielded:
                    raise UpstreamProtocolError(
                        f"upstream {self.config.name} ended the stream before any frame"
                    )
                return wire.DONE_CHUNK

            def at_end() -> Chunk | None:
                # Some servers end without [DONE]: once every choice finished, the answer
                # is whole and the client still gets its terminator.
                return wire.DONE_CHUNK if len(frames.finished) >= expected else None

            # Closed with this generator (a client leaving closes it early).
            async with contextlib.aclosing(
                http.frames(
                    resp,
                    SSEDecoder(),
                    parse,
                    (deadline, phase),
                    total_at,
                    "the stream ended before it was finished",
                    at_end,
                )
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            finish(resp)

    def _error_for(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        return wire.http_error(status, body, headers, self._http.scrub)

    def _body_error(self, obj: dict[str, Any], otherwise: str) -> UpstreamError:
        if obj.get("error"):
            return wire.error_object(obj["error"], False, self._http.scrub)
        return UpstreamProtocolError(f"upstream {self.config.name}: {otherwise}")
