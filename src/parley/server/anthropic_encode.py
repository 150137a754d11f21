"""Encoding provider-neutral events as Anthropic Messages API responses, and errors.

Used when an Anthropic client (``/v1/messages``) is served by an upstream that does not
speak Anthropic; an Anthropic upstream's bytes are forwarded instead. One
``AnthropicEncoder`` per response builds either the whole ``message`` body or the SSE
stream (``event: <type>\\ndata: <json>\\n\\n``).

Invariants and choices where the protocols differ:

- only choice 0 is encoded (Anthropic has no ``n``);
- content blocks come in the order the upstream produced them in a stream; a whole body
  holds ``thinking``, then ``text``, then the ``tool_use`` blocks;
- stop reasons: stop -> ``end_turn``, length -> ``max_tokens``, tool_calls ->
  ``tool_use``, content_filter -> ``refusal``; an answer with tool calls always stops with
  ``tool_use`` (some OpenAI-compatible servers say "stop"), since Anthropic clients run
  tools on that signal. ``stop_sequence`` is never set: the neutral events do not say
  which sequence matched;
- usage: ``input_tokens`` excludes cache reads (Anthropic counts them apart, in
  ``cache_read_input_tokens``);
- ``message_start`` carries the input tokens known by then (0 if none); ``message_delta``
  is held until usage arrives after the finish, or until the final chunk, whichever comes
  first; ``message_stop`` ends the final chunk's frames;
- tool-call arguments that are not a JSON object raise ``UpstreamProtocolError``: a
  whole body cannot be built, and a stream ends in an error event in place of
  ``message_delta`` (its deltas are already out);
- a thinking block has an empty ``signature``: parley cannot sign reasoning, so such a
  block cannot be replayed to Anthropic itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from parley.domain.events import (
    Chunk,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.messages import arguments_object
from parley.domain.usage import Usage
from parley.errors import ParleyError, UpstreamProtocolError

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ANTHROPIC_STOP_REASONS = frozenset(
    {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"}
)


def error_body(error: ParleyError) -> dict[str, Any]:
    """Anthropic's error JSON for ``error``, its type chosen by the HTTP status."""
    kind = _ERROR_TYPES.get(error.status)
    if kind is None:
        kind = "overloaded_error" if error.error_type == "overloaded" else "api_error"
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def sse_error(error: ParleyError) -> bytes:
    """The ``error`` event that ends a stream which broke after it began."""
    kind = "overloaded_error" if error.error_type == "overloaded" else "api_error"
    body = {"type": "error", "error": {"type": kind, "message": error.message}}
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


def stop_reason(reason: str | None, tool_use: bool) -> str:
    if tool_use:
        return "tool_use"
    if reason is None:
        return "end_turn"
    if reason in _ANTHROPIC_STOP_REASONS:
        return reason
    return _STOP_REASONS.get(reason, "end_turn")


def usage_json(usage: Usage | None, *, start: bool = False) -> dict[str, Any]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0} if start else {"output_tokens": 0}
    cached = usage.cached_tokens
    out: dict[str, Any] = {
        "input_tokens": max(0, (usage.prompt_tokens or 0) - (cached or 0)),
        "output_tokens": 0 if start else usage.completion_tokens or 0,
    }
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    return out


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


@dataclass(slots=True)
class _Tool:
    id: str
    name: str
    block: int
    arguments: list[str] = field(default_factory=list)


class AnthropicEncoder:
    """Encodes one response. ``model`` is used when the upstream names none."""

    __slots__ = (
        "_delta_sent",
        "_id",
        "_model",
        "_next_block",
        "_open",
        "_open_kind",
        "_reasoning",
        "_started",
        "_stop",
        "_text",
        "_tools",
        "_usage",
    )

    def __init__(self, model: str) -> None:
        self._id = f"msg_{uuid.uuid4().hex}"
        self._model = model
        self._started = False
        self._usage: Usage | None = None
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, _Tool] = {}
        self._stop: str | None = None
        # Streaming: the open content block (index and kind), the next block's index.
        self._open = -1
        self._open_kind = ""
        self._next_block = 0
        self._delta_sent = False

    # -- whole responses --------------------------------------------------------------

    def body(self, chunk: Chunk) -> bytes:
        """The ``message`` body from the events of a non-streaming answer."""
        for event in chunk.events:
            if isinstance(event, TextDelta):
                if event.choice == 0:
                    self._text.append(event.text)
            elif isinstance(event, ToolCallDelta):
                if event.choice == 0:
                    self._tool(event).arguments.append(event.arguments)
            elif isinstance(event, ReasoningDelta):
                if event.choice == 0:
                    self._reasoning.append(event.text)
            elif isinstance(event, Finish):
                if event.choice == 0:
                    self._stop = event.reason
            elif isinstance(event, UsageReport):
                self._usage = event.usage
            elif isinstance(event, ResponseStart):
                self._model = event.model or self._model
        content: list[dict[str, Any]] = []
        if self._reasoning:
            content.append(
                {"type": "thinking", "thinking": "".join(self._reasoning), "signature": ""}
            )
        if self._text:
            content.append({"type": "text", "text": "".join(self._text)})
        content.extend(
            {"type": "tool_use", "id": tool.id, "name": tool.name, "input": _input(tool)}
            for tool in self._tools.values()
        )
        message = self._message(content)
        message["stop_reason"] = stop_reason(self._stop, bool(self._tools))
        message["usage"] = usage_json(self._usage)
        return orjson.dumps(message)

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
        }

    # -- streams ----------------------------------------------------------------------

    def frames(self, chunk: Chunk) -> bytes:
        """The SSE events for one chunk; the final chunk ends with ``message_stop``."""
        out: list[bytes] = []
        events = chunk.events
        if not self._started:
            self._started = True
            for event in events:
                if isinstance(event, ResponseStart):
                    self._model = event.model or self._model
                elif isinstance(event, UsageReport):
                    self._usage = event.usage
            message = self._message([])
            message["usage"] = usage_json(self._usage, start=True)
            out.append(_event("message_start", {"type": "message_start", "message": message}))
        usage_now = False
        for event in events:
            if isinstance(event, TextDelta):
                if event.choice == 0 and event.text:
                    self._block(out, "text", {"type": "text", "text": ""})
                    self._delta(out, self._open, {"type": "text_delta", "text": event.text})
            elif isinstance(event, ToolCallDelta):
                if event.choice == 0:
                    self._tool_delta(out, event)
            elif isinstance(event, ReasoningDelta):
                if event.choice == 0 and event.text:
                    start = {"type": "thinking", "thinking": "", "signature": ""}
                    self._block(out, "thinking", start)
                    delta = {"type": "thinking_delta", "thinking": event.text}
                    self._delta(out, self._open, delta)
            elif isinstance(event, Finish):
                if event.choice == 0:
                    self._close(out)
                    self._stop = event.reason
            elif isinstance(event, UsageReport):
                self._usage = event.usage
                usage_now = True
        if not self._delta_sent and (chunk.final or (usage_now and self._stop is not None)):
            self._close(out)
            for tool in self._tools.values():
                # Raises for arguments that are not a JSON object: the stream then ends
                # in an error event, never in a tool_use whose input the SDK made up.
                _input(tool)
            self._message_delta(out)
        if chunk.final:
            out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def _tool_delta(self, out: list[bytes], event: ToolCallDelta) -> None:
        tool = self._tools.get(event.index)
        if tool is None:
            self._close(out)
            tool = self._tool(event)
            start = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
            self._start_block(out, "tool_use", start)
            tool.block = self._open
        if event.arguments:
            tool.arguments.append(event.arguments)
            # A fragment of an earlier call after another block began still names its
            # own block: SDKs file deltas by index.
            delta = {"type": "input_json_delta", "partial_json": event.arguments}
            self._delta(out, tool.block, delta)

    def _block(self, out: list[bytes], kind: str, start: dict[str, Any]) -> None:
        if self._open_kind != kind:
            self._close(out)
            self._start_block(out, kind, start)

    def _start_block(self, out: list[bytes], kind: str, start: dict[str, Any]) -> None:
        self._open = self._next_block
        self._open_kind = kind
        self._next_block += 1
        body = {"type": "content_block_start", "index": self._open, "content_block": start}
        out.append(_event("content_block_start", body))

    def _delta(self, out: list[bytes], index: int, delta: dict[str, Any]) -> None:
        body = {"type": "content_block_delta", "index": index, "delta": delta}
        out.append(_event("content_block_delta", body))

    def _close(self, out: list[bytes]) -> None:
        if self._open_kind:
            body = {"type": "content_block_stop", "index": self._open}
            out.append(_event("content_block_stop", body))
            self._open_kind = ""

    def _message_delta(self, out: list[bytes]) -> None:
        self._delta_sent = True
        body = {
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason(self._stop, bool(self._tools)),
                "stop_sequence": None,
            },
            "usage": usage_json(self._usage),
        }
        out.append(_event("message_delta", body))

    # -- shared -----------------------------------------------------------------------

    def _tool(self, event: ToolCallDelta) -> _Tool:
        tool = self._tools.get(event.index)
        if tool is None:
            tool = self._tools[event.index] = _Tool(
                id=event.id or f"toolu_{uuid.uuid4().hex[:24]}",
                name=event.name or "",
                block=-1,
            )
        return tool


def _input(tool: _Tool) -> dict[str, Any]:
    value = arguments_object("".join(tool.arguments))
    if value is None:
        raise UpstreamProtocolError(
            f"the upstream's arguments for tool '{tool.name}' are not a JSON object"
        )
    return value
