"""Parsing and validating OpenAI wire requests into provider-neutral values.

Validation is strict about what parley itself relies on (model, messages, roles, the types
of sampling parameters) and lenient about everything else: unknown fields are kept and
passed through to upstreams that understand them. Every refusal is an ``InvalidRequest``
naming the offending parameter, which the server turns into OpenAI error JSON. Parsing runs
before any upstream call and before anything is recorded, so a refused request leaves no
trace in the request log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

from parley.chat.fields import NUL_REFUSED, holds_nul
from parley.domain.exchange import MAX_TOKENS_LIMIT
from parley.domain.messages import ROLES, ChatRequest, Message, ToolCall
from parley.errors import InvalidRequest

# Fields modelled by ChatRequest; everything else goes to ``extra`` untouched.
_MODELLED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "tools",
        "tool_choice",
        "stream_options",
        "user",
    }
)
_ENCODING_FORMATS = frozenset({"float", "base64"})
# orjson reads an integer outside [-2**63, 2**64 - 1] as a float, silently changing it (a
# ``seed`` of 10**20 would go upstream as 1e+20). Such an integer has at least 19 digits.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def parse_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("request body is empty: expected a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    if _LONG_DIGITS.search(body) is not None:
        # Rare (a long number, or 19 digits in a row inside some string): read the body
        # again with the standard library, which keeps each integer whole.
        for key, value in json.loads(body).items():
            wide = _wide_integer(value)
            if wide is not None:
                raise InvalidRequest(
                    f"'{key}' holds the integer {str(wide)[:40]}, outside the 64-bit range "
                    f"({_INT_MIN} to {_INT_MAX})",
                    key,
                )
    return data


def _wide_integer(value: Any) -> int | None:
    """The first integer in ``value`` (at any depth) outside orjson's range, else None."""
    if type(value) is int:
        return None if _INT_MIN <= value <= _INT_MAX else value
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return None
    for item in value:
        wide = _wide_integer(item)
        if wide is not None:
            return wide
    return None


def parse_api_object(body: bytes) -> dict[str, Any]:
    """A JSON object body of the chat and admin APIs (``/api``): as ``parse_json_object``,
    and no string in it (key or value, at any depth) may hold a NUL character. Those APIs
    store text, which PostgreSQL refuses with a NUL: a 400 on both databases alike, not a
    500 on one (``/v1`` instead stores exchanges with U+FFFD in its place)."""
    data = parse_json_object(body)
    if holds_nul(data):
        raise InvalidRequest(NUL_REFUSED)
    return data


def parse_chat_request(data: dict[str, Any]) -> ChatRequest:
    model = _model(data)
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("'messages' must be a non-empty array", "messages")
    messages = tuple(_message(m, i) for i, m in enumerate(raw_messages))
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", "stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object", "stream_options")
    max_tokens = _int(data, "max_completion_tokens", maximum=MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = _int(data, "max_tokens", maximum=MAX_TOKENS_LIMIT)
    tools = data.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise InvalidRequest("'tools' must be an array of objects", "tools")
    user = _user(data)
    return ChatRequest(
        model=model,
        messages=messages,
        stream=bool(stream),
        max_tokens=max_tokens,
        temperature=_number(data, "temperature", 0.0, 2.0),
        top_p=_number(data, "top_p", 0.0, 1.0),
        n=_int(data, "n", minimum=1),
        stop=_stop(data.get("stop")),
        tools=tuple(tools or ()),
        tool_choice=data.get("tool_choice"),
        include_usage=bool(stream_options and stream_options.get("include_usage")),
        extra={k: v for k, v in data.items() if k not in _MODELLED},
        raw=data,
        client_protocol="openai",
        user=user,
    )


def parse_embeddings_request(data: Mapping[str, Any]) -> str:
    """Check an embeddings request and return its model; the body itself goes upstream as
    it came, unknown fields included.

    Upstreams answer a wrong type with anything from a 400 to a 500 (retried, then a 502)
    or, worse, a 200; refusing here gives the client OpenAI's 400 every time.
    """
    model = _model(data)
    if not _is_embedding_input(data.get("input")):
        raise InvalidRequest(
            "'input' is required and must be a non-empty string, a non-empty array of "
            "non-empty strings, a non-empty array of integers (token ids), or a non-empty "
            "array of non-empty arrays of integers",
            "input",
        )
    _int(data, "dimensions", minimum=1)
    encoding_format = data.get("encoding_format")
    if encoding_format is not None and (
        not isinstance(encoding_format, str) or encoding_format not in _ENCODING_FORMATS
    ):
        raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    _user(data)
    return model


def _is_embedding_input(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    if not isinstance(value, list) or not value:
        return False
    return (
        # OpenAI refuses an empty string anywhere in the array, as on its own.
        all(isinstance(item, str) and item for item in value)
        or all(_is_token(item) for item in value)
        or all(
            isinstance(item, list) and item and all(_is_token(t) for t in item) for item in value
        )
    )


def _is_token(value: Any) -> bool:
    # bool is a subclass of int, and ``true`` is no token id.
    return isinstance(value, int) and not isinstance(value, bool)


def _model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required and must be a non-empty string", "model")
    return model


def _user(data: Mapping[str, Any]) -> str | None:
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string", "user")
    return user


def _message(raw: Any, index: int) -> Message:
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{param}' must be an object", param)
    role = raw.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"'{param}.role' must be one of {', '.join(sorted(ROLES))}", f"{param}.role"
        )
    content = raw.get("content")
    parts: str | tuple[Mapping[str, Any], ...] | None
    if content is None or isinstance(content, str):
        parts = content
    elif isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
    ):
        parts = tuple(content)
    else:
        raise InvalidRequest(
            f"'{param}.content' must be a string or an array of content parts",
            f"{param}.content",
        )
    if parts is None and role in ("user", "system", "developer"):
        raise InvalidRequest(f"'{param}.content' is required for role {role}", param)
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest(f"'{param}.name' must be a string", f"{param}.name")
    tool_call_id = raw.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise InvalidRequest(f"'{param}.tool_call_id' must be a string", param)
    return Message(
        role=role,
        content=parts,
        name=name,
        tool_calls=_tool_calls(raw.get("tool_calls"), param),
        tool_call_id=tool_call_id,
    )


def _tool_calls(raw: Any, param: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"'{param}.tool_calls' must be an array", f"{param}.tool_calls")
    calls = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(
                f"'{param}.tool_calls' entries need function.name", f"{param}.tool_calls"
            )
        arguments = function.get("arguments", "")
        calls.append(
            ToolCall(
                id=str(call.get("id", "")),
                name=function["name"],
                arguments=arguments
                if isinstance(arguments, str)
                else orjson.dumps(arguments).decode(),
                type=str(call.get("type", "function")),
            )
        )
    return tuple(calls)


def _int(
    data: Mapping[str, Any], key: str, minimum: int = 0, maximum: int | None = None
) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"'{key}' must be an integer >= {minimum}", key)
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"'{key}' must be an integer from {minimum} to {maximum}", key)
    return value


def _number(data: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be a number between {low:g} and {high:g}", key)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidRequest("'stop' must be a string or an array of strings", "stop")
