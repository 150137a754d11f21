"""What a model can take (images, tools, JSON mode, how much context), and what a request
needs of it.

``None`` means unknown: parley refuses a request only for a capability a model is known
to lack, never for one nobody configured. The prompt size check uses a lower bound of the
token count (UTF-8 bytes / 6: tokens average about four bytes of English and fewer of
code, so real counts are higher), so it refuses only prompts that certainly do not fit.

``openai_only`` names what no translating adapter can honour whatever the model: the
OpenAI fields whose effect only an upstream speaking OpenAI's protocol gives through
parley. The adapters of other protocols refuse them before any call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from parley.domain.messages import ChatRequest
from parley.errors import ConfigError

# The bytes-per-token bound of the prompt size check (see the module docstring).
BYTES_PER_TOKEN_BOUND = 6


@dataclass(frozen=True, slots=True)
class Capabilities:
    vision: bool | None = None
    tools: bool | None = None
    json_mode: bool | None = None
    context_window: int | None = None

    def over(self, base: Capabilities) -> Capabilities:
        """These capabilities, with ``base``'s values where these are unknown."""
        known = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{name: value for name, value in known.items() if value is not None})

    def known(self) -> dict[str, Any]:
        """The fields somebody configured, by name."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True, slots=True)
class Needs:
    """What one request needs of the model that answers it."""

    vision: bool
    tools: bool
    json_mode: bool
    # A lower bound of prompt tokens plus the completion budget the client asked for.
    min_tokens: int

    def unmet(self, capabilities: Capabilities) -> list[str]:
        """Why ``capabilities`` cannot serve this request (empty: they can)."""
        reasons = []
        if self.vision and capabilities.vision is False:
            reasons.append("does not accept images")
        if self.tools and capabilities.tools is False:
            reasons.append("does not support tools")
        if self.json_mode and capabilities.json_mode is False:
            reasons.append("does not support JSON mode (response_format)")
        window = capabilities.context_window
        if window is not None and self.min_tokens > window:
            reasons.append(
                f"has a context window of {window} tokens and this request needs at least "
                f"{self.min_tokens} (prompt plus max_tokens)"
            )
        return reasons


def needs_of(request: ChatRequest) -> Needs:
    vision = False
    size = 0
    for message in request.messages:
        content = message.content
        if isinstance(content, str):
            size += len(content.encode())
        elif content is not None:
            for part in content:
                kind = part.get("type")
                if kind == "image_url" or kind == "image":
                    vision = True
                elif kind == "text":
                    size += len(str(part.get("text", "")).encode())
        for call in message.tool_calls:
            size += len(call.arguments.encode())
    response_format = request.extra.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )
    return Needs(
        vision=vision,
        tools=bool(request.tools),
        json_mode=json_mode,
        min_tokens=size // BYTES_PER_TOKEN_BOUND + (request.max_tokens or 0),
    )


# Why ``openai_only`` refuses a field: parley's neutral events have no place for token log
# probabilities, and no other protocol takes a token bias.
_NO_LOGPROBS = "parley relays token log probabilities only from upstreams that speak OpenAI's API"
_NO_BIAS = "only upstreams that speak OpenAI's API take a token bias"


def openai_only(extra: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, why) for the first of a request's unmodelled OpenAI fields (``extra``) that
    asks for an effect only an OpenAI-protocol upstream gives through parley, else None.

    A value that asks for nothing is no reason to refuse: ``logprobs`` false or null,
    ``top_logprobs`` 0 or null, an empty or null ``logit_bias``.
    """
    if extra.get("logprobs") not in (None, False):
        return "logprobs", _NO_LOGPROBS
    if extra.get("top_logprobs") not in (None, 0):
        return "top_logprobs", _NO_LOGPROBS
    if extra.get("logit_bias"):
        return "logit_bias", _NO_BIAS
    return None


_FIELDS: dict[str, type] = {
    "vision": bool,
    "tools": bool,
    "json_mode": bool,
    "context_window": int,
}


def capabilities_from(table: Mapping[str, Any], where: str) -> dict[str, Capabilities]:
    """Parse ``{model: {vision = true, ...}}``; ``ConfigError`` names a bad entry."""
    out: dict[str, Capabilities] = {}
    for model, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}.{model}: must be a table")
        unknown = set(entry) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"{where}.{model}: unknown field(s) {', '.join(sorted(unknown))}")
        for name, value in entry.items():
            kind = _FIELDS[name]
            if type(value) is not kind or (type(value) is int and value <= 0):
                raise ConfigError(f"{where}.{model}.{name}: must be a {kind.__name__}")
        out[str(model)] = Capabilities(**entry)
    return out
