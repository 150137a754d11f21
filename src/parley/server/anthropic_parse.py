"""Parsing and validating Anthropic Messages API requests into provider-neutral values.

The neutral form is OpenAI-shaped (``domain.messages``), so an Anthropic request is
translated: ``system`` becomes a leading system message; text and image blocks become
OpenAI content parts (a lone text block becomes a plain string, so the same words hash the
same whichever client sent them); an assistant's ``tool_use`` blocks become tool calls whose
arguments are the JSON of ``input``; a user's ``tool_result`` blocks become separate
``tool`` messages placed before the rest of that user turn. ``raw`` keeps the client's
body as sent, so an Anthropic upstream receives every block and field untouched.

What the neutral form cannot carry is left out of it (and so out of the store), never
refused: ``thinking`` / ``redacted_thinking`` blocks, the blocks of Anthropic-hosted
(server) tools, and server tool definitions. Structured output (``output_config.format``,
or the beta's ``output_format``) becomes OpenAI's ``response_format`` with its schema.
Unknown content block types are refused, because dropping what a user wrote would
silently change the conversation; so is an empty message (``""`` or ``[]``) other than a
final assistant one, as Anthropic refuses it. Every refusal is an ``InvalidRequest``,
which the server answers as Anthropic error JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from parley.domain.exchange import MAX_TOKENS_LIMIT
from parley.domain.messages import ChatRequest, Message, ToolCall
from parley.errors import InvalidRequest

PROTOCOL = "anthropic"

# Blocks that only an Anthropic upstream can use (reasoning signatures, hosted tools).
_DROPPED_BLOCKS = frozenset(
    {
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "mcp_tool_use",
        "mcp_tool_result",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "container_upload",
    }
)

_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def parse_messages_request(data: dict[str, Any], *, require_max_tokens: bool = True) -> ChatRequest:
    """The neutral request for an Anthropic ``/v1/messages`` (or ``count_tokens``) body."""
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: field required (a non-empty string)", "model")
    max_tokens = _int(data, "max_tokens", minimum=1, maximum=MAX_TOKENS_LIMIT)
    if max_tokens is None and require_max_tokens:
        raise InvalidRequest("max_tokens: field required", "max_tokens")
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("messages: must be a non-empty array", "messages")
    messages = _system(data.get("system"))
    last = len(raw_messages) - 1
    for index, raw in enumerate(raw_messages):
        messages.extend(_turn(raw, index, final=index == last))
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean", "stream")
    tools = _tools(data.get("tools"))
    extra: dict[str, Any] = {}
    tool_choice = _tool_choice(data.get("tool_choice"), extra)
    if not tools:
        # Only hosted tools (or none): OpenAI refuses a tool choice without tools.
        tool_choice = None
        extra.pop("parallel_tool_calls", None)
    top_k = _int(data, "top_k")
    if top_k is not None:
        extra["top_k"] = top_k
    thinking = data.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise InvalidRequest("thinking: must be an object with a 'type'", "thinking")
        extra["thinking"] = thinking
    response_format = _response_format(data)
    if response_format is not None:
        extra["response_format"] = response_format
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        stream=bool(stream),
        max_tokens=max_tokens,
        temperature=_number(data, "temperature"),
        top_p=_number(data, "top_p"),
        stop=_stop_sequences(data.get("stop_sequences")),
        tools=tools,
        tool_choice=tool_choice,
        # Usage is needed for message_delta: OpenAI upstreams must send it in streams.
        include_usage=True,
        extra=extra,
        raw=data,
        client_protocol=PROTOCOL,
        user=_user(data.get("metadata")),
    )


def _response_format(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for Anthropic's structured output: ``output_config``'s
    ``format``, or the beta's ``output_format``. Not ``strict``: OpenAI's strict mode
    refuses schemas Anthropic takes (an optional property), and a looser answer beats a
    400 from the upstream of another protocol."""
    config = data.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise InvalidRequest("output_config: must be an object", "output_config")
    place, spec = "output_config.format", (config or {}).get("format")
    if spec is None:
        place, spec = "output_format", data.get("output_format")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema":
        raise InvalidRequest(f"{place}: must be an object of type 'json_schema'", place)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{place}.schema: must be an object", f"{place}.schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def _system(system: Any) -> list[Message]:
    if system is None:
        return []
    if isinstance(system, str):
        return [Message(role="system", content=system)] if system else []
    if isinstance(system, list):
        texts = []
        for block in system:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise InvalidRequest("system: blocks must be text blocks", "system")
            texts.append(_str(block, "text", "system"))
        return [Message(role="system", content="\n".join(texts))] if texts else []
    raise InvalidRequest("system: must be a string or an array of text blocks", "system")


def _turn(raw: Any, index: int, *, final: bool) -> list[Message]:
    """The neutral messages of one Anthropic message (a user turn may give several)."""
    param = f"messages.{index}"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{param}: must be an object", param)
    role = raw.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{param}.role: must be 'user' or 'assistant'", f"{param}.role")
    content = raw.get("content")
    if isinstance(content, str | list) and not content and not (final and role == "assistant"):
        # Anthropic's rule, in its words. An empty turn would otherwise vanish from the
        # neutral form and change the conversation an OpenAI-style upstream sees.
        raise InvalidRequest(
            f"{param}: all messages must have non-empty content except for the optional "
            "final assistant message",
            f"{param}.content",
        )
    if isinstance(content, str):
        return [Message(role=role, content=content)]
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{param}.content: must be a string or an array of content blocks", f"{param}.content"
        )
    blocks = []
    for position, block in enumerate(content):
        where = f"{param}.content.{position}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{where}: must be an object with a 'type'", where)
        if block["type"] not in _DROPPED_BLOCKS:
            blocks.append((block, where))
    return _assistant(blocks) if role == "assistant" else _user_turn(blocks)


def _assistant(blocks: list[tuple[dict[str, Any], str]]) -> list[Message]:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block, where in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(_str(block, "text", where))
        elif kind == "tool_use":
            tool_input = block.get("input")
            if not isinstance(tool_input, dict):
                raise InvalidRequest(f"{where}.input: must be an object", f"{where}.input")
            calls.append(
                ToolCall(
                    id=_str(block, "id", where),
                    name=_str(block, "name", where),
                    arguments=orjson.dumps(tool_input).decode(),
                )
            )
        else:
            raise _unsupported(kind, where, "an assistant")
    if not texts and not calls:
        return []
    text = "".join(texts)
    return [
        Message(
            role="assistant", content=text if text or not calls else None, tool_calls=tuple(calls)
        )
    ]


def _user_turn(blocks: list[tuple[dict[str, Any], str]]) -> list[Message]:
    results: list[Message] = []
    parts: list[Mapping[str, Any]] = []
    for block, where in blocks:
        kind = block["type"]
        if kind == "tool_result":
            text, images = _tool_result(block, where)
            results.append(
                Message(role="tool", content=text, tool_call_id=_str(block, "tool_use_id", where))
            )
            # OpenAI tool messages carry text only: pictures a tool returned follow in the
            # user message.
            parts.extend(images)
        else:
            parts.append(_part(block, where))
    if not parts:
        return results
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*results, Message(role="user", content=str(parts[0]["text"]))]
    return [*results, Message(role="user", content=tuple(parts))]


def _part(block: dict[str, Any], where: str) -> dict[str, Any]:
    """The OpenAI content part for a user's text, image or document block."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": _str(block, "text", where)}
    source = block.get("source")
    if kind not in ("image", "document"):
        raise _unsupported(kind, where, "a user")
    if not isinstance(source, dict):
        raise InvalidRequest(f"{where}.source: must be an object", f"{where}.source")
    source_type = source.get("type")
    if source_type == "base64":
        media_type = _str(source, "media_type", f"{where}.source")
        url = f"data:{media_type};base64,{_str(source, 'data', f'{where}.source')}"
        if kind == "image":
            return {"type": "image_url", "image_url": {"url": url}}
        return {"type": "file", "file": {"file_data": url, "filename": "document"}}
    if source_type == "url" and kind == "image":
        return {"type": "image_url", "image_url": {"url": _str(source, "url", f"{where}.source")}}
    if source_type == "text" and kind == "document":
        return {"type": "text", "text": _str(source, "data", f"{where}.source")}
    raise InvalidRequest(
        f"{where}.source: {kind} source type {source_type!r} is not supported",
        f"{where}.source",
    )


def _tool_result(block: dict[str, Any], where: str) -> tuple[str, list[dict[str, Any]]]:
    content = block.get("content")
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content: must be a string or an array of blocks", f"{where}.content"
        )
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for position, item in enumerate(content):
        inner = f"{where}.content.{position}"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise InvalidRequest(f"{inner}: must be an object with a 'type'", inner)
        part = _part(item, inner)
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            images.append(part)
    return "\n".join(texts), images


def _tools(raw: Any) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest("tools: must be an array", "tools")
    tools: list[Mapping[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools.{index}"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where}: must be an object", where)
        if tool.get("type") not in (None, "custom"):
            continue  # an Anthropic-hosted tool (web search, bash...): only Anthropic has it
        function: dict[str, Any] = {"name": _str(tool, "name", where)}
        description = tool.get("description")
        if description is not None:
            if not isinstance(description, str):
                raise InvalidRequest(f"{where}.description: must be a string", where)
            function["description"] = description
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{where}.input_schema: must be an object", where)
        function["parameters"] = schema
        tools.append({"type": "function", "function": function})
    return tuple(tools)


def _tool_choice(raw: Any, extra: dict[str, Any]) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise InvalidRequest("tool_choice: must be an object with a 'type'", "tool_choice")
    if raw.get("disable_parallel_tool_use") is True:
        extra["parallel_tool_calls"] = False
    kind = raw["type"]
    if kind == "tool":
        return {"type": "function", "function": {"name": _str(raw, "name", "tool_choice")}}
    if kind in _TOOL_CHOICES:
        return _TOOL_CHOICES[kind]
    raise InvalidRequest(
        "tool_choice.type: must be one of 'auto', 'any', 'tool', 'none'", "tool_choice"
    )


def _user(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata: must be an object", "metadata")
    user = metadata.get("user_id")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("metadata.user_id: must be a string", "metadata.user_id")
    return user


def _unsupported(kind: str, where: str, whose: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}.type: content block type {kind!r} is not supported in {whose} message",
        f"{where}.type",
    )


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key}: field required (a string)", f"{where}.{key}")
    return value


def _int(
    data: Mapping[str, Any], key: str, minimum: int = 0, maximum: int | None = None
) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{key}: must be an integer >= {minimum}", key)
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"{key}: must be an integer from {minimum} to {maximum}", key)
    return value


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"{key}: must be a number between 0 and 1", key)
    return float(value)


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidRequest("stop_sequences: must be an array of strings", "stop_sequences")
