"""The content of a message the chat API receives: a string, or OpenAI content parts of
the kinds an upstream takes.

The chat API stores a message once and resends it on every later turn of its branch, so a
part an upstream would refuse is refused here (a 400 on ``content``), before anything is
stored, not on every turn after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parley.errors import InvalidRequest


def message_content(value: Any, *, empty_ok: bool = False) -> str | tuple[Mapping[str, Any], ...]:
    """The message's content; ``empty_ok`` (it carries files): missing or blank is ""."""
    if empty_ok and (value is None or (isinstance(value, str) and not value.strip())):
        return ""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequest("'content' must not be empty", "content")
        return value
    if isinstance(value, list) and value and all(_part_ok(p) for p in value):
        return tuple(value)
    raise InvalidRequest(
        "'content' must be a non-empty string or an array of OpenAI content parts "
        f"({', '.join(sorted(_PART_TYPES))}, each with its own object or text)",
        "content",
    )


# The user content parts OpenAI's chat completions take; each carries its payload under
# its own type's name (``{"type": "text", "text": ...}``).
_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file"})


def _part_ok(part: Any) -> bool:
    kind = part.get("type") if isinstance(part, dict) else None
    # A type that is not a string (a list, an object) is no part: not hashable either.
    if not isinstance(kind, str) or kind not in _PART_TYPES:
        return False
    value = part.get(kind)
    if kind == "text":
        return isinstance(value, str)
    if kind == "image_url":
        return isinstance(value, dict) and isinstance(value.get("url"), str)
    return isinstance(value, dict)
