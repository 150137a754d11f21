"""The conversation fields a client sets, checked one way at every door.

Creating a conversation (``POST /api/conversations``), changing one (``PATCH``) and
importing one (``chat.transfer``: ``POST /api/import``, ``parley import``) store the same
columns, so each field has one check here: what one door refuses, the others refuse with
the same message and ``param``. ``param`` is the field's name in a request body, or its
place in an imported document (``conversations[2].title``). Pure: no I/O. Whether the
router knows a model is ``ChatService.check_model``, asked where a model is about to be
used (create, PATCH, send), not on import: an export may name models this server lacks.

Text the chat API stores may not hold a NUL character: PostgreSQL refuses it, so it is a
400 on both databases alike rather than a 500 on one (``/v1`` instead stores exchanges
with U+FFFD in its place).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from parley.errors import InvalidRequest, refuse_unknown

MAX_TITLE = 500
# The width of the columns that hold a model id (conversations.default_model and the
# request log's models): a longer id cannot be stored, nor routed.
MAX_MODEL = 255
NUL_REFUSED = "text may not contain the NUL character (U+0000)"


def holds_nul(value: Any) -> bool:
    """Whether a string in ``value`` (a key or a value, at any depth) holds a NUL."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or holds_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(holds_nul(item) for item in value)
    return False


def known_fields(data: Mapping[str, Any], allowed: Collection[str], where: str = "") -> None:
    """Refuse any key of ``data`` outside ``allowed``: a typo never passes silently."""
    refuse_unknown(data, allowed, where)


def text(value: Any, param: str, *, required: bool = False, empty_ok: bool = False) -> str | None:
    """A string field; None when absent or null (refused when ``required``), blank only
    when ``empty_ok``."""
    if value is None:
        if required:
            raise InvalidRequest(f"'{param}' is required", param)
        return None
    if not isinstance(value, str):
        kind = "a string" if empty_ok else "a non-empty string"
        raise InvalidRequest(f"'{param}' must be {kind}", param)
    if not empty_ok and not value.strip():
        raise InvalidRequest(f"'{param}' must be a non-empty string", param)
    return value


def title(value: Any, param: str = "title") -> str | None:
    """A title as a sidebar shows it: single spaces, at most ``MAX_TITLE`` characters;
    None when null or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a string or null", param)
    value = " ".join(value.split())
    if len(value) > MAX_TITLE:
        raise InvalidRequest(f"'{param}' is longer than {MAX_TITLE} characters", param)
    return value or None


def model_id(value: Any, param: str, *, required: bool = False) -> str | None:
    """A model id (``provider/model``, an alias or a configuration's name) as text: a
    non-empty string of at most ``MAX_MODEL`` characters."""
    model = text(value, param, required=required)
    if model is not None and len(model) > MAX_MODEL:
        raise InvalidRequest(f"'{param}' is longer than {MAX_MODEL} characters", param)
    return model


def flag(value: Any, param: str) -> bool:
    """A JSON boolean: 0, 1, "true" or null are refused, never read as one."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{param}' must be true or false", param)
    return value
