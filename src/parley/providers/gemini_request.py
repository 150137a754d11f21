"""Neutral requests to Gemini ``generateContent`` bodies (pure functions, no I/O).

``request_body``: system and developer messages become ``systemInstruction``;
user -> role ``user``, assistant -> role ``model``; tool results become ``functionResponse``
parts of a ``user`` turn, named after the earlier tool call with the same id (a JSON object
result is sent as is, anything else as ``{"content": text}``); consecutive turns of the
same role are merged, as Gemini wants turns to alternate. Images: data URLs become
``inlineData``, http(s) URLs ``fileData`` (MIME type guessed from the extension, else
``image/jpeg``); anything Gemini cannot take raises ``InvalidRequest`` before any call.
JSON schemas (tool parameters, ``response_format``) are reduced to the OpenAPI subset
Gemini accepts (``clean_schema``). Gemini 3 and later refuse a replayed function call
without its thought signature; the neutral history cannot carry one, so the first call of
each assistant turn gets Google's documented placeholder ``skip_thought_signature_validator``.

Reasoning: a Gemini thinking config the client sent (``thinking_config`` / ``thinkingConfig``,
or Google's compatibility form ``extra_body.google.thinking_config``) goes out as
``thinkingConfig``, keys in camelCase; else ``reasoning_effort`` is mapped as Google's own
OpenAI compatibility layer maps it (``_thinking_config``), with ``includeThoughts`` unless it
is "none", so the thoughts come back as reasoning. ``logprobs``, ``top_logprobs`` and
``logit_bias`` asking for anything are refused (``domain.capabilities.openai_only``);
``parallel_tool_calls`` is not sent: Gemini has no switch for it.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson

from parley.domain.capabilities import openai_only
from parley.domain.messages import ChatRequest, Message, arguments_object
from parley.errors import InvalidRequest, Unsupported

# No client speaks Gemini today; a body in its own format would pass through as is.
PROTOCOL = "gemini"
SKIP_SIGNATURE = "skip_thought_signature_validator"

# The OpenAPI subset Gemini's ``Schema`` accepts; any other key is a 400 upstream.
_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "default",
        "example",
        "required",
        "propertyOrdering",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "pattern",
    }
)
_TOOL_CHOICES = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
# reasoning_effort as Google's OpenAI compatibility layer maps it: thinking budgets for
# Gemini 2.5 ("low", "medium", "high" are 1K, 8K and 24K tokens), levels for Gemini 3.
# OpenAI's "xhigh" gets the highest Gemini has.
_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 24576}
_LEVELS = {"minimal": "minimal", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}
_EFFORTS = ("none", *_BUDGETS)
# Pro models cannot stop thinking: for "none" they get their least (2.5 Pro's budget floor).
_PRO_LEAST_BUDGET = 128


def request_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The ``generateContent`` body for ``request`` (the model and streaming are in the URL)."""
    if request.raw is not None and request.client_protocol == PROTOCOL:
        return dict(request.raw)
    if (refused := openai_only(request.extra)) is not None:
        field, why = refused
        raise Unsupported(f"'{field}' cannot be sent to Gemini: {why}", field)
    version = _version(model)
    system, contents = _contents(request.messages, version is not None and version >= (3, 0))
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in request.tools]}]
        # Gemini refuses a function calling config without function declarations.
        if request.tool_choice is not None:
            body["toolConfig"] = {"functionCallingConfig": _calling_config(request.tool_choice)}
    config = _generation_config(request, model)
    if config:
        body["generationConfig"] = config
    return body


def _version(model: str) -> tuple[int, int] | None:
    """(major, minor) of a ``gemini-<major>[.<minor>]-...`` model; None for any other name
    (``gemini-flash-latest``, ``gemma-3-27b-it``, a tuned model)."""
    name = model.removeprefix("models/")
    if not name.startswith("gemini-"):
        return None
    major, _, minor = name[7:].split("-", 1)[0].partition(".")
    if not _number(major) or (minor and not _number(minor)):
        return None
    return int(major), int(minor or "0")


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _contents(
    messages: Sequence[Message], sign: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, latest call wins
    for position, message in enumerate(messages):
        if message.role in ("system", "developer"):
            if text := message.text():
                system.append({"text": text})
            continue
        if message.role == "assistant":
            role, parts = "model", _assistant_parts(message, names, sign, position)
        elif message.role in ("tool", "function"):
            role, parts = "user", [_function_response(message, names, position)]
        else:
            role, parts = "user", _user_parts(message, position)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _user_parts(message: Message, position: int) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"text": message.content}]
    parts: list[dict[str, Any]] = []
    for part in message.content or ():
        kind = part.get("type")
        param = f"messages[{position}].content"
        if kind == "text":
            parts.append({"text": _str(part.get("text"), param)})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            parts.append(_media(_str(url, param), param))
        elif kind == "input_audio" and isinstance(audio := part.get("input_audio"), Mapping):
            audio_format = _str(audio.get("format"), param)
            data = _str(audio.get("data"), param)
            parts.append({"inlineData": {"mimeType": f"audio/{audio_format}", "data": data}})
        elif kind == "file" and isinstance(file := part.get("file"), Mapping):
            if not isinstance(file.get("file_data"), str):
                raise InvalidRequest("Gemini takes files only as inline data", param)
            parts.append(_media(file["file_data"], param))
        else:
            raise Unsupported(f"content parts of type {kind!r} cannot be sent to Gemini", param)
    return parts


def _media(url: str, param: str) -> dict[str, Any]:
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        mime, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or not mime:
            raise InvalidRequest("data URLs sent to Gemini must be base64 with a type", param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    if url.startswith(("https://", "http://")):
        guessed, _ = mimetypes.guess_type(urlsplit(url).path)
        return {"fileData": {"mimeType": guessed or "image/jpeg", "fileUri": url}}
    raise InvalidRequest("Gemini takes images as data URLs or http(s) URLs", param)


def _assistant_parts(
    message: Message, names: dict[str, str], sign: bool, position: int
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if text := message.text():
        parts.append({"text": text})
    for number, call in enumerate(message.tool_calls):
        args = arguments_object(call.arguments)
        if args is None:
            raise InvalidRequest(
                f"tool call {call.id!r} has arguments that are not a JSON object",
                f"messages[{position}].tool_calls",
            )
        names[call.id] = call.name
        part: dict[str, Any] = {"functionCall": {"name": call.name, "args": args}}
        if sign and number == 0:
            part["thoughtSignature"] = SKIP_SIGNATURE
        parts.append(part)
    return parts


def _function_response(message: Message, names: dict[str, str], position: int) -> dict[str, Any]:
    call_id = message.tool_call_id
    name = (names.get(call_id) if call_id is not None else None) or message.name
    if not name:
        raise InvalidRequest(
            f"tool result for {call_id!r} follows no assistant tool call with that id",
            f"messages[{position}].tool_call_id",
        )
    text = message.text()
    try:
        result = orjson.loads(text)
    except orjson.JSONDecodeError:
        result = None
    response = result if isinstance(result, dict) else {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


def _declaration(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise InvalidRequest("Gemini takes only tools of type 'function'", "tools")
    declaration: dict[str, Any] = {"name": _str(function.get("name"), "tools")}
    if isinstance(description := function.get("description"), str):
        declaration["description"] = description
    parameters = clean_schema(function.get("parameters"))
    # Gemini refuses an OBJECT without properties: a function without arguments has none.
    if parameters and (parameters.get("properties") or parameters.get("type") != "object"):
        declaration["parameters"] = parameters
    return declaration


def _calling_config(choice: Any) -> dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return {"mode": _TOOL_CHOICES[choice]}
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
    raise InvalidRequest("tool_choice must be auto, none, required or a function", "tool_choice")


def _generation_config(request: ChatRequest, model: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key, value in (
        ("temperature", request.temperature),
        ("topP", request.top_p),
        # Anthropic clients send top_k, and so do OpenAI clients of vLLM-style servers.
        ("topK", request.extra.get("top_k")),
        ("maxOutputTokens", request.max_tokens),
        ("candidateCount", request.n),
        ("seed", request.extra.get("seed")),
        ("presencePenalty", request.extra.get("presence_penalty")),
        ("frequencyPenalty", request.extra.get("frequency_penalty")),
    ):
        if value is not None:
            config[key] = value
    if request.stop:
        config["stopSequences"] = list(request.stop)
    response_format = request.extra.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        spec = response_format.get("json_schema") if isinstance(response_format, Mapping) else None
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if isinstance(schema, Mapping):
            config["responseSchema"] = clean_schema(schema)
    thinking = _thinking_config(request.extra, model)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    return config


def _thinking_config(extra: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    """The client's own Gemini thinking config, else ``reasoning_effort`` as Google maps it:
    ``thinkingLevel`` for Gemini 3 and later (which only they take), ``thinkingBudget``
    for the others (Gemini 3 takes it too, so it suits names without a version).

    "none" turns thinking off where the model can: Pro models cannot, and get their
    least; a Gemini before 2.5 never thinks, so it is sent nothing."""
    native = _native_thinking(extra)
    if native is not None:
        return native
    effort = extra.get("reasoning_effort")
    if effort is None:
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise InvalidRequest(
            f"reasoning_effort must be one of {', '.join(_EFFORTS)}", "reasoning_effort"
        )
    version = _version(model)
    pro = "-pro" in model
    config: dict[str, Any]
    if version is not None and version >= (3, 0):
        level = "minimal" if effort == "none" else _LEVELS[effort]
        # Gemini 3 Pro has no "minimal" level: "low" is the least it thinks.
        config = {"thinkingLevel": "low" if pro and level == "minimal" else level}
    elif effort == "none":
        if version is not None and version < (2, 5):
            return None
        config = {"thinkingBudget": _PRO_LEAST_BUDGET if pro else 0}
    else:
        config = {"thinkingBudget": _BUDGETS[effort]}
    if effort != "none":
        config["includeThoughts"] = True
    return config


def _native_thinking(extra: Mapping[str, Any]) -> dict[str, Any] | None:
    """A thinking config in Gemini's own terms, with its keys in camelCase, or None."""
    body = extra.get("extra_body")
    google = body.get("google") if isinstance(body, Mapping) else None
    found = [(key, key, extra.get(key)) for key in ("thinkingConfig", "thinking_config")]
    if isinstance(google, Mapping):
        path = "extra_body.google.thinking_config"
        found.append(("extra_body", path, google.get("thinking_config")))
    for param, path, value in found:
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise InvalidRequest(f"'{path}' must be an object (Gemini's thinking config)", param)
        return {_camel(str(key)): item for key, item in value.items()}
    return None


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def clean_schema(schema: Any) -> dict[str, Any]:
    """A JSON schema reduced to what Gemini's ``Schema`` accepts, recursively.

    Keys outside the OpenAPI subset (``additionalProperties``, ``$schema``, ``strict``,
    ``exclusiveMinimum``...) are dropped; local ``$ref``s into ``$defs``/``definitions``
    are inlined (a recursive one becomes a bare object); ``oneOf`` becomes ``anyOf``;
    ``"type": [x, "null"]`` and a ``{"type": "null"}`` branch become ``nullable``; a
    string ``const`` becomes a one-value ``enum``.
    """
    if not isinstance(schema, Mapping):
        return {}
    definitions: dict[str, Any] = {}
    for key in ("definitions", "$defs"):
        if isinstance(found := schema.get(key), Mapping):
            definitions.update(found)
    return _clean(schema, definitions, ())


def _clean(schema: Any, definitions: Mapping[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        target = definitions.get(name)
        if not isinstance(target, Mapping) or name in seen:
            return {"type": "object"}
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _clean(merged, definitions, (*seen, name))
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, Mapping):
            out[key] = {name: _clean(sub, definitions, seen) for name, sub in value.items()}
        elif key == "items":
            out[key] = _clean(value, definitions, seen)
        elif key in ("anyOf", "oneOf") and isinstance(value, list):
            branches = [_clean(sub, definitions, seen) for sub in value]
            others = [b for b in branches if b != {"type": "null"}]
            if len(others) < len(branches):
                out["nullable"] = True
            if len(others) == 1:
                out.update({k: v for k, v in others[0].items() if k not in out})
            elif others:
                out["anyOf"] = others
        elif key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            if len(types) < len(value):
                out["nullable"] = True
            if len(types) == 1:
                out["type"] = types[0]
            elif types:
                out["anyOf"] = [{"type": t} for t in types]
        elif key == "const" and isinstance(value, str):
            out["enum"] = [value]
        elif key in _SCHEMA_KEYS:
            out[key] = value
    return out


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("expected a string", param)
    return value
