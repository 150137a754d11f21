"""Provider-neutral chat messages and requests.

A ``ChatRequest`` is what every adapter receives. When the client spoke a protocol an
adapter also speaks, ``raw`` keeps the client's original body so that the adapter can pass
every field through untouched (fields parley does not model still reach the upstream).
Messages hash canonically: the same message always gives the same ``content_hash``,
whichever client sent it and however its JSON keys were ordered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    type: str = "function"


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``content`` is a string or a list of OpenAI-style content parts."""

    role: str
    content: str | tuple[Mapping[str, Any], ...] | None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def text(self) -> str:
        """The plain text of the message (text parts joined), for storage and search."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(
            str(part.get("text", "")) for part in self.content if part.get("type") == "text"
        )

    def canonical(self) -> dict[str, Any]:
        """The message as a plain dict in OpenAI wire shape (stable for hashing and storage)."""
        out: dict[str, Any] = {"role": self.role}
        out["content"] = list(self.content) if isinstance(self.content, tuple) else self.content
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def canonical_json(self) -> bytes:
        """What ``content_hash`` hashes: ``canonical()`` as JSON with sorted keys, tool-call
        arguments made compact (an Anthropic client sends them back as an object, so
        their spacing must not change the hash). Without tool calls it is also the
        message's stored payload."""
        canonical = self.canonical()
        if self.tool_calls:
            for call in canonical["tool_calls"]:
                call["function"]["arguments"] = _compact(call["function"]["arguments"])
        return orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)

    def content_hash(self) -> str:
        return content_hash_of(self.canonical_json())


def arguments_object(arguments: str) -> dict[str, Any] | None:
    """Tool-call arguments (a JSON string, OpenAI's form) as the object other protocols
    want: ``{}`` when empty, None when they are not a JSON object."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _compact(arguments: str) -> str:
    """Tool-call arguments as compact JSON; invalid JSON is kept as is."""
    try:
        return orjson.dumps(orjson.loads(arguments)).decode()
    except orjson.JSONDecodeError:
        return arguments


def content_hash_of(canonical_json: bytes) -> str:
    """The content hash of a message, from its ``canonical_json()``."""
    return hashlib.sha256(canonical_json).hexdigest()


def chain_hash(parent_chain: str | None, content_hash: str) -> str:
    """Hash of a message together with everything before it in its thread."""
    return hashlib.sha256(f"{parent_chain or ''}:{content_hash}".encode()).hexdigest()


def chain_of(content_hashes: Sequence[str]) -> list[str]:
    """The chain hash of every message of a thread, from their content hashes."""
    out: list[str] = []
    parent: str | None = None
    for content_hash in content_hashes:
        parent = chain_hash(parent, content_hash)
        out.append(parent)
    return out


def chain_hashes(messages: Sequence[Message]) -> list[str]:
    return chain_of([message.content_hash() for message in messages])


@dataclass(slots=True)
class ChatRequest:
    """A chat completion request, whatever protocol it arrived in."""

    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: tuple[str, ...] = ()
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: Any = None
    # The client asked for a usage chunk at the end of the stream.
    include_usage: bool = False
    # Every other field the client sent, for adapters that can pass it on.
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The client's original body, when it spoke ``client_protocol``.
    raw: Mapping[str, Any] | None = None
    client_protocol: str = "openai"
    # Headers of ``client_protocol`` that change what its body means (Anthropic's
    # ``anthropic-beta``), for an adapter of that protocol to send on with ``raw``.
    client_headers: Mapping[str, str] = field(default_factory=dict)
    user: str | None = None
