"""Provider-neutral stream events, and the chunks adapters yield.

An adapter turns upstream bytes into ``Chunk``s. Each chunk carries the events parsed from
one upstream frame (an SSE event, an NDJSON line, or a whole non-streaming body) and, when
the upstream speaks a client protocol, the frame's raw bytes so the server can pass them
through untouched. The recorder folds the events; the server either forwards ``raw`` or
encodes the events in the client's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from parley.domain.usage import Usage


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """Identity of the upstream response (first chunk that carries it)."""

    id: str
    model: str
    created: int


@dataclass(frozen=True, slots=True)
class TextDelta:
    choice: int
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    choice: int
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    choice: int
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class UsageReport:
    usage: Usage


@dataclass(frozen=True, slots=True)
class Finish:
    choice: int
    reason: str


Event = ResponseStart | TextDelta | ReasoningDelta | ToolCallDelta | UsageReport | Finish


@dataclass(frozen=True, slots=True)
class Chunk:
    """Events from one upstream frame; ``raw`` is the frame's bytes in ``protocol``."""

    events: tuple[Event, ...]
    raw: bytes | None = None
    protocol: str | None = None
    # True for the frame that ends the stream (``data: [DONE]``): held back until the
    # record is committed.
    final: bool = False
    # True when the frame is only there because parley asked for usage and the client
    # did not: the server must not forward it.
    internal: bool = False
    # True when the next chunk was already read with this one: the server may hold this
    # one back and write both at once (one send instead of two).
    more: bool = False
