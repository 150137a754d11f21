"""HTTP mechanics every adapter shares: one POST/GET, per-phase timeouts, connection
lifecycle and secret scrubbing, over the process's one pooled aiohttp session.

Invariants:

- A response goes back to the pool only when read to its end; on any other exit (error,
  cancellation, consumer stopping early) it is closed, so a half-read connection is never
  reused (``finish``).
- Before anything was yielded, failures are the retryable kinds of ``errors.py``:
  ``UpstreamConnectError`` (also for a connection dropped before any answer), connect /
  first-byte ``UpstreamTimeout``, and the adapter's ``UpstreamHTTPError`` for a non-2xx
  answer. After it: ``UpstreamInterrupted``, ``UpstreamTimeout`` ("idle" / "total").
- Timeouts: ``connect`` through aiohttp; the caller passes the deadline of the phase it is
  in (``first_byte``, ``idle`` or ``total``) to each read.
- No error message carries request headers, the API key or an auth-like header value:
  aiohttp exceptions are reduced to their class and OS reason, and every upstream text
  goes through ``scrub``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Protocol

import aiohttp

from parley.domain.events import Chunk
from parley.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamInterrupted,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from parley.settings import ProviderConfig

# How long to wait, after the end of an answer, for the end of the HTTP response so that
# the connection can go back to the pool; a lingering upstream only costs the connection.
DRAIN_GRACE = 1.0
ERROR_BODY_LIMIT = 64 * 1024
_SECRET_HEADER_HINTS = ("auth", "key", "token", "secret")
TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)

# Builds the error for a non-2xx answer from (status, body, headers); it must scrub.
ErrorFor = Callable[[int, bytes, Mapping[str, str]], UpstreamError]
# Turns one frame's payload into a chunk: (payload, yielded before, more in this read).
ParseFrame = Callable[[bytes, bool, bool], Chunk]


class FrameDecoder(Protocol):
    """Splits a streamed body into frames (SSE events, NDJSON lines) across reads."""

    def feed(self, data: bytes) -> list[bytes]: ...

    def close(self) -> list[bytes]: ...


class UpstreamHTTP:
    """One provider's HTTP side: its headers (auth included), timeouts and scrubber."""

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        headers: Mapping[str, str],
        secrets: tuple[str, ...] = (),
    ) -> None:
        """``headers`` are the adapter's own (auth, version); ``config.headers`` are added
        last. ``secrets`` are values to scrub besides the auth-like configured headers."""
        self.config = config
        self.session = session
        merged = {"Content-Type": "application/json", **headers, **config.headers}
        self.headers = merged
        # An upstream may echo what it was sent (a wrong key, a custom auth header): those
        # values are scrubbed out of every message we raise.
        candidates = (
            *secrets,
            *(
                value
                for name, value in merged.items()
                if any(hint in name.lower() for hint in _SECRET_HEADER_HINTS)
            ),
        )
        self.secrets = tuple(
            sorted({value for value in candidates if len(value) >= 6}, key=len, reverse=True)
        )
        # ``total=None``: aiohttp's default 300 s total would cut long streams; first byte,
        # idle and total are enforced here, per phase.
        self.client_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.timeouts.connect, sock_connect=config.timeouts.connect
        )

    @property
    def name(self) -> str:
        return self.config.name

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def first_deadline(self) -> tuple[float, str]:
        """The deadline and phase for the wait up to the first byte of the answer."""
        timeouts = self.config.timeouts
        now = self.now()
        if timeouts.first_byte < timeouts.total:
            return now + timeouts.first_byte, "first_byte"
        return now + timeouts.total, "total"

    def total_deadline(self) -> tuple[float, str]:
        """For an answer that comes whole (a non-streaming chat, embeddings): its headers
        come only once it is all made, so only ``total`` bounds it, and such a timeout is
        not retried (a retry would bill the same work twice)."""
        return self.now() + self.config.timeouts.total, "total"

    def next_deadline(self, total_at: float) -> tuple[float, str]:
        """The deadline of the next read of a stream that has started."""
        deadline = self.now() + self.config.timeouts.idle
        return (deadline, "idle") if deadline < total_at else (total_at, "total")

    async def open(
        self,
        url: str,
        data: bytes | None,
        deadline: float,
        phase: str,
        error_for: ErrorFor,
        *,
        whole: bool = False,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """Send and wait for a 2xx answer's headers, and its body too when ``whole`` (the
        response is then finished); any other answer raises ``error_for``'s error.
        ``headers`` are added to the provider's own, replacing any of the same name (the
        adapter merges what must be merged)."""
        body = b""
        try:
            # One timer for headers and body: this is the per-request hot path.
            async with asyncio.timeout_at(deadline):
                resp = await self.session.request(
                    method,
                    url,
                    data=data,
                    headers=self.headers if not headers else _with(self.headers, headers),
                    timeout=self.client_timeout,
                    allow_redirects=False,
                )
                if whole and 200 <= resp.status < 300:
                    try:
                        body = await resp.read()
                    finally:
                        finish(resp)
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout("connect", self.config.timeouts.connect) from None
        except TimeoutError:
            raise self.timeout(phase) from None
        except aiohttp.ClientResponseError:
            # ``from None``: this exception's repr carries the request headers (the key).
            raise UpstreamProtocolError(
                f"upstream {self.name} sent a malformed HTTP response"
            ) from None
        except TRANSPORT_ERRORS as exc:
            # Nothing reached the client yet, so this attempt may be retried.
            raise UpstreamConnectError(
                f"no answer from upstream {self.name}: {describe(exc)}"
            ) from exc
        if 200 <= resp.status < 300:
            return resp, body
        try:
            error = await error_body(resp, deadline)
        finally:
            finish(resp)
        raise error_for(resp.status, error, resp.headers)

    async def read_all(self, resp: aiohttp.ClientResponse, deadline: float, phase: str) -> bytes:
        """The rest of a response's body, before anything was yielded."""
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.read()
        except TimeoutError:
            raise self.timeout(phase) from None
        except TRANSPORT_ERRORS as exc:
            raise self.broken(describe(exc), yielded=False) from exc

    async def read(
        self, content: aiohttp.StreamReader, deadline: float, phase: str, yielded: bool
    ) -> bytes:
        """The next bytes of a streamed body; b"" at its end."""
        try:
            # Bytes already buffered need no timer: the common case under load.
            data = content.read_nowait()
            if data or content.at_eof():
                return data
            async with asyncio.timeout_at(deadline):
                return await content.readany()
        except TimeoutError:
            raise self.timeout(phase) from None
        except TRANSPORT_ERRORS as exc:
            raise self.broken(describe(exc), yielded) from exc

    async def frames(
        self,
        resp: aiohttp.ClientResponse,
        decoder: FrameDecoder,
        parse: ParseFrame,
        first: tuple[float, str],
        total_at: float,
        unfinished: str,
        at_end: Callable[[], Chunk | None] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """The chunks of a streamed answer whose last frame makes a ``final`` chunk: read
        with the first-byte deadline, then the idle one; after the final chunk the
        response is drained (its connection is reused). At an end before it, ``at_end``
        may give the final chunk (an answer known to be whole without its terminator);
        otherwise the end raises ``broken(unfinished)``. The caller finishes ``resp``."""
        content = resp.content
        deadline, phase = first
        yielded = False
        while True:
            if yielded:
                deadline, phase = self.next_deadline(total_at)
            data = await self.read(content, deadline, phase, yielded)
            payloads = decoder.feed(data) if data else decoder.close()
            last = len(payloads) - 1
            for i, payload in enumerate(payloads):
                chunk = parse(payload, yielded, i < last)
                yielded = True
                yield chunk
                if chunk.final:
                    await drain(content)
                    return
            if not data:
                closing = at_end() if at_end is not None else None
                if closing is None:
                    raise self.broken(unfinished, yielded)
                yield closing
                return

    def timeout(self, phase: str) -> UpstreamTimeout:
        seconds: float = getattr(self.config.timeouts, phase)
        return UpstreamTimeout(phase, seconds)

    def broken(self, why: str, yielded: bool) -> UpstreamError:
        """The error for a stream that broke: an interruption once something was yielded;
        before that a connect error, which may be retried."""
        if yielded:
            return UpstreamInterrupted(f"upstream {self.name} stream broke: {why}")
        return UpstreamConnectError(
            f"upstream {self.name} dropped the connection before answering: {why}"
        )

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "[redacted]")
        return text


def describe(exc: BaseException) -> str:
    # The class and OS reason only: aiohttp's own messages may name proxies and URLs.
    reason = getattr(exc, "strerror", None)
    return f"{type(exc).__name__} ({reason})" if reason else type(exc).__name__


def finish(resp: aiohttp.ClientResponse) -> None:
    """Release a response read to its end; close a half-read one (never reuse it)."""
    if resp.content.at_eof():
        resp.release()
    else:
        resp.close()


async def error_body(resp: aiohttp.ClientResponse, deadline: float) -> bytes:
    """Up to ``ERROR_BODY_LIMIT`` bytes of an error answer's body."""
    parts: list[bytes] = []
    size = 0
    # A slow or broken error body must not hide the status: keep whatever arrived.
    with contextlib.suppress(TimeoutError, *TRANSPORT_ERRORS):
        async with asyncio.timeout_at(deadline):
            while size < ERROR_BODY_LIMIT:
                part = await resp.content.read(ERROR_BODY_LIMIT - size)
                if not part:
                    break
                parts.append(part)
                size += len(part)
    return b"".join(parts)


async def drain(content: aiohttp.StreamReader) -> None:
    """Read past the end of an answer to the end of the response, so the connection can
    be reused; an upstream that lingers or breaks there only costs the connection."""
    if content.at_eof():
        return
    with contextlib.suppress(TimeoutError, *TRANSPORT_ERRORS):
        async with asyncio.timeout(DRAIN_GRACE):
            while await content.readany():
                pass


def _with(own: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``own`` with ``extra`` added, names compared without case."""
    replaced = {name.lower() for name in extra}
    return {**{k: v for k, v in own.items() if k.lower() not in replaced}, **extra}
