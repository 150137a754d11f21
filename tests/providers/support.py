"""Helpers every adapter test uses: run a provider's stream, pick its events, expect an
upstream error, and a URL nothing listens on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from parley.domain.events import Chunk, TextDelta
from parley.errors import UpstreamError
from tests.harness import free_port


async def collect(chunks: AsyncIterator[Chunk], into: list[Chunk] | None = None) -> list[Chunk]:
    """Every chunk of a stream; ``into`` keeps the ones before an error."""
    out = [] if into is None else into
    async for chunk in chunks:
        out.append(chunk)
    return out


def events(chunks: list[Chunk], kind: type) -> list[Any]:
    return [e for c in chunks for e in c.events if isinstance(e, kind)]


def text(chunks: list[Chunk]) -> str:
    return "".join(e.text for e in events(chunks, TextDelta))


def closed_port_url(path: str = "") -> str:
    return f"http://127.0.0.1:{free_port()}{path}"


async def error_of(awaitable: Any) -> BaseException:
    try:
        await awaitable
    except UpstreamError as error:
        return error
    raise AssertionError("expected an upstream error")
