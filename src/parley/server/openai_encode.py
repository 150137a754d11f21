"""Encoding provider-neutral events as OpenAI chat completions.

Used when the upstream does not speak OpenAI (an Anthropic, Gemini or Ollama adapter) and
the client does: one ``OpenAIEncoder`` per response turns the chunks' events into
``chat.completion.chunk`` SSE frames, or all the events of a non-streaming answer into one
``chat.completion`` body. When client and upstream both speak OpenAI the server forwards
the upstream bytes instead and never calls this module.

Invariants:

- every frame of a response carries the same ``id``, ``created`` and ``model``, taken from
  the first ``ResponseStart`` (an id is generated when the upstream gave none);
- the first delta of each choice carries ``role: "assistant"``;
- tool calls are renumbered per choice in order of appearance (0, 1, ...), as OpenAI
  clients index them, whatever index the upstream used;
- reasoning goes out as ``reasoning_content`` (the convention of DeepSeek, vLLM and others);
- the usage-only frame (``choices: []``) is sent only when the client asked for it
  (``stream_options.include_usage``), just before ``data: [DONE]``, which ends the final
  chunk's frames.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
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
from parley.errors import ParleyError

DONE = b"data: [DONE]\n\n"

# Finish reasons of other protocols that an adapter may pass on unmapped.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def finish_reason(reason: str) -> str:
    """The OpenAI finish reason for a neutral one."""
    return _FINISH_REASONS.get(reason, reason)


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``usage`` object; the detail objects only when the upstream reported them."""
    prompt = usage.prompt_tokens or 0
    completion = usage.completion_tokens or 0
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.total_tokens
        if usage.total_tokens is not None
        else prompt + completion,
    }
    if usage.cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def sse_error(error: ParleyError) -> bytes:
    # Data-only, as OpenAI sends it: the SDKs raise on a data payload with an "error" key.
    return b"data: " + orjson.dumps(error.to_openai()) + b"\n\n"


@dataclass(slots=True)
class _Call:
    id: str
    name: str
    # The index OpenAI clients see: order of appearance within the choice.
    position: int
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish: str | None = None
    # Streaming: the role went out with this choice's first delta.
    announced: bool = False


class OpenAIEncoder:
    """Encodes one response. ``model`` is used when the upstream names none."""

    __slots__ = ("_choices", "_created", "_id", "_include_usage", "_model", "_started", "_usage")

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self._id = ""
        self._model = model
        self._created = 0
        self._started = False
        self._include_usage = include_usage
        self._usage: Usage | None = None
        self._choices: dict[int, _Choice] = {}

    # -- whole responses --------------------------------------------------------------

    def body(self, chunk: Chunk) -> bytes:
        """A ``chat.completion`` body from the events of a non-streaming answer."""
        self._fold(chunk.events)
        choices = self._choices or {0: _Choice()}
        out: dict[str, Any] = {
            **self._head("chat.completion"),
            "choices": [self._message(index, choice) for index, choice in sorted(choices.items())],
        }
        if self._usage is not None:
            out["usage"] = usage_json(self._usage)
        return orjson.dumps(out)

    def _fold(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, TextDelta):
                self._choice(event.choice).text.append(event.text)
            elif isinstance(event, ToolCallDelta):
                self._call(self._choice(event.choice), event).arguments.append(event.arguments)
            elif isinstance(event, ReasoningDelta):
                self._choice(event.choice).reasoning.append(event.text)
            elif isinstance(event, Finish):
                self._choice(event.choice).finish = finish_reason(event.reason)
            elif isinstance(event, UsageReport):
                self._usage = event.usage
            elif isinstance(event, ResponseStart):
                self._start(event)

    def _message(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text if text or not choice.calls else None,
        }
        if choice.reasoning:
            message["reasoning_content"] = "".join(choice.reasoning)
        if choice.calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                }
                for call in choice.calls.values()
            ]
        return {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": choice.finish or ("tool_calls" if choice.calls else "stop"),
        }

    # -- streams ----------------------------------------------------------------------

    def frames(self, chunk: Chunk) -> bytes:
        """The SSE frames for one chunk of a stream; the final chunk ends with [DONE]."""
        deltas: dict[int, dict[str, Any]] = {}
        finished: dict[int, str] = {}
        for event in chunk.events:
            if isinstance(event, TextDelta):
                delta = self._delta(deltas, event.choice)
                delta["content"] = delta.get("content", "") + event.text
            elif isinstance(event, ToolCallDelta):
                self._tool_delta(self._delta(deltas, event.choice), event)
            elif isinstance(event, ReasoningDelta):
                delta = self._delta(deltas, event.choice)
                delta["reasoning_content"] = delta.get("reasoning_content", "") + event.text
            elif isinstance(event, Finish):
                self._delta(deltas, event.choice)
                finished[event.choice] = finish_reason(event.reason)
            elif isinstance(event, UsageReport):
                self._usage = event.usage
            elif isinstance(event, ResponseStart):
                self._start(event)
        out = [
            self._frame(
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finished.get(index),
                }
            )
            for index, delta in deltas.items()
        ]
        if chunk.final:
            if self._include_usage and self._usage is not None:
                out.append(self._frame(None))
            out.append(DONE)
        return b"".join(out)

    def _delta(self, deltas: dict[int, dict[str, Any]], index: int) -> dict[str, Any]:
        delta = deltas.get(index)
        if delta is None:
            choice = self._choice(index)
            delta = deltas[index] = {} if choice.announced else {"role": "assistant"}
            choice.announced = True
        return delta

    def _tool_delta(self, delta: dict[str, Any], event: ToolCallDelta) -> None:
        choice = self._choices[event.choice]
        known = event.index in choice.calls
        call = self._call(choice, event)
        position = call.position
        entries: list[dict[str, Any]] = delta.setdefault("tool_calls", [])
        if entries and entries[-1]["index"] == position:
            entries[-1]["function"]["arguments"] += event.arguments
            return
        entry: dict[str, Any] = {"index": position}
        function: dict[str, Any] = {"arguments": event.arguments}
        if not known:
            entry["id"] = call.id
            entry["type"] = "function"
            function["name"] = call.name
        elif event.name and not call.name:
            # The upstream named the tool after its first fragment.
            call.name = function["name"] = event.name
        entry["function"] = function
        entries.append(entry)

    def _frame(self, choice: dict[str, Any] | None) -> bytes:
        obj: dict[str, Any] = self._head("chat.completion.chunk")
        if choice is None:
            obj["choices"] = []
            assert self._usage is not None
            obj["usage"] = usage_json(self._usage)
        else:
            obj["choices"] = [choice]
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    # -- shared -----------------------------------------------------------------------

    def _start(self, event: ResponseStart) -> None:
        # Frames already sent named the response: later starts cannot rename it.
        if self._started:
            return
        self._started = True
        self._id = event.id
        self._model = event.model or self._model
        self._created = event.created

    def _head(self, kind: str) -> dict[str, Any]:
        if not self._id:
            self._id = f"chatcmpl-{uuid.uuid4().hex}"
        if not self._created:
            self._created = int(time.time())
        self._started = True
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model}

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
        return choice

    @staticmethod
    def _call(choice: _Choice, event: ToolCallDelta) -> _Call:
        call = choice.calls.get(event.index)
        if call is None:
            call = choice.calls[event.index] = _Call(
                id=event.id or f"call_{uuid.uuid4().hex[:24]}",
                name=event.name or "",
                position=len(choice.calls),
            )
        return call
