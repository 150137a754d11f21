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
- Timeouts: ``connect`` through aiohttp; ``first_byte`` covers the response headers and
  the first SSE event (the whole body when not streaming); ``idle`` each later read;
  ``total`` the whole attempt.
- No error message carries request headers, the API key or an auth-like header value.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest
from parley.domain.usage import Usage
from parley.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from parley.providers import openai_wire as wire
from parley.providers.base import EmbeddingsResult
from parley.settings import ProviderConfig

# How long to wait, after [DONE], for the end of the HTTP response so that the connection
# can go back to the pool; a lingering upstream only costs the connection.
_DRAIN_GRACE = 1.0
_ERROR_BODY_LIMIT = 64 * 1024
_SECRET_HEADER_HINTS = ("auth", "key", "token", "secret")
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)


class OpenAIProvider:
    """The provider seam (``providers.base.Provider``) over one OpenAI-compatible base URL."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._session = session
        self._chat_url = f"{config.base_url}/chat/completions"
        self._embeddings_url = f"{config.base_url}/embeddings"
        key = config.api_key.get() if config.api_key is not None else ""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        headers.update(config.headers)
        self._headers = headers
        # An upstream may echo what it was sent (a wrong key, a custom auth header): those
        # values are scrubbed out of every message we raise.
        self._secrets = tuple(
            value
            for name, value in (("authorization", key), *config.headers.items())
            if len(value) >= 6 and any(hint in name.lower() for hint in _SECRET_HEADER_HINTS)
        )
        # ``total=None``: aiohttp's default 300 s total would cut long streams; first byte,
        # idle and total are enforced here, per phase.
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.timeouts.connect, sock_connect=config.timeouts.connect
        )

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
        deadline, phase = self._first_deadline()
        _, raw = await self._open(
            self._embeddings_url, wire.dumps(payload), deadline, phase, whole=True
        )
        obj = wire.loads_object(raw, "embeddings response")
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
                prompt_tokens=wire.count(usage.get("prompt_tokens")),
                total_tokens=wire.count(usage.get("total_tokens")),
            ),
            count=len(data),
        )

    # -- chat -------------------------------------------------------------------------

    def chat_body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        """The upstream JSON body for ``request`` (public for tests and dry runs)."""
        if request.raw is not None:
            # The client spoke OpenAI: every field it sent goes through, known or not.
            body = dict(request.raw)
        else:
            body = dict(request.extra)
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
        data = wire.dumps(self.chat_body(request, model))
        # A non-streaming upstream sends its headers only once the whole answer is made,
        # so only ``total`` bounds it; such a timeout is not retried (it would bill twice).
        deadline = asyncio.get_running_loop().time() + self.config.timeouts.total
        phase = "total"
        _, raw = await self._open(self._chat_url, data, deadline, phase, whole=True)
        obj = wire.loads_object(raw, "response")
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
        loop = asyncio.get_running_loop()
        idle = self.config.timeouts.idle
        total_at = loop.time() + self.config.timeouts.total
        deadline, phase = self._first_deadline()
        resp, _ = await self._open(self._chat_url, wire.dumps(body), deadline, phase)
        try:
            if resp.content_type == "application/json":
                # Some servers answer a stream request with a JSON body (often an error).
                raw = await self._read_all(resp, deadline, phase)
                obj = wire.loads_object(raw, "response")
                raise self._body_error(obj, "upstream answered a stream request with JSON")
            content = resp.content
            decoder = wire.SSEDecoder()
            frames = wire.StreamFrames(model, not request.include_usage, self._scrub)
            yielded = False
            while True:
                if yielded:
                    deadline = loop.time() + idle
                    deadline, phase = (
                        (deadline, "idle") if deadline < total_at else (total_at, "total")
                    )
                data = await self._read(content, deadline, phase, yielded)
                payloads = decoder.feed(data) if data else decoder.close()
                last = len(payloads) - 1
                for i, payload in enumerate(payloads):
                    if payload == b"[DONE]":
                        if not yielded:
                            raise UpstreamProtocolError(
                                f"upstream {self.config.name} ended the stream before any frame"
                            )
                        yield wire.DONE_CHUNK
                        await _drain(content)
                        return
                    chunk = frames.chunk(payload, yielded, more=i < last)
                    yielded = True
                    yield chunk
                if not data:
                    if len(frames.finished) >= expected:
                        # Some servers end without [DONE]; every choice finished, so the
                        # answer is whole and the client still gets its terminator.
                        yield wire.DONE_CHUNK
                        return
                    raise self._broken("the stream ended before it was finished", yielded)
        finally:
            _finish(resp)

    # -- HTTP -------------------------------------------------------------------------

    def _first_deadline(self) -> tuple[float, str]:
        timeouts = self.config.timeouts
        now = asyncio.get_running_loop().time()
        if timeouts.first_byte < timeouts.total:
            return now + timeouts.first_byte, "first_byte"
        return now + timeouts.total, "total"

    async def _open(
        self, url: str, data: bytes, deadline: float, phase: str, *, whole: bool = False
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """POST and wait for a 2xx answer's headers, and its body too when ``whole`` (the
        response is then finished); any other answer raises."""
        body = b""
        try:
            # One timer for headers and body: this is the per-request hot path.
            async with asyncio.timeout_at(deadline):
                resp = await self._session.post(
                    url,
                    data=data,
                    headers=self._headers,
                    timeout=self._client_timeout,
                    allow_redirects=False,
                )
                if whole and 200 <= resp.status < 300:
                    try:
                        body = await resp.read()
                    finally:
                        _finish(resp)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout("connect", self.config.timeouts.connect) from None
        except TimeoutError:
            raise self._timeout(phase) from None
        except aiohttp.ClientResponseError:
            # ``from None``: this exception's repr carries the request headers (the key).
            raise UpstreamProtocolError(
                f"upstream {self.config.name} sent a malformed HTTP response"
            ) from None
        except _TRANSPORT_ERRORS as exc:
            # Nothing reached the client yet, so this attempt may be retried.
            raise UpstreamConnectError(
                f"no answer from upstream {self.config.name}: {_describe(exc)}"
            ) from exc
        if 200 <= resp.status < 300:
            return resp, body
        try:
            error = await _error_body(resp, deadline)
        finally:
            _finish(resp)
        raise wire.http_error(resp.status, error, resp.headers, self._scrub)

    async def _read_all(
        self, resp: aiohttp.ClientResponse, deadline: float, phase: str
    ) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.read()
        except TimeoutError:
            raise self._timeout(phase) from None
        except _TRANSPORT_ERRORS as exc:
            raise self._broken(_describe(exc), yielded=False) from exc

    async def _read(
        self, content: aiohttp.StreamReader, deadline: float, phase: str, yielded: bool
    ) -> bytes:
        """The next bytes of the stream; b"" at its end."""
        try:
            # Bytes already buffered need no timer: the common case under load.
            data = content.read_nowait()
            if data or content.at_eof():
                return data
            async with asyncio.timeout_at(deadline):
                return await content.readany()
        except TimeoutError:
            raise self._timeout(phase) from None
        except _TRANSPORT_ERRORS as exc:
            raise self._broken(_describe(exc), yielded) from exc

    # -- errors -----------------------------------------------------------------------

    def _timeout(self, phase: str) -> UpstreamTimeout:
        seconds: float = getattr(self.config.timeouts, phase)
        return UpstreamTimeout(phase, seconds)

    def _broken(self, why: str, yielded: bool) -> UpstreamError:
        if yielded:
            return UpstreamInterrupted(f"upstream {self.config.name} stream broke: {why}")
        # Nothing reached the client yet, so this attempt may be retried like a connect error.
        return UpstreamConnectError(
            f"upstream {self.config.name} dropped the connection before answering: {why}"
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text

    def _body_error(self, obj: dict[str, Any], otherwise: str) -> UpstreamError:
        if obj.get("error"):
            return wire.error_object(obj["error"], False, self._scrub)
        return UpstreamProtocolError(f"upstream {self.config.name}: {otherwise}")


def _describe(exc: BaseException) -> str:
    # The class and OS reason only: aiohttp's own messages may name proxies and URLs.
    reason = getattr(exc, "strerror", None)
    return f"{type(exc).__name__} ({reason})" if reason else type(exc).__name__


def _finish(resp: aiohttp.ClientResponse) -> None:
    if resp.content.at_eof():
        resp.release()
    else:
        # Half-read: close rather than hand a dirty connection back to the pool.
        resp.close()


async def _error_body(resp: aiohttp.ClientResponse, deadline: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    # A slow or broken error body must not hide the status: keep whatever arrived.
    with contextlib.suppress(TimeoutError, *_TRANSPORT_ERRORS):
        async with asyncio.timeout_at(deadline):
            while size < _ERROR_BODY_LIMIT:
                part = await resp.content.read(_ERROR_BODY_LIMIT - size)
                if not part:
                    break
                parts.append(part)
                size += len(part)
    return b"".join(parts)


async def _drain(content: aiohttp.StreamReader) -> None:
    """Read past [DONE] to the end of the response so the connection can be reused."""
    if content.at_eof():
        return
    # The answer is already complete: an upstream that lingers or breaks after [DONE]
    # only costs the connection, which ``_finish`` then closes.
    with contextlib.suppress(TimeoutError, *_TRANSPORT_ERRORS):
        async with asyncio.timeout(_DRAIN_GRACE):
            while await content.readany():
                pass
