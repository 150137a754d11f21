"""An exchange: one client request, its upstream attempts and what the model answered.

The gateway folds stream events into an ``Exchange``; the store writer turns it into rows
(one request-log row per attempt, the conversation's new messages, a response row per
assistant message). Times are UTC; durations are milliseconds.

An exchange of ``/v1`` traffic finds its conversation by chain hash; one of the chat API
names it (``ReplyTo``): its request's messages are already stored, so only the answers are
added, as children of the message answered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from parley.domain.messages import Message, ToolCall
from parley.domain.usage import Usage

# The largest max_tokens a request may ask for: the request log keeps it in an INTEGER
# column (32 bits on PostgreSQL), and a value it cannot hold must be refused before any
# upstream call, never found out when the answer is recorded.
MAX_TOKENS_LIMIT = 2**31 - 1


@dataclass(slots=True)
class Attempt:
    """One upstream attempt: a row of the request log."""

    attempt: int
    provider: str
    model_used: str
    started_at: datetime
    success: bool = False
    status_code: int | None = None
    response_time_ms: float | None = None
    time_to_first_token_ms: float | None = None
    time_to_last_token_ms: float | None = None
    tokens_per_second: float | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    upstream_id: str | None = None
    # True when ``usage`` is parley's estimate: a stream cut off before the upstream
    # reported its usage (``gateway.recording``).
    usage_estimated: bool = False


@dataclass(slots=True)
class Choice:
    """One assistant answer (a choice) of the successful, or last, attempt."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None

    def message(self) -> Message:
        return Message(
            role="assistant",
            content=self.text if self.text or not self.tool_calls else None,
            tool_calls=self.tool_calls,
        )


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where the answers of a chat-API exchange go (store ids, never shown to clients).

    The request's messages are already stored, the last of them being ``parent_message_id``
    (None: the answers start the conversation); each answer becomes its child, chained
    from ``parent_chain_hash``, and the conversation's active branch moves to the first,
    if it is still ``leaf_at_start`` (the active leaf when the turn began): a branch
    chosen or a message sent meanwhile (another tab) stays in view.
    ``answer_public_ids`` (by choice index) are the public ids the answers get, chosen up
    front so that the client can be told before the record is read back.
    """

    conversation_id: int
    conversation_public_id: uuid.UUID
    parent_message_id: int | None
    parent_chain_hash: str | None
    answer_public_ids: tuple[uuid.UUID, ...] = ()
    leaf_at_start: int | None = None
    # Stored with each answer: why it was given without the conversation's documents.
    notice: str | None = None


@dataclass(slots=True)
class Exchange:
    """Everything recorded about one client request."""

    model_requested: str
    messages: tuple[Message, ...]
    started_at: datetime
    is_streaming: bool = False
    endpoint: str = "chat"
    client_protocol: str = "openai"
    origin: str | None = None
    max_tokens: int | None = None  # at most MAX_TOKENS_LIMIT
    temperature: float | None = None
    top_p: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    user_id: int | None = None
    api_key_id: int | None = None
    # Links the attempts of one client request; the store assigns it when it is None.
    chain_id: uuid.UUID | None = None
    # Set by the chat API: the conversation and message answered (no chain-hash lookup).
    reply_to: ReplyTo | None = None

    @property
    def message_count(self) -> int:
        return len(self.messages)

    @property
    def succeeded(self) -> Attempt | None:
        for attempt in self.attempts:
            if attempt.success:
                return attempt
        return None
