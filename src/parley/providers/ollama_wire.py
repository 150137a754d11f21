"""The Ollama native wire format: neutral requests to ``/api/chat`` bodies, NDJSON lines
and whole answers to events, ``/api/embed`` answers to OpenAI embeddings JSON, errors.

Pure functions and small parsers with no I/O, so that the adapter in ``ollama`` holds only
HTTP, timeouts and connection lifecycle.

Invariants:

- No client speaks Ollama's protocol: every chunk has ``raw=None`` and ``protocol=None``
  (the server encodes the events for its client).
- A request Ollama cannot take as it is (an image by URL, tool-call arguments that are not
  a JSON object, a part type Ollama has no field for, ``n`` over 1, a tool that is not a
  function, a ``tool_choice`` naming no offered tool, ``logprobs``, ``top_logprobs`` or
  ``logit_bias`` asking for anything) is refused with ``InvalidRequest`` while the body is
  built, so before any HTTP call. ``parallel_tool_calls`` is not: Ollama can neither force
  nor forbid parallel calls, and agents send it with every request.
- Ollama has no response or tool-call ids: a response id is ``ollama-<uuid4 hex>``; a tool
  call without an upstream id gets ``call_<tag>_<n>``, ``tag`` the first 8 hex digits of
  that uuid and ``n`` counting the calls of the response from 0. Ids stay the same within
  a response (stream and record agree) and differ across the turns of a conversation:
  Anthropic refuses a history whose ``tool_use`` ids repeat, and a conversation may move
  there.
- ``NDJSONDecoder`` returns exactly the non-blank lines of a byte stream whatever the read
  boundaries, and refuses a line over ``MAX_LINE_BYTES`` rather than buffer it.
- Error messages built here are the upstream's ``error`` text, cut to 500 characters and
  passed through the caller's ``scrub``.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
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
from parley.domain.messages import ChatRequest, Message, arguments_object
from parley.domain.usage import Usage
from parley.errors import (
    InvalidRequest,
    Unsupported,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
)
from parley.providers.openai_wire import error_fields
from parley.providers.wire import Scrub, count, retry_after, text_of

PROTOCOL = "ollama"
# One NDJSON line larger than this is not a chat chunk: refuse it rather than buffer forever.
MAX_LINE_BYTES = 16 * 1024 * 1024
# OpenAI fields that Ollama takes, under the same name, in ``options``.
_OPTION_FIELDS = ("seed", "top_k", "num_ctx", "frequency_penalty", "presence_penalty", "min_p")


# -- request ----------------------------------------------------------------------------


def chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The ``/api/chat`` body for ``request``; ``InvalidRequest`` when Ollama cannot take it."""
    if request.raw is not None and request.client_protocol == PROTOCOL:
        # The client spoke Ollama: every field it sent goes through, known or not.
        body = dict(request.raw)
        body["model"] = model
        body["stream"] = request.stream
        return body
    if request.n is not None and request.n > 1:
        raise Unsupported("Ollama models return one choice: n must be 1", "n")
    if (refused := openai_only(request.extra)) is not None:
        field, why = refused
        raise Unsupported(f"'{field}' cannot be sent to Ollama: {why}", field)
    extra = request.extra
    body = {"model": model, "messages": messages(request.messages), "stream": request.stream}
    tools = _tools(request.tools, request.tool_choice)
    if tools:
        body["tools"] = tools
    response_format = _format(extra.get("response_format"))
    if response_format is not None:
        body["format"] = response_format
    options: dict[str, Any] = {
        key: value
        for key, value in (
            ("temperature", request.temperature),
            ("top_p", request.top_p),
            ("num_predict", request.max_tokens),
        )
        if value is not None
    }
    if request.stop:
        options["stop"] = list(request.stop)
    for key in _OPTION_FIELDS:
        if extra.get(key) is not None:
            options[key] = extra[key]
    if options:
        body["options"] = options
    if extra.get("keep_alive") is not None:
        body["keep_alive"] = extra["keep_alive"]
    # ``think`` as the client gave it (true/false or a level); an OpenAI client asks for
    # reasoning with ``reasoning_effort``, which Ollama knows only as on or off (its
    # levels are for some models only and refused by the others).
    if extra.get("think") is not None:
        body["think"] = extra["think"]
    elif extra.get("reasoning_effort") is not None:
        body["think"] = extra["reasoning_effort"] != "none"
    return body


def messages(history: Sequence[Message]) -> list[dict[str, Any]]:
    """Neutral messages as Ollama chat messages."""
    # Ollama names a tool result by its tool, not by a call id: remember each call's name.
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for position, message in enumerate(history):
        param = f"messages[{position}]"
        text, images = _content(message.content, param)
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": text}
        if images:
            item["images"] = images
        if message.tool_calls:
            item["tool_calls"] = [
                {"function": {"name": call.name, "arguments": _arguments(call.arguments, param)}}
                for call in message.tool_calls
            ]
            names.update((call.id, call.name) for call in message.tool_calls)
        if role in ("tool", "function"):
            item["role"] = "tool"
            name = names.get(message.tool_call_id or "") or message.name
            if name:
                item["tool_name"] = name
        out.append(item)
    return out


def _content(content: Any, param: str) -> tuple[str, list[str]]:
    """(text, base64 images) of a message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            images.append(_image(part.get("image_url"), param))
        else:
            raise InvalidRequest(
                f"'{param}.content' has a part of type {kind!r}: Ollama takes only text and "
                "image parts",
                f"{param}.content",
            )
    return "\n".join(texts), images


def _image(image_url: Any, param: str) -> str:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}' has an image part without a url", f"{param}.content")
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if sep and header.endswith(";base64"):
            return data
        raise InvalidRequest(
            f"'{param}' has an image data URL that is not base64: Ollama takes base64 bytes",
            f"{param}.content",
        )
    raise InvalidRequest(
        f"'{param}' has an image by URL: Ollama takes only inline image bytes, so send the "
        "image as a base64 data URL (data:image/png;base64,...)",
        f"{param}.content",
    )


def _arguments(arguments: str, param: str) -> dict[str, Any]:
    """Tool-call arguments as the object Ollama wants (OpenAI sends a JSON string)."""
    parsed = arguments_object(arguments)
    if parsed is None:
        raise InvalidRequest(
            f"'{param}.tool_calls' has arguments that are not a JSON object: Ollama takes "
            "tool-call arguments only as an object",
            f"{param}.tool_calls",
        )
    return parsed


def _tools(tools: Sequence[Mapping[str, Any]], choice: Any) -> list[Mapping[str, Any]]:
    """The tools to offer. Ollama has no ``tool_choice`` and cannot force a call: "none"
    offers no tool and a named function offers only that one; "auto" and "required"
    offer them all. Ollama runs function tools only: any other type, or a named choice
    that matches no tool, would leave the model without the tool the client meant."""
    for tool in tools:
        if tool.get("type", "function") != "function" or not isinstance(_tool_name(tool), str):
            raise InvalidRequest("Ollama takes only tools of type 'function' with a name", "tools")
    if not tools or choice == "none":
        return []
    if isinstance(choice, Mapping):
        function = choice.get("function")
        wanted = function.get("name") if isinstance(function, Mapping) else None
        if wanted is not None:
            offered = [t for t in tools if _tool_name(t) == wanted]
            if not offered:
                raise InvalidRequest(
                    f"tool_choice names {wanted!r}, which is not among 'tools'", "tool_choice"
                )
            return offered
    return list(tools)


def _tool_name(tool: Mapping[str, Any]) -> Any:
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else None


def _format(response_format: Any) -> Any:
    """Ollama's ``format`` for an OpenAI ``response_format``: "json", a schema, or None."""
    if not isinstance(response_format, Mapping):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return schema if isinstance(schema, Mapping) else "json"
    return None


# -- response ---------------------------------------------------------------------------


class NDJSONDecoder:
    """Incremental newline-delimited JSON splitting: bytes in, each non-blank line out."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        # The start of a line still waiting for its newline (usually empty).
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Every complete non-blank line that ``data`` ends."""
        end = data.rfind(b"\n")
        if end < 0:
            self._buf += data
            self._check(len(self._buf))
            return []
        if self._buf:
            self._buf += data[: end + 1]
            whole = bytes(self._buf)
            self._buf = bytearray(data[end + 1 :])
        else:
            whole = data[: end + 1]
            self._buf += data[end + 1 :]
        self._check(len(self._buf))
        lines = [line.strip() for line in whole.split(b"\n")]
        for line in lines:
            self._check(len(line))
        return [line for line in lines if line]

    def close(self) -> list[bytes]:
        """The last line, when the stream ended without its newline."""
        line = bytes(self._buf).strip()
        self._buf.clear()
        return [line] if line else []

    @staticmethod
    def _check(size: int) -> None:
        if size > MAX_LINE_BYTES:
            raise UpstreamProtocolError(f"upstream sent an NDJSON line over {MAX_LINE_BYTES} bytes")


class Answer:
    """One response's state (its id, tool-call count) and the parse of its objects."""

    __slots__ = ("id", "model", "scrub", "started", "tag", "tool_calls")

    def __init__(self, model: str, scrub: Scrub) -> None:
        tag = uuid.uuid4().hex
        self.id = f"ollama-{tag}"
        self.tag = tag[:8]
        self.model = model
        self.scrub = scrub
        self.started = False
        self.tool_calls = 0

    def line(self, line: bytes, yielded: bool, more: bool = False) -> Chunk:
        """The chunk of one NDJSON line; ``final`` for the ``done`` line."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream sent an NDJSON line that is not JSON") from None
        if type(obj) is not dict:
            raise UpstreamProtocolError("upstream sent an NDJSON line that is not an object")
        return self.chunk(obj, yielded, more)

    def chunk(self, obj: dict[str, Any], yielded: bool, more: bool = False) -> Chunk:
        """The chunk of one answer object (a stream line, or a whole non-streaming body)."""
        if obj.get("error"):
            raise error_object(obj["error"], yielded, self.scrub)
        try:
            done = obj.get("done", False)
            if type(done) is not bool:
                raise ValueError("done is not a boolean")
            events = self._events(obj, done)
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError("upstream answer has an unexpected shape") from exc
        return Chunk(events=tuple(events), final=done, more=more)

    def _events(self, obj: dict[str, Any], done: bool) -> list[Event]:
        events: list[Event] = []
        if not self.started:
            self.started = True
            model = obj.get("model")
            events.append(
                ResponseStart(
                    id=self.id,
                    model=text_of(model) if model else self.model,
                    created=created(obj.get("created_at")),
                )
            )
        message = obj.get("message")
        if message:
            if type(message) is not dict:
                raise ValueError("message is not an object")
            thinking = message.get("thinking")
            if thinking:
                events.append(ReasoningDelta(0, text_of(thinking)))
            content = message.get("content")
            if content:
                events.append(TextDelta(0, text_of(content)))
            calls = message.get("tool_calls")
            if calls:
                if type(calls) is not list:
                    raise ValueError("tool_calls is not a list")
                events.extend(self._tool_call(call) for call in calls)
        if done:
            events.append(Finish(0, self._reason(obj.get("done_reason"))))
            prompt = count(obj.get("prompt_eval_count"))
            completion = count(obj.get("eval_count"))
            if prompt is not None or completion is not None:
                total = (prompt or 0) + (completion or 0)
                events.append(UsageReport(Usage(prompt, completion, total)))
        return events

    def _tool_call(self, call: Any) -> ToolCallDelta:
        function = call.get("function")
        if type(function) is not dict:
            raise ValueError("tool call without a function object")
        arguments = function.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, str):
            # Ollama sends an object; clients expect a JSON string.
            arguments = orjson.dumps(arguments).decode()
        index = self.tool_calls
        self.tool_calls += 1
        call_id = call.get("id")
        return ToolCallDelta(
            choice=0,
            index=index,
            id=text_of(call_id) if call_id else f"call_{self.tag}_{index}",
            name=text_of(function.get("name")),
            arguments=arguments,
        )

    def _reason(self, done_reason: Any) -> str:
        if done_reason is not None:
            text_of(done_reason)
        if done_reason == "length":
            return "length"
        # "stop", "load", "unload" or a reason unknown yet: the answer ended normally.
        return "tool_calls" if self.tool_calls else "stop"


def created(created_at: Any) -> int:
    """Unix seconds of Ollama's ``created_at`` (RFC 3339, nanoseconds); now if unreadable."""
    if isinstance(created_at, str):
        try:
            return int(datetime.fromisoformat(created_at).timestamp())
        except ValueError:
            pass
    return int(time.time())


# -- embeddings and models ----------------------------------------------------------------


def embed_body(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The ``/api/embed`` body for an OpenAI embeddings body."""
    items = body.get("input")
    valid = isinstance(items, str) or (
        isinstance(items, list) and all(isinstance(item, str) for item in items)
    )
    if not valid:
        raise InvalidRequest(
            "'input' must be a string or an array of strings: Ollama does not take token arrays",
            "input",
        )
    payload: dict[str, Any] = {"model": model, "input": items}
    if body.get("dimensions") is not None:
        payload["dimensions"] = body["dimensions"]
    for key in ("truncate", "keep_alive"):
        if body.get(key) is not None:
            payload[key] = body[key]
    return payload


def embeddings_response(
    obj: dict[str, Any], model: str, encoding: Any
) -> tuple[bytes, str, Usage, int]:
    """(OpenAI embeddings JSON, model, usage, vector count) of an ``/api/embed`` answer."""
    vectors = obj.get("embeddings")
    if not isinstance(vectors, list) or not all(_is_vector(v) for v in vectors):
        raise UpstreamProtocolError("upstream embeddings answer has no list of vectors")
    returned = obj.get("model")
    model = returned if isinstance(returned, str) and returned else model
    prompt = count(obj.get("prompt_eval_count"))
    data = [
        {
            "object": "embedding",
            "index": index,
            # OpenAI's base64 is the float32 little-endian bytes of the vector.
            "embedding": (
                base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                if encoding == "base64"
                else vector
            ),
        }
        for index, vector in enumerate(vectors)
    ]
    raw = orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt or 0, "total_tokens": prompt or 0},
        }
    )
    return raw, model, Usage(prompt_tokens=prompt, total_tokens=prompt), len(vectors)


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is float or type(x) is int for x in value)


def model_names(obj: dict[str, Any]) -> list[str]:
    """The names ``/api/tags`` lists, exactly as Ollama spells them ("llama3.2:latest")."""
    models = obj.get("models")
    if not isinstance(models, list):
        raise UpstreamProtocolError("upstream model list has no models")
    return [
        item["name"]
        for item in models
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]


# -- errors -----------------------------------------------------------------------------


def http_error(
    status: int, body: bytes, headers: Mapping[str, str], scrub: Scrub
) -> UpstreamHTTPError:
    """The error for a non-2xx answer: Ollama's ``{"error": "..."}`` (or a proxy's page)."""
    message, _, _ = error_fields(body)
    return classified(
        status, scrub(message or f"upstream returned HTTP {status}"), retry_after(headers)
    )


def error_object(error: Any, yielded: bool, scrub: Scrub) -> UpstreamError:
    """The error for an ``{"error": ...}`` inside a 200 answer: an interruption once
    something was yielded, before that an HTTP 500."""
    message, _, _ = error_fields(orjson.dumps({"error": error}))
    message = scrub(message or "upstream reported an error")
    if yielded:
        return UpstreamInterrupted(f"upstream error mid-stream: {message}")
    return classified(500, message, None)


def classified(status: int, message: str, wait: float | None) -> UpstreamHTTPError:
    """Ollama's errors carry only a status and a text: the class is read from both."""
    lowered = message.lower()
    code: str | None = None
    error_type: str | None = None
    if status == 400 and "context" in lowered:
        code = "context_length_exceeded"
    elif status == 404 and "model" in lowered:
        code = "model_not_found"
    elif "server busy" in lowered or "overloaded" in lowered:
        error_type = "overloaded"
    return UpstreamHTTPError(
        status, message, retry_after=wait, upstream_code=code, error_type=error_type
    )
