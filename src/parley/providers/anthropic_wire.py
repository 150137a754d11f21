"""The Anthropic Messages wire format: neutral requests to bodies, bodies and SSE events
back to neutral events, error bodies to typed errors.

Pure functions and small parsers with no I/O, so that the adapter in ``anthropic`` holds
only HTTP, timeouts and connection lifecycle. Each stream frame is parsed once with
orjson; raw bytes are never re-serialised.

Invariants:

- A neutral request is translated whole or refused with ``InvalidRequest`` (before any
  HTTP call): an image form Anthropic cannot take, a content part it has no block for,
  tool-call arguments that are not a JSON object, ``n`` > 1, ``logprobs``,
  ``top_logprobs`` or ``logit_bias`` asking for anything, a ``response_format`` of
  ``json_object`` (a ``json_schema`` one becomes ``output_config.format``).
- ``reasoning_effort`` is not mapped to ``thinking``: with thinking on, Anthropic wants the
  signed thinking blocks of a tool-using turn sent back, which an OpenAI client cannot do.
  A client that wants thinking sends Anthropic's ``thinking`` object, passed on as is.
- ``StreamFrames.chunk`` forwards a frame as ``event: <type>\\ndata: <the JSON bytes as
  received>\\n\\n``: the shared SSE decoder drops the ``event:`` line, and Anthropic
  clients dispatch on it, so it is rebuilt from the JSON's ``type`` (which always equals
  it on Anthropic's wire).
- Usage follows OpenAI's convention: ``prompt_tokens`` is ``input_tokens`` plus the cache
  read and cache creation tokens; ``cached_tokens`` is the cache read.
- Error messages built here are cut to 500 characters and pass through the caller's
  ``scrub``; they never hold request headers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from parley.domain.capabilities import openai_only
from parley.domain.events import (
    Chunk,
    Event,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.messages import ChatRequest, Message, ToolCall, arguments_object
from parley.domain.usage import Usage
from parley.errors import (
    InvalidRequest,
    Unsupported,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    interrupted,
)
from parley.providers.wire import (
    MAX_MESSAGE,
    Scrub,
    count,
    opt_str,
    retry_after,
    short,
    text_of,
    whole,
)

PROTOCOL = "anthropic"
API_VERSION = "2023-06-01"
# Anthropic requires max_tokens and ProviderConfig has no per-provider default: this one
# applies when the client set none (every current Claude model allows at least this).
DEFAULT_MAX_TOKENS = 4096
# The only fields /v1/messages/count_tokens takes (it refuses any other).
COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")
# OpenAI request fields (in ``ChatRequest.extra``) that Anthropic takes under the same name.
EXTRA_FIELDS = ("top_k", "thinking")
# How Anthropic words a prompt over the model's context window (a 400 invalid_request).
CONTEXT_HINTS = ("prompt is too long", "context limit", "context window", "context length")
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic error type -> (HTTP status it comes with, parley error type). An error that
# arrives inside a 200 stream has no status of its own: it gets the one listed here.
ERRORS: dict[str, tuple[int, str | None]] = {
    "invalid_request_error": (400, "bad_request"),
    "authentication_error": (401, "authentication"),
    "billing_error": (402, "permission"),
    "permission_error": (403, "permission"),
    "not_found_error": (404, "not_found"),
    "request_too_large": (413, None),  # what 413 always means in errors.py
    "rate_limit_error": (429, "rate_limit"),
    "api_error": (500, "server_error"),
    "timeout_error": (504, "server_error"),
    "overloaded_error": (529, "overloaded"),
}


# -- neutral request -> Anthropic body --------------------------------------------------


def messages_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The ``/v1/messages`` body for a neutral request (``stream`` set by the caller)."""
    if request.n is not None and request.n > 1:
        raise Unsupported("Anthropic models return one choice: n must be 1", param="n")
    if (refused := openai_only(request.extra)) is not None:
        field, why = refused
        raise Unsupported(f"'{field}' cannot be sent to Anthropic: {why}", param=field)
    extra = request.extra
    max_tokens = request.max_tokens or extra.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    system = [m.text() for m in request.messages if m.role in ("system", "developer")]
    if any(system):
        body["system"] = "\n\n".join(text for text in system if text)
    body["messages"] = turns(request.messages)
    # A tool_choice without tools is a 400 upstream: it only goes with tools.
    if request.tools:
        body["tools"] = [tool(t) for t in request.tools]
        choice = tool_choice(request.tool_choice, extra.get("parallel_tool_calls"))
        if choice is not None:
            body["tool_choice"] = choice
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    for key, value in (("temperature", request.temperature), ("top_p", request.top_p)):
        if value is not None:
            body[key] = value
    for key in EXTRA_FIELDS:
        if extra.get(key) is not None:
            body[key] = extra[key]
    output = output_config(extra.get("response_format"))
    if output is not None:
        body["output_config"] = output
    if request.user:
        body["metadata"] = {"user_id": request.user}
    return body


def output_config(response_format: Any) -> dict[str, Any] | None:
    """Anthropic's ``output_config`` for an OpenAI ``response_format``: a JSON schema
    becomes its ``format`` (Anthropic's structured outputs); ``text`` (or no type) asks
    for nothing. JSON mode without a schema (``json_object``) has no Anthropic form: it is
    refused, so another candidate may take it, never silently dropped."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("'response_format' must be an object", param="response_format")
    kind = response_format.get("type")
    if kind is None or kind == "text":
        return None
    if kind == "json_object":
        raise Unsupported(
            "'response_format' json_object cannot be sent to Anthropic: it has no JSON mode "
            "without a schema (send a json_schema)",
            param="response_format",
        )
    if kind != "json_schema":
        raise InvalidRequest(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise InvalidRequest(
            "'response_format.json_schema.schema' must be an object", param="response_format"
        )
    return {"format": {"type": "json_schema", "schema": dict(schema)}}


def turns(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """User and assistant turns; tool results become ``user`` turns, and consecutive
    turns of one role are merged (Anthropic wants them alternating)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.role
        if role in ("system", "developer"):
            continue
        if role == "user":
            blocks = content_blocks(message.content)
        elif role == "assistant":
            blocks = content_blocks(message.content)
            blocks += [tool_use(call) for call in message.tool_calls]
        elif role == "tool":
            role, blocks = "user", [tool_result(message)]
        else:
            raise Unsupported(f"messages with role {role!r} cannot be sent to Anthropic")
        if not blocks:
            continue  # Anthropic refuses empty content; an empty turn says nothing.
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def content_blocks(content: str | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest("a text content part has no text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(image_block(part.get("image_url")))
        else:
            raise Unsupported(f"content parts of type {kind!r} cannot be sent to Anthropic")
    return blocks


def image_block(image: Any) -> dict[str, Any]:
    """An image part: a base64 data URL becomes inline bytes, an http(s) URL a URL source
    (Anthropic fetches it; parley never does)."""
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise InvalidRequest("an image_url content part has no url")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if not url.startswith("data:"):
        raise InvalidRequest("Anthropic takes images as base64 data URLs or http(s) URLs")
    header, comma, data = url[5:].partition(",")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if not comma or "base64" not in params or not data:
        raise InvalidRequest("an image data URL must be base64: data:<type>;base64,<data>")
    if media_type not in IMAGE_TYPES:
        raise InvalidRequest(
            f"Anthropic takes JPEG, PNG, GIF and WebP images, not {media_type or 'untyped'} data"
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def tool_use(call: ToolCall) -> dict[str, Any]:
    """An assistant tool call; Anthropic wants its arguments as a JSON object."""
    arguments = arguments_object(call.arguments)
    if arguments is None:
        raise InvalidRequest(
            f"the arguments of tool call {call.id!r} are not a JSON object", param="messages"
        )
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def tool_result(message: Message) -> dict[str, Any]:
    if not message.tool_call_id:
        raise InvalidRequest("a tool message has no tool_call_id", param="messages")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    content: str | list[dict[str, Any]] = (
        message.content if isinstance(message.content, str) else content_blocks(message.content)
    )
    if content:
        block["content"] = content
    return block


def tool(definition: Mapping[str, Any]) -> dict[str, Any]:
    function = definition.get("function")
    if definition.get("type", "function") != "function" or not isinstance(function, Mapping):
        raise InvalidRequest("only function tools can be sent to Anthropic", param="tools")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a function tool has no name", param="tools")
    out: dict[str, Any] = {"name": name}
    if function.get("description"):
        out["description"] = function["description"]
    # Anthropic requires a schema; OpenAI lets a function without parameters through.
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    """OpenAI's ``tool_choice`` (and ``parallel_tool_calls: false``) as Anthropic's."""
    if choice is None or choice == "auto":
        out: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("tool_choice names no function", param="tool_choice")
        out = {"type": "tool", "name": name}
    else:
        raise InvalidRequest(f"unsupported tool_choice {choice!r}", param="tool_choice")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # Anthropic's default is auto: send nothing the client did not ask for
    return out


# -- Anthropic answers -> events --------------------------------------------------------


def message_events(obj: dict[str, Any], model: str, created: int) -> tuple[Event, ...]:
    """Events of a whole (non-streaming) Messages answer."""
    events: list[Event] = [response_start(obj, model, created)]
    calls = 0
    for block in obj["content"]:
        kind = block.get("type")
        if kind == "text":
            text = text_of(block.get("text"))
            if text:
                events.append(TextDelta(0, text))
        elif kind == "thinking":
            thinking = text_of(block.get("thinking"))
            if thinking:
                events.append(ReasoningDelta(0, thinking))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            events.append(
                ToolCallDelta(
                    0, calls, text_of(block.get("id")), text_of(block.get("name")), arguments
                )
            )
            calls += 1
    events.append(Finish(0, finish_reason(obj.get("stop_reason"))))
    if isinstance(obj.get("usage"), dict):
        events.append(UsageReport(usage_from(obj["usage"])))
    return tuple(events)


def response_start(message: dict[str, Any], model: str, created: int) -> ResponseStart:
    # Anthropic answers carry no creation time: the caller's clock stands in.
    return ResponseStart(
        id=str(message.get("id") or ""), model=str(message.get("model") or model), created=created
    )


def finish_reason(stop_reason: Any) -> str:
    """Anthropic's ``stop_reason`` in OpenAI's vocabulary (unknown ones end as "stop")."""
    if stop_reason is None:
        return "stop"
    return FINISH_REASONS.get(text_of(stop_reason), "stop")


def usage_from(raw: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> Usage:
    """Usage from an answer's ``usage``; in a stream, input counts the final ``usage``
    lacks come from ``message_start``'s (``start``)."""

    def pick(name: str) -> int | None:
        value = count(raw.get(name))
        if value is None and start is not None:
            value = count(start.get(name))
        return value

    uncached = pick("input_tokens")
    read = pick("cache_read_input_tokens")
    created = pick("cache_creation_input_tokens")
    known = [n for n in (uncached, read, created) if n is not None]
    prompt = sum(known) if known else None
    completion = count(raw.get("output_tokens"))
    total = None if prompt is None or completion is None else prompt + completion
    details = raw.get("output_tokens_details")
    thinking = count(details.get("thinking_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, total, read, thinking)


class StreamFrames:
    """What one stream has seen so far, and the parse of each of its frames."""

    __slots__ = ("argued", "created", "model", "scrub", "start_usage", "started", "tool_blocks")

    def __init__(self, model: str, created: int, scrub: Scrub) -> None:
        self.model = model
        self.created = created
        self.scrub = scrub
        self.started = False
        self.start_usage: dict[str, Any] | None = None
        # content block index -> index of the tool call among this answer's tool calls
        self.tool_blocks: dict[int, int] = {}
        # The tool blocks that got any arguments (one that got none stops with "{}").
        self.argued: set[int] = set()

    def chunk(self, payload: bytes, yielded: bool, more: bool = False) -> Chunk:
        """The chunk for one SSE event's data; ``final`` for ``message_stop``."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream sent a stream event that is not JSON") from None
        if type(obj) is not dict:
            raise UpstreamProtocolError("upstream sent a stream event that is not an object")
        kind = obj.get("type")
        if not isinstance(kind, str) or not kind or "\n" in kind or "\r" in kind:
            raise UpstreamProtocolError("upstream sent a stream event without a type")
        if kind == "error":
            raise error_object(obj.get("error"), yielded, self.scrub)
        try:
            events = self._events(kind, obj)
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise UpstreamProtocolError("upstream stream event has an unexpected shape") from exc
        if kind == "message_stop" and not self.started:
            raise UpstreamProtocolError("upstream ended the stream before it started")
        if b"\n" in payload:
            # A multi-line data field: in JSON those newlines can only be whitespace.
            payload = payload.replace(b"\n", b" ")
        return Chunk(
            events=events,
            raw=b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n",
            protocol=PROTOCOL,
            final=kind == "message_stop",
            more=more and kind != "message_stop",
        )

    def _events(self, kind: str, obj: dict[str, Any]) -> tuple[Event, ...]:
        if kind == "content_block_delta":
            return self._delta(whole(obj["index"]), obj["delta"])
        if kind == "content_block_start":
            return self._block_start(whole(obj["index"]), obj["content_block"])
        if kind == "message_start":
            message = obj["message"]
            self.started = True
            events: list[Event] = [response_start(message, self.model, self.created)]
            usage = message.get("usage")
            if isinstance(usage, dict):
                self.start_usage = usage
                # Input is known (and billed) from here: an interrupted stream keeps it.
                start = usage_from(usage)
                events.append(
                    UsageReport(Usage(start.prompt_tokens, cached_tokens=start.cached_tokens))
                )
            return tuple(events)
        if kind == "message_delta":
            events = []
            reason = (obj.get("delta") or {}).get("stop_reason")
            if reason is not None:
                events.append(Finish(0, finish_reason(reason)))
            usage = obj.get("usage")
            if isinstance(usage, dict):
                events.append(UsageReport(usage_from(usage, self.start_usage)))
            return tuple(events)
        if kind == "content_block_stop":
            index = whole(obj["index"])
            position = self.tool_blocks.get(index)
            if position is not None and index not in self.argued:
                # A call without arguments: "{}" as a whole answer has it, never "".
                return (ToolCallDelta(0, position, None, None, "{}"),)
            return ()
        # ping, message_stop and event types added later: no events.
        return ()

    def _block_start(self, index: int, block: dict[str, Any]) -> tuple[Event, ...]:
        kind = block.get("type")
        if kind == "text":
            text = text_of(block.get("text", ""))
            return (TextDelta(0, text),) if text else ()
        if kind == "thinking":
            thinking = text_of(block.get("thinking", ""))
            return (ReasoningDelta(0, thinking),) if thinking else ()
        if kind == "tool_use":
            position = self.tool_blocks[index] = len(self.tool_blocks)
            call_id, name = text_of(block.get("id")), text_of(block.get("name"))
            given = block.get("input")
            arguments = orjson.dumps(given).decode() if isinstance(given, dict) and given else ""
            if arguments:
                self.argued.add(index)
            return (ToolCallDelta(0, position, call_id, name, arguments),)
        return ()

    def _delta(self, index: int, delta: dict[str, Any]) -> tuple[Event, ...]:
        kind = delta.get("type")
        if kind == "text_delta":
            return (TextDelta(0, text_of(delta.get("text"))),)
        if kind == "thinking_delta":
            return (ReasoningDelta(0, text_of(delta.get("thinking"))),)
        if kind == "input_json_delta":
            position = self.tool_blocks.get(index)
            fragment = text_of(delta.get("partial_json"))
            # A server tool's input (web search...) is not a call the client must answer.
            if position is None or not fragment:
                return ()
            self.argued.add(index)
            return (ToolCallDelta(0, position, None, None, fragment),)
        return ()  # signature_delta, citations_delta: nothing a neutral client sees


# -- errors -----------------------------------------------------------------------------


def http_error(
    status: int, body: bytes, headers: Mapping[str, str], scrub: Scrub
) -> UpstreamHTTPError:
    """The error for a non-2xx answer."""
    message, error_type = error_fields(body)
    return _error(status, error_type, scrub(message or f"upstream returned HTTP {status}"), headers)


def error_object(error: Any, yielded: bool, scrub: Scrub) -> UpstreamError:
    """The error for an ``error`` event in a stream (or an error body in a 200 answer):
    an interruption once chunks were yielded, else the HTTP error its type stands for
    (an ``overloaded_error`` before the first event is a retryable 529)."""
    message, error_type = error_fields(orjson.dumps({"type": "error", "error": error}))
    message = scrub(message or "upstream reported an error")
    if yielded:
        # Overloaded stays overloaded: an Anthropic client is told overloaded_error.
        overloaded = error_type == "overloaded_error"
        return interrupted(f"upstream error mid-stream: {message}", overloaded=overloaded)
    status = ERRORS.get(error_type or "", (500, None))[0]
    return _error(status, error_type, message, {})


def _error(
    status: int, error_type: str | None, message: str, headers: Mapping[str, str]
) -> UpstreamHTTPError:
    kind = ERRORS.get(error_type or "", (status, None))[1]
    if error_type == "invalid_request_error":
        lowered = message.lower()
        if any(hint in lowered for hint in CONTEXT_HINTS):
            kind = "context_length"
        elif "content filtering" in lowered:
            kind = "content_filter"
    return UpstreamHTTPError(
        status,
        message,
        retry_after=retry_after(headers),
        upstream_type=error_type,
        error_type=kind,
    )


def error_fields(body: bytes) -> tuple[str, str | None]:
    """(message, type) from an Anthropic error body, else a short excerpt of the body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict):
            return short(error.get("message")), opt_str(error.get("type"))
        if isinstance(error, str):
            return short(error), None
        if "message" in obj:
            return short(obj["message"]), None
    excerpt = body[: MAX_MESSAGE * 4].decode("utf-8", "replace").strip()
    return excerpt[:MAX_MESSAGE], None
