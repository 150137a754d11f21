"""What the conversation service is given and what it answers (``chat.service``).

Given: the caller (``Caller``), how exchanges are recorded (``Recorder``), the server's
shutdown (``Interruptions``) and the per-request ``Options``. Answered: a ``Reply`` whose
events are ``Delta``s, then one ``Done`` or ``Failed``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from parley.domain.exchange import Exchange
from parley.errors import ParleyError
from parley.store.conversations import StoredMessage, Viewer

# What the chat API's exchanges are recorded as (request_log.client_protocol).
PROTOCOL = "parley"


class Caller(Viewer, Protocol):
    """Who sends (``server.identity.Identity`` is one)."""

    @property
    def api_key_id(self) -> int | None: ...


class Interruptions(Protocol):
    """The server's shutdown as an answer sees it (``server.shutdown.Drain`` is one)."""

    def answering(self) -> AbstractContextManager[None]:
        """While entered, the shutdown may cancel the current task."""

    def interrupted(self) -> bool:
        """On ``CancelledError``: whether the shutdown cancelled the current task (the
        cancellation is then consumed)."""

    def drained(self) -> bool:
        """On a cancellation ``interrupted`` did not claim: whether the shutdown's drain
        is over, so that the shutdown cut the answer off all the same."""


class NoShutdown:
    """No server around: nothing is ever interrupted."""

    def answering(self) -> AbstractContextManager[None]:
        return nullcontext()

    def interrupted(self) -> bool:
        return False

    def drained(self) -> bool:
        return False


class Recorder(Protocol):
    """How exchanges are recorded (``server.state.Services`` is one)."""

    async def admit(self, caller: Caller) -> None:
        """Refuse (before anything is stored or sent upstream) when the exchange could not
        be recorded or the caller is over a limit."""

    async def record(self, exchange: Exchange) -> None: ...

    async def record_quietly(self, exchange: Exchange) -> None: ...

    def record_in_background(self, exchange: Exchange) -> None: ...


@dataclass(frozen=True, slots=True)
class Options:
    """Per-request choices; ``model`` None: the conversation's default model."""

    model: str | None = None
    stream: bool = True
    temperature: float | None = None
    max_tokens: int | None = None
    origin: str | None = None
    # Document collections (of the caller's) to answer from, besides the conversation's.
    collections: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """The answer, as stored (committed, in durable mode), its ``notice`` included."""

    message: StoredMessage


@dataclass(frozen=True, slots=True)
class Failed:
    """No (complete) answer; what was received is recorded."""

    error: ParleyError


ChatEvent = Delta | Done | Failed


@dataclass(frozen=True, slots=True)
class Reply:
    # The message answered: the new user message (send), or the one answered again.
    message: StoredMessage
    events: AsyncGenerator[ChatEvent, None]
