"""Folding one attempt's stream events into its ``Attempt`` row and the exchange's answers.

A ``Fold`` watches every chunk that passes from an adapter to the client. It measures time
to first token (the first chunk carrying text, reasoning or a tool call), time to last
token and tokens per second, keeps usage and finish reasons, and reassembles the answers
(text and tool calls per choice) so the store can save them as messages. It never alters
the chunks. A stream that ends without the upstream's usage (cut off) gets an estimate,
marked ``usage_estimated``, so that limits and budgets count partial streams too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from parley.domain.events import (
    Chunk,
    Finish,
    ReasoningDelta,
    ResponseStart,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from parley.domain.exchange import Attempt, Choice, Exchange
from parley.domain.messages import ToolCall
from parley.domain.usage import Usage
from parley.errors import ClientError, ParleyError, UpstreamError
from parley.gateway.pricing import PriceBook

# An attempt's error message is kept to this many characters.
ERROR_MESSAGE_CHARS = 2000

# What an answer cut off by the server's shutdown records: distinct from a client that
# left ("cancelled", "client_disconnected") and from an upstream that broke ("interrupted",
# "error").
INTERRUPTED_ERROR_TYPE = "interrupted"
INTERRUPTED_FINISH_REASON = "server_shutdown"
INTERRUPTED_MESSAGE = "the server shut down before the answer was complete"


@dataclass(slots=True)
class _ToolCallParts:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _ChoiceParts:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCallParts] = field(default_factory=dict)
    finish_reason: str | None = None


class Fold:
    """Accumulates one attempt. ``feed`` every chunk, then ``finish``, ``fail`` or
    ``cancel``: the first of them decides the outcome, later calls change nothing."""

    __slots__ = (
        "_choices",
        "_closed",
        "_fed",
        "_first",
        "_last",
        "_prices",
        "_sent_model",
        "_start",
        "attempt",
        "exchange",
    )

    def __init__(self, exchange: Exchange, attempt: Attempt, prices: PriceBook) -> None:
        self.exchange = exchange
        self.attempt = attempt
        self._prices = prices
        # Priced by the name parley sent; the upstream may report a dated variant.
        self._sent_model = attempt.model_used
        self._start = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._choices: dict[int, _ChoiceParts] = {}
        self._closed = False
        # Whether the upstream answered at all (a chunk came): a cancelled attempt has a
        # status only then.
        self._fed = False

    def feed(self, chunk: Chunk) -> None:
        self._fed = True
        if not chunk.events:
            return
        now = time.perf_counter()
        for event in chunk.events:
            if isinstance(event, TextDelta):
                self._part(event.choice).text.append(event.text)
                self._token_at(now)
            elif isinstance(event, ToolCallDelta):
                call = self._part(event.choice).tool_calls.setdefault(event.index, _ToolCallParts())
                call.id = call.id or event.id
                call.name = call.name or event.name
                call.arguments.append(event.arguments)
                self._token_at(now)
            elif isinstance(event, ReasoningDelta):
                self._part(event.choice).reasoning.append(event.text)
                self._token_at(now)
            elif isinstance(event, Finish):
                self._part(event.choice).finish_reason = event.reason
            elif isinstance(event, UsageReport):
                self.attempt.usage = event.usage
            elif isinstance(event, ResponseStart):
                self.attempt.upstream_id = event.id or None
                if event.model:
                    self.attempt.model_used = event.model

    def _part(self, index: int) -> _ChoiceParts:
        part = self._choices.get(index)
        if part is None:
            part = self._choices[index] = _ChoiceParts()
        return part

    def _token_at(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    def finish(self, status_code: int = 200) -> None:
        """The attempt completed normally."""
        if self._closed:
            return
        self.attempt.success = True
        self.attempt.status_code = status_code
        self._close()

    def fail(self, error: ParleyError, *, finish_reason: str | None = None) -> None:
        """The attempt failed; ``finish_reason`` is set when a stream had started."""
        if self._closed:
            return
        self.attempt.success = False
        if isinstance(error, UpstreamError):
            # A stream that broke after its first events was answered with a 200, as a
            # cancelled one records; the error says how it ended.
            fed = 200 if self._fed else None
            self.attempt.status_code = error.status_code or fed
        elif isinstance(error, ClientError):
            # Refused by parley before it was sent: the status parley answers for it.
            self.attempt.status_code = error.status
        self.attempt.error_type = error.error_type
        self.attempt.error_message = error.message[:ERROR_MESSAGE_CHARS]
        self.attempt.finish_reason = finish_reason
        self._close()

    def cancel(self, reason: str = "client_disconnected") -> None:
        """The client went away before the answer was complete; the upstream call was
        cancelled (or never sent: a retry the client did not wait for)."""
        if self._closed:
            return
        self.attempt.success = False
        if self._fed:
            self.attempt.status_code = 200
        self.attempt.error_type = "cancelled"
        self.attempt.error_message = "client disconnected before the answer was complete"
        self.attempt.finish_reason = reason
        self._close()

    def _close(self) -> None:
        self._closed = True
        end = time.perf_counter()
        attempt = self.attempt
        attempt.response_time_ms = (end - self._start) * 1000
        if self._first is not None and self.exchange.is_streaming:
            attempt.time_to_first_token_ms = (self._first - self._start) * 1000
            attempt.time_to_last_token_ms = ((self._last or self._first) - self._start) * 1000
        completion = attempt.usage.completion_tokens
        if completion:
            if (
                self.exchange.is_streaming
                and self._first is not None
                and self._last is not None
                and self._last > self._first
            ):
                attempt.tokens_per_second = completion / (self._last - self._first)
            elif attempt.response_time_ms > 0:
                attempt.tokens_per_second = completion / (attempt.response_time_ms / 1000)
        if (
            not attempt.success
            and self._fed
            and self.exchange.is_streaming
            and attempt.usage.completion_tokens is None
        ):
            # Cut off before the upstream reported usage: what it bills still counts
            # against limits and budgets, as an estimate that says it is one.
            attempt.usage = self._estimate(attempt.usage)
            attempt.usage_estimated = True
        price = self._prices.price(attempt.provider, self._sent_model) or self._prices.price(
            attempt.provider, attempt.model_used
        )
        attempt.cost_usd = None if price is None else price.cost(attempt.usage)
        if self._choices:
            if attempt.finish_reason is None:
                attempt.finish_reason = self._choices[min(self._choices)].finish_reason
            self.exchange.choices = [
                self._choice(index, parts, attempt.finish_reason)
                for index, parts in sorted(self._choices.items())
            ]

    def _estimate(self, reported: Usage) -> Usage:
        """Tokens at ~4 characters each (OpenAI's rule of thumb for English): the prompt
        from the request's messages, unless the upstream reported it, and the completion
        from what was streamed (text, reasoning and tool-call arguments)."""
        streamed = 0
        for part in self._choices.values():
            streamed += sum(map(len, part.text)) + sum(map(len, part.reasoning))
            for call in part.tool_calls.values():
                streamed += sum(map(len, call.arguments))
        prompt = reported.prompt_tokens
        if prompt is None:
            prompt = _tokens(sum(len(message.text()) for message in self.exchange.messages))
        completion = _tokens(streamed)
        total = prompt + completion
        return replace(
            reported, prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
        )

    def _choice(self, index: int, parts: _ChoiceParts, fallback: str | None) -> Choice:
        calls = tuple(
            ToolCall(id=call.id or "", name=call.name or "", arguments="".join(call.arguments))
            for _, call in sorted(parts.tool_calls.items())
        )
        return Choice(
            index=index,
            text="".join(parts.text),
            reasoning="".join(parts.reasoning),
            tool_calls=calls,
            # A stream cut short keeps the reason it was cut as the answer's finish reason.
            finish_reason=parts.finish_reason if self.attempt.success else fallback,
        )


def _tokens(characters: int) -> int:
    return (characters + 3) // 4


def mark_interrupted(exchange: Exchange) -> None:
    """Record the last attempt as cut off by the shutdown rather than by its client.

    The gateway closes an abandoned stream as ``cancelled`` / ``client_disconnected``: it
    cannot tell why its consumer stopped. Only an attempt that ended that way is changed.
    """
    if not exchange.attempts:
        return
    attempt = exchange.attempts[-1]
    if attempt.error_type != "cancelled":
        return
    cancelled_reason = attempt.finish_reason
    attempt.error_type = INTERRUPTED_ERROR_TYPE
    attempt.finish_reason = INTERRUPTED_FINISH_REASON
    attempt.error_message = INTERRUPTED_MESSAGE
    for choice in exchange.choices:
        if choice.finish_reason == cancelled_reason:
            choice.finish_reason = INTERRUPTED_FINISH_REASON
