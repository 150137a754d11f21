"""Conversation trees as exported and imported: pure values shared by the store and chat.

A ``ConversationTree`` is one conversation with every message of every branch. Its
messages are listed parents first: a message's ``parent`` is the ``key`` of a message
earlier in the list, or None for a root (a conversation may have several roots: editing
the first message starts a new one). ``key`` is a message's identity inside one tree
(its public id on export, a node id in a ChatGPT export); it never becomes a stored id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from parley.domain.messages import ROLES, Message, ToolCall
from parley.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class TreeMessage:
    key: str
    parent: str | None
    message: Message
    created_at: datetime
    # The model that wrote an assistant message, when known.
    model: str | None = None
    finish_reason: str | None = None
    # A reasoning model's thoughts: kept, never part of the message's hash.
    reasoning: str | None = None
    # Why an answer was given without its conversation's documents (``responses.notice``).
    notice: str | None = None


@dataclass(frozen=True, slots=True)
class ConversationTree:
    key: str | None
    title: str | None
    created_at: datetime
    updated_at: datetime
    messages: tuple[TreeMessage, ...]
    source: str = "import"
    default_model: str | None = None
    system_prompt: str | None = None
    archived: bool = False
    pinned: bool = False
    # The last message of the branch the chat continues; None: the newest message.
    active_leaf: str | None = None

    def active_branch(self) -> list[TreeMessage]:
        """The messages from a root down to the active leaf (or the newest message)."""
        if not self.messages:
            return []
        by_key = {m.key: m for m in self.messages}
        leaf = by_key.get(self.active_leaf or "") or self.messages[-1]
        branch: list[TreeMessage] = []
        node: TreeMessage | None = leaf
        while node is not None:
            branch.append(node)
            node = by_key.get(node.parent) if node.parent is not None else None
        branch.reverse()
        return branch


def message_from_wire(raw: Any, where: str) -> tuple[Message, str | None]:
    """An OpenAI-shaped message dict as a ``Message`` and its ``reasoning_content``.

    ``where`` names the message in errors (``conversations[0].messages[3].message``).
    Keys parley does not model are dropped.
    """
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object")
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(sorted(ROLES))}")
    content = raw.get("content")
    parts: str | tuple[Mapping[str, Any], ...] | None
    if content is None or isinstance(content, str):
        parts = content
    elif isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
    ):
        parts = tuple(content)
    else:
        raise InvalidRequest(f"{where}.content must be a string, an array of parts or null")
    name = _optional_str(raw, "name", where)
    tool_call_id = _optional_str(raw, "tool_call_id", where)
    reasoning = _optional_str(raw, "reasoning_content", where)
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be an array")
    tool_calls = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"{where}.tool_calls entries need function.name")
        arguments = function.get("arguments", "")
        tool_calls.append(
            ToolCall(
                id=str(call.get("id", "")),
                name=function["name"],
                arguments=arguments
                if isinstance(arguments, str)
                else orjson.dumps(arguments).decode(),
                type=str(call.get("type", "function")),
            )
        )
    message = Message(role, parts, name, tuple(tool_calls), tool_call_id)
    return message, reasoning


def _optional_str(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} must be a string")
    return value
