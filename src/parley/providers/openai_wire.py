"""The OpenAI wire format, read: response JSON and stream frames to events, error bodies.

Pure functions and small parsers with no I/O, so that the adapter in ``openai`` holds only
HTTP, timeouts and connection lifecycle. Everything here is on the hot path: each frame is
parsed once with orjson, raw bytes are never re-serialised, and no regex is used.

Invariants:

- ``StreamFrames.chunk`` forwards a frame as ``data: <the JSON bytes as received>\\n\\n``.
- A refusal (``message.refusal`` / ``delta.refusal``) is the choice's text, and its
  ``stop`` is ``content_filter`` (``refused``); an OpenAI client still gets the bytes as
  sent.
- Error messages built here are cut to 500 characters and pass through the caller's
  ``scrub`` (which removes keys an upstream might echo); they never hold request headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

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
from parley.domain.usage import Usage
from parley.errors import (
    UpstreamError,
    UpstreamHTTPError,
    UpstreamInterrupted,
    UpstreamProtocolError,
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

PROTOCOL = "openai"
DONE = b"data: [DONE]\n\n"
DONE_CHUNK = Chunk(events=(), raw=DONE, protocol=PROTOCOL, final=True)


class StreamFrames:
    """What one stream has seen so far, and the parse of each of its frames."""

    __slots__ = ("_calls", "_refused", "finished", "hide_usage", "model", "scrub", "started")

    def __init__(self, model: str, hide_usage: bool, scrub: Scrub) -> None:
        self.model = model
        # The client did not ask for usage: the usage-only frame is parley's, not its.
        self.hide_usage = hide_usage
        self.scrub = scrub
        self.started = False
        self.finished: set[int] = set()
        # Per choice, the tool call being streamed: (its position, its id).
        self._calls: dict[int, tuple[int, str | None]] = {}
        # Choices whose answer is a refusal (see ``refused``).
        self._refused: set[int] = set()

    def chunk(self, payload: bytes, yielded: bool, more: bool = False) -> Chunk:
        """The chunk for one ``data`` payload (not ``[DONE]``)."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream sent a stream frame that is not JSON") from None
        if type(obj) is not dict:
            raise UpstreamProtocolError("upstream sent a stream frame that is not an object")
        choices = obj.get("choices")
        if not choices and obj.get("error"):
            raise error_object(obj["error"], yielded, self.scrub)
        events: list[Event] = []
        try:
            if not self.started and ("id" in obj or "model" in obj):
                self.started = True
                events.append(response_start(obj, self.model))
            if choices:
                for choice in choices:
                    self._choice(choice, events)
            usage = obj.get("usage")
            if usage:
                events.append(UsageReport(usage_from(usage)))
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError("upstream stream frame has an unexpected shape") from exc
        if b"\n" in payload:
            # A multi-line data field: in JSON those newlines can only be whitespace.
            payload = payload.replace(b"\n", b" ")
        return Chunk(
            events=tuple(events),
            raw=b"data: " + payload + b"\n\n",
            protocol=PROTOCOL,
            internal=self.hide_usage and not choices and bool(usage),
            more=more,
        )

    def _choice(self, choice: dict[str, Any], events: list[Event]) -> None:
        index = whole(choice.get("index", 0))
        delta = choice.get("delta")
        if delta:
            text = delta.get("content")
            if text:
                events.append(TextDelta(index, text_of(text)))
            refusal = delta.get("refusal")
            if refusal and isinstance(refusal, str):
                self._refused.add(index)
                events.append(TextDelta(index, refusal))
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning and isinstance(reasoning, str):
                events.append(ReasoningDelta(index, reasoning))
            calls = delta.get("tool_calls")
            if calls:
                events.extend(tool_call(index, call, self._position(index, call)) for call in calls)
        reason = choice.get("finish_reason")
        if reason:
            self.finished.add(index)
            events.append(Finish(index, refused(text_of(reason), index in self._refused)))

    def _position(self, choice: int, call: dict[str, Any]) -> int:
        """Where a streamed tool-call delta goes when it has no ``index`` (Google's
        OpenAI-compatible API sends parallel calls so): a new ``id`` starts the next call,
        a delta without one (or with the same) continues the current call."""
        current = self._calls.get(choice)
        call_id = call.get("id")
        if "index" in call:
            position = whole(call["index"])
        elif current is None:
            position = 0
        elif call_id is None or call_id == current[1]:
            position = current[0]
        else:
            position = current[0] + 1
        if current is None or current[0] != position or call_id is not None:
            self._calls[choice] = (position, call_id)
        return position


def completion_events(obj: dict[str, Any], model: str) -> tuple[Event, ...]:
    """Events of a whole (non-streaming) chat completion body."""
    events: list[Event] = [response_start(obj, model)]
    for position, choice in enumerate(obj["choices"]):
        index = whole(choice.get("index", position))
        message = choice.get("message") or {}
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        if content:
            events.append(TextDelta(index, text_of(content)))
        refusal = message.get("refusal")
        if refusal and isinstance(refusal, str):
            events.append(TextDelta(index, refusal))
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            events.append(ReasoningDelta(index, reasoning))
        for n, call in enumerate(message.get("tool_calls") or ()):
            events.append(tool_call(index, call, n))
        reason = text_of(choice.get("finish_reason") or "stop")
        events.append(Finish(index, refused(reason, bool(refusal))))
    if obj.get("usage"):
        events.append(UsageReport(usage_from(obj["usage"])))
    return tuple(events)


def refused(reason: str, refusal: bool) -> str:
    """The neutral finish reason of a choice. OpenAI answers a refusal (``refusal`` in
    place of ``content``, structured outputs) with ``stop``: for the record and for
    clients of other protocols it is ``content_filter``, as Anthropic's ``refusal`` is;
    its text is the answer's text, so the store keeps what the model said."""
    return "content_filter" if refusal and reason == "stop" else reason


def response_start(obj: dict[str, Any], model: str) -> ResponseStart:
    created = obj.get("created")
    return ResponseStart(
        id=str(obj.get("id") or ""),
        model=str(obj.get("model") or model),
        created=created if type(created) is int else 0,
    )


def tool_call(choice: int, call: dict[str, Any], position: int) -> ToolCallDelta:
    function = call.get("function") or {}
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):
        # A few servers send the arguments as an object; clients expect a JSON string.
        arguments = orjson.dumps(arguments).decode()
    call_id = call.get("id")
    name = function.get("name")
    return ToolCallDelta(
        choice=choice,
        index=whole(call.get("index", position)),
        id=None if call_id is None else text_of(call_id),
        name=None if name is None else text_of(name),
        arguments=arguments,
    )


def usage_from(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt = count(raw.get("prompt_tokens"))
    completion = count(raw.get("completion_tokens"))
    total = count(raw.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    cached = (
        count(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict)
        else count(raw.get("prompt_cache_hit_tokens"))  # DeepSeek's spelling
    )
    reasoning = (
        count(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None
    )
    return Usage(prompt, completion, total, cached, reasoning)


# -- errors -----------------------------------------------------------------------------


def http_error(
    status: int, body: bytes, headers: Mapping[str, str], scrub: Scrub
) -> UpstreamHTTPError:
    """The error for a non-2xx answer."""
    message, error_type, code = error_fields(body)
    return UpstreamHTTPError(
        status,
        scrub(message or f"upstream returned HTTP {status}"),
        retry_after=retry_after(headers),
        upstream_type=error_type,
        upstream_code=code,
    )


def error_object(error: Any, yielded: bool, scrub: Scrub) -> UpstreamError:
    """The error for an ``{"error": ...}`` inside a 200 answer (stream frame or body).

    Once chunks were yielded it is an interruption; before, an HTTP error whose status is
    the object's ``code`` when that is an HTTP status (vLLM sends 400), else 500.
    """
    message, error_type, code = error_fields(orjson.dumps({"error": error}))
    message = scrub(message or "upstream reported an error")
    if yielded:
        return UpstreamInterrupted(f"upstream error mid-stream: {message}")
    raw_code = error.get("code") if isinstance(error, dict) else None
    status = raw_code if type(raw_code) is int and 400 <= raw_code < 600 else 500
    return UpstreamHTTPError(status, message, upstream_type=error_type, upstream_code=code)


def error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, code) from an OpenAI-style error body, else a short text excerpt."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        error = obj.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            return (
                short(error.get("message")),
                opt_str(error.get("type")),
                None if code is None else str(code),
            )
        if isinstance(error, str):  # HF TGI: {"error": "...", "error_type": "..."}
            return short(error), opt_str(obj.get("error_type")), None
        for key in ("message", "detail"):
            if key in obj:
                return short(obj[key]), None, None
    excerpt = body[: MAX_MESSAGE * 4].decode("utf-8", "replace").strip()
    return excerpt[:MAX_MESSAGE], None, None
