"""The Gemini wire format, read: ``generateContent`` answers to events, error bodies.

Pure functions and small parsers with no I/O, so that the adapter in ``gemini`` holds only
HTTP, timeouts and connection lifecycle; requests are built by ``gemini_request``.

Responses (``ResponseReader``): finish reasons map as follows (OpenAI's vocabulary)::

    STOP                                  stop ("tool_calls" when the candidate called a function)
    MAX_TOKENS                            length
    SAFETY, RECITATION, BLOCKLIST,        content_filter
    PROHIBITED_CONTENT, SPII, IMAGE_*
    MALFORMED_FUNCTION_CALL, LANGUAGE,    stop
    OTHER, anything else

Gemini has no tool call ids: each call gets ``call_<tag>_<n>``, ``tag`` derived from the
response id and ``n`` counting the calls of the response, so ids are stable within a
response and do not repeat across the turns of a conversation.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from parley.domain.events import (
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
    interrupted,
)
from parley.providers.wire import MAX_MESSAGE, Scrub, count, opt_str, retry_after, short, text_of

PROTOCOL = "gemini"

_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
# google.rpc status -> HTTP status, for an error object whose ``code`` is missing.
_STATUS_CODES = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


# -- responses ---------------------------------------------------------------------------


def finish_reason(reason: str, called: bool) -> str:
    """OpenAI's finish reason for Gemini's (see the table in the module docstring)."""
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    return "tool_calls" if called else "stop"


def usage_from(raw: Any) -> Usage:
    """Gemini's ``usageMetadata``: completion includes thoughts, as OpenAI counts reasoning;
    prompt includes cached content and tool-use prompt tokens."""
    if not isinstance(raw, dict):
        return Usage()
    prompt = count(raw.get("promptTokenCount"))
    tool_prompt = count(raw.get("toolUsePromptTokenCount"))
    if prompt is not None and tool_prompt:
        prompt += tool_prompt
    candidates = count(raw.get("candidatesTokenCount"))
    thoughts = count(raw.get("thoughtsTokenCount"))
    completion = (
        None if candidates is None and thoughts is None else (candidates or 0) + (thoughts or 0)
    )
    total = count(raw.get("totalTokenCount"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    return Usage(prompt, completion, total, count(raw.get("cachedContentTokenCount")), thoughts)


class ResponseReader:
    """Turns one response's ``GenerateContentResponse`` objects (a whole body, or each
    stream frame) into events, remembering what the response has produced so far."""

    __slots__ = (
        "calls",
        "content",
        "finished",
        "model",
        "reasons",
        "scrub",
        "seen",
        "sent",
        "started",
        "tag",
        "usage",
    )

    def __init__(self, model: str, scrub: Scrub) -> None:
        self.model = model
        self.scrub = scrub
        self.started = False
        self.tag = ""
        self.calls: dict[int, int] = {}  # choice -> function calls so far
        self.content: set[int] = set()  # choices that produced any output
        self.seen: set[int] = set()
        self.finished: set[int] = set()
        self.reasons: dict[int, str] = {}  # choice -> Gemini's finish reason
        self.usage: Usage | None = None
        self.sent: Usage | None = None

    def frame(self, payload: bytes, yielded: bool) -> tuple[Event, ...]:
        """The events of one stream frame; () when it carries none."""
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream sent a stream frame that is not JSON") from None
        if type(obj) is not dict:
            raise UpstreamProtocolError("upstream sent a stream frame that is not an object")
        return self.read(obj, yielded)

    def read(self, obj: dict[str, Any], yielded: bool) -> tuple[Event, ...]:
        """The events of one response object. Raises the upstream's error, or a content
        filter error when the prompt or the whole answer was blocked before any output."""
        candidates = obj.get("candidates")
        if not candidates:
            if obj.get("error"):
                raise error_object(obj["error"], yielded, self.scrub)
            feedback = obj.get("promptFeedback")
            block = feedback.get("blockReason") if isinstance(feedback, dict) else None
            if block:
                raise blocked(f"the prompt was blocked (blockReason {short(block)})", yielded)
        # Call ids derive from the response id: set before the first call is read.
        self.tag = self.tag or _tag(opt_str(obj.get("responseId")))
        events: list[Event] = []
        try:
            for position, candidate in enumerate(candidates or ()):
                self._candidate(candidate, position, events)
            if "usageMetadata" in obj:
                self.usage = usage_from(obj["usageMetadata"])
        except (AttributeError, TypeError, ValueError) as exc:
            raise UpstreamProtocolError("upstream response has an unexpected shape") from exc
        if (
            not yielded
            and not self.content
            and self.complete()
            and all(self.reasons[i] in _FILTERED for i in self.finished)
        ):
            reasons = ", ".join(sorted({self.reasons[i] for i in self.finished}))
            raise blocked(f"the answer was blocked (finishReason {reasons})", yielded)
        if events and not self.started:
            self.started = True
            events.insert(0, self._start(obj))
        if self.complete() and self.usage is not None and self.usage != self.sent:
            self.sent = self.usage
            events.append(UsageReport(self.usage))
        return tuple(events)

    def complete(self) -> bool:
        """Every candidate seen so far has finished (and there was one)."""
        return bool(self.seen) and self.finished >= self.seen

    def closing(self) -> tuple[Event, ...]:
        """At the end of the response: a finish for a candidate that came without one
        (a whole body is complete by definition), and usage not reported yet."""
        events: list[Event] = [
            Finish(index, finish_reason("STOP", self.calls.get(index, 0) > 0))
            for index in sorted(self.seen - self.finished)
        ]
        self.finished |= self.seen
        if self.usage is not None and self.usage != self.sent:
            self.sent = self.usage
            events.append(UsageReport(self.usage))
        return tuple(events)

    def _start(self, obj: dict[str, Any]) -> ResponseStart:
        response_id = opt_str(obj.get("responseId"))
        return ResponseStart(
            id=response_id or f"gemini-{self.tag}",
            model=opt_str(obj.get("modelVersion")) or self.model,
            created=int(time.time()),
        )

    def _candidate(self, candidate: dict[str, Any], position: int, events: list[Event]) -> None:
        index = candidate.get("index", position)
        if type(index) is not int:
            raise ValueError("candidate index is not an integer")
        self.seen.add(index)
        content = candidate.get("content")
        for part in (content.get("parts") if content else None) or ():
            if "text" in part:
                text = text_of(part["text"])
                if text:
                    self.content.add(index)
                    thought = part.get("thought") is True
                    events.append(
                        ReasoningDelta(index, text) if thought else TextDelta(index, text)
                    )
            elif "functionCall" in part:
                events.append(self._call(index, part["functionCall"]))
        reason = candidate.get("finishReason")
        if reason and index not in self.finished:
            self.finished.add(index)
            self.reasons[index] = text_of(reason)
            called = self.calls.get(index, 0) > 0
            events.append(Finish(index, finish_reason(self.reasons[index], called)))

    def _call(self, index: int, call: dict[str, Any]) -> ToolCallDelta:
        self.content.add(index)
        number = self.calls.get(index, 0)
        self.calls[index] = number + 1
        # ``n`` counts the calls of the whole response, so ids differ across choices too.
        n = sum(self.calls.values()) - 1
        call_id = opt_str(call.get("id")) or f"call_{self.tag}_{n}"
        args = call.get("args")
        return ToolCallDelta(
            choice=index,
            index=number,
            id=call_id,
            name=text_of(call.get("name")),
            arguments=orjson.dumps(args if args is not None else {}).decode(),
        )


def _tag(response_id: str | None) -> str:
    if response_id:
        return hashlib.sha256(response_id.encode()).hexdigest()[:8]
    return uuid.uuid4().hex[:8]


# -- errors ------------------------------------------------------------------------------


def blocked(why: str, yielded: bool) -> UpstreamError:
    """A safety block: a final 400 of type content_filter (never worth a retry)."""
    message = f"upstream safety filters: {why}"
    if yielded:
        return UpstreamInterrupted(message)
    return UpstreamHTTPError(
        400, message, upstream_code="content_filter", error_type="content_filter"
    )


def http_error(
    status: int, body: bytes, headers: Mapping[str, str], scrub: Scrub
) -> UpstreamHTTPError:
    """The error for a non-2xx answer (``{"error": {"code", "message", "status"}}``)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        excerpt = body[: MAX_MESSAGE * 4].decode("utf-8", "replace").strip()[:MAX_MESSAGE]
        return UpstreamHTTPError(
            status,
            scrub(excerpt or f"upstream returned HTTP {status}"),
            retry_after=retry_after(headers),
        )
    return _error(status, error, headers, scrub)


def error_object(error: Any, yielded: bool, scrub: Scrub) -> UpstreamError:
    """The error for an ``{"error": ...}`` inside a 200 answer (body or stream frame)."""
    error = error if isinstance(error, dict) else {"message": short(error)}
    if yielded:
        message = scrub(short(error.get("message")) or "upstream reported an error")
        overloaded = error.get("status") == "UNAVAILABLE" or error.get("code") == 503
        return interrupted(f"upstream error mid-stream: {message}", overloaded=overloaded)
    code = error.get("code")
    status = (
        code
        if type(code) is int and 400 <= code < 600
        else _STATUS_CODES.get(str(error.get("status")), 500)
    )
    return _error(status, error, {}, scrub)


def _error(
    status: int, error: dict[str, Any], headers: Mapping[str, str], scrub: Scrub
) -> UpstreamHTTPError:
    message = short(error.get("message")) or f"upstream returned HTTP {status}"
    kind = opt_str(error.get("status"))
    details = error.get("details")
    details = [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []
    reasons = [d["reason"] for d in details if isinstance(d.get("reason"), str)]
    code = reasons[0] if reasons else None
    error_type = None
    if "API_KEY_INVALID" in reasons:
        # Gemini answers a wrong key with 400; it is parley's credentials, not the request.
        status, error_type = 401, "authentication"
    elif status == 400 and _about_context(message):
        error_type, code = "context_length", "context_length_exceeded"
    elif kind == "UNAVAILABLE":
        error_type = "overloaded"
    delay = retry_after(headers)
    return UpstreamHTTPError(
        status,
        scrub(message),
        retry_after=delay if delay is not None else _retry_delay(details),
        upstream_type=kind,
        upstream_code=code,
        error_type=error_type,
    )


def _about_context(message: str) -> bool:
    # "The input token count (N) exceeds the maximum number of tokens allowed (M)."; a
    # bad maxOutputTokens also names tokens, but not the input.
    lowered = message.lower()
    return (
        "token" in lowered
        and any(w in lowered for w in ("input", "prompt", "context"))
        and any(w in lowered for w in ("exceed", "limit", "too long", "maximum"))
    )


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """``RetryInfo.retryDelay`` ("12s", "0.5s") from a google.rpc error's details."""
    for detail in details:
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None
