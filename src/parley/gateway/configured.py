"""A provider configured in the database: an adapter plus the defaults its requests get.

``ConfiguredProvider`` wraps any adapter and, before each chat call, fills in what the
configuration sets and the request does not (``with_defaults``): the system prompt is
prepended when the request has no system (or developer) message; temperature, max_tokens,
top_p, the penalties and the ``extra`` parameters apply when the request leaves them
unset (absent or null). The request the client sent is never changed, so its record (the
messages, the sampling it asked for) stays what the client sent: the chain hashes of a
client re-sending its history still match.

When the client's protocol is the adapter's, the adapter passes the client's body
(``ChatRequest.raw``) through, so the defaults are written into that body too, under the
names of that protocol (Anthropic's ``system`` field; no penalties, which Anthropic does
not take).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from parley.domain.events import Chunk
from parley.domain.messages import ChatRequest, Message
from parley.providers.base import EmbeddingsResult, Provider, TokenCounter
from parley.settings import ProviderConfig

_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a configuration sets for the requests that do not."""

    model: str
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return (
            not self.system_prompt
            and self.temperature is None
            and self.max_tokens is None
            and self.top_p is None
            and self.frequency_penalty is None
            and self.presence_penalty is None
            and not self.extra
        )


def with_defaults(request: ChatRequest, defaults: Defaults) -> ChatRequest:
    """``request`` with what ``defaults`` sets and it does not; ``request`` is unchanged."""
    if defaults.empty:
        return request
    messages = request.messages
    prompt = defaults.system_prompt
    add_system = bool(prompt) and not any(m.role in _SYSTEM_ROLES for m in messages)
    if add_system:
        messages = (Message(role="system", content=prompt), *messages)
    extra = dict(request.extra)
    for key, value in _extra_defaults(defaults).items():
        if extra.get(key) is None:
            extra[key] = value
    raw = request.raw
    if raw is not None:
        raw = _raw_with_defaults(raw, request.client_protocol, defaults, add_system)
    return replace(
        request,
        messages=messages,
        temperature=_first(request.temperature, defaults.temperature),
        max_tokens=_first(request.max_tokens, defaults.max_tokens),
        top_p=_first(request.top_p, defaults.top_p),
        extra=extra,
        raw=raw,
    )


def _first(value: Any, default: Any) -> Any:
    return value if value is not None else default


def _extra_defaults(defaults: Defaults) -> dict[str, Any]:
    out = dict(defaults.extra)
    if defaults.frequency_penalty is not None:
        out["frequency_penalty"] = defaults.frequency_penalty
    if defaults.presence_penalty is not None:
        out["presence_penalty"] = defaults.presence_penalty
    return out


def _raw_with_defaults(
    raw: Mapping[str, Any], protocol: str, defaults: Defaults, add_system: bool
) -> dict[str, Any]:
    body = dict(raw)

    def fill(key: str, value: Any) -> None:
        if value is not None and body.get(key) is None:
            body[key] = value

    if protocol == "anthropic":
        if add_system and not body.get("system"):
            body["system"] = defaults.system_prompt
        fill("max_tokens", defaults.max_tokens)
    else:
        if add_system:
            messages = body.get("messages")
            body["messages"] = [
                {"role": "system", "content": defaults.system_prompt},
                *(messages if isinstance(messages, list) else ()),
            ]
        if body.get("max_completion_tokens") is None:
            fill("max_tokens", defaults.max_tokens)
        fill("frequency_penalty", defaults.frequency_penalty)
        fill("presence_penalty", defaults.presence_penalty)
    fill("temperature", defaults.temperature)
    fill("top_p", defaults.top_p)
    for key, value in defaults.extra.items():
        fill(key, value)
    return body


class ConfiguredProvider:
    """The provider seam over ``inner``, with a configuration's defaults applied."""

    def __init__(self, inner: Provider, defaults: Defaults) -> None:
        self.inner = inner
        self.defaults = defaults
        self.config: ProviderConfig = inner.config

    @property
    def protocol(self) -> str:
        return self.inner.protocol

    def chat(self, request: ChatRequest, model: str) -> AsyncGenerator[Chunk, None]:
        return self.inner.chat(with_defaults(request, self.defaults), model)

    async def embeddings(self, body: Mapping[str, Any], model: str) -> EmbeddingsResult:
        return await self.inner.embeddings(body, model)

    async def list_models(self) -> list[str]:
        return await self.inner.list_models()


class ConfiguredCounter(ConfiguredProvider):
    """A configured provider whose adapter can count tokens (the system prompt counts)."""

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        assert isinstance(self.inner, TokenCounter)
        return await self.inner.count_tokens(with_defaults(request, self.defaults), model)


def configured(inner: Provider, defaults: Defaults) -> ConfiguredProvider:
    """``inner`` with ``defaults``; a token counter stays one."""
    if isinstance(inner, TokenCounter):
        return ConfiguredCounter(inner, defaults)
    return ConfiguredProvider(inner, defaults)
