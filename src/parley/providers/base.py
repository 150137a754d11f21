"""The provider seam: a provider-neutral request in, provider-neutral chunks out.

Every adapter implements ``Provider``. ``chat()`` is an async generator of ``Chunk``s:

- it raises a typed ``UpstreamError`` (connect error, timeout, HTTP error status) before
  yielding anything when the attempt fails; the gateway may then retry or fall back;
- once it has yielded, a failure raises ``UpstreamInterrupted`` / ``UpstreamTimeout``
  (idle) / ``UpstreamProtocolError``; the gateway no longer retries;
- non-streaming requests yield exactly one chunk (``final=True``) holding the whole body;
- streaming requests yield one chunk per upstream frame and end with a ``final`` chunk;
- an adapter enforces ``ProviderConfig.timeouts`` itself: connect, first byte, and the
  silence between chunks.

Adapters never log request bodies or keys, and error messages they raise carry only the
upstream's error message (never headers).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest
from parley.domain.usage import Usage
from parley.settings import ProviderConfig


@dataclass(frozen=True, slots=True)
class EmbeddingsResult:
    raw: bytes
    protocol: str
    model: str
    usage: Usage
    count: int


class Provider(Protocol):
    config: ProviderConfig

    @property
    def protocol(self) -> str:
        """The client protocol this upstream speaks natively (``raw`` bytes are in it)."""
        ...

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        """Send ``request`` to ``model`` upstream; yield chunks as described above."""
        ...

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        """Create embeddings for an OpenAI-shaped embeddings body; ``raw`` is always an
        OpenAI embeddings response (adapters of other families build it)."""
        ...

    async def list_models(self) -> list[str]:
        """The model names the upstream itself lists; raises ``UpstreamError`` when it
        cannot answer (the caller keeps the configured list)."""
        ...


@runtime_checkable
class TokenCounter(Protocol):
    """A provider whose upstream can count the input tokens of a request without running it
    (Anthropic's ``/v1/messages/count_tokens`` and the like)."""

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        """The number of input tokens ``request`` would use on ``model``."""
        ...
