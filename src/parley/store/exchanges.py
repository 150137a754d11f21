"""The exchange repository: every SQL write of an ``Exchange``, and the reads tests need.

``write_batch`` records many exchanges in the caller's transaction. Invariants:

- every upstream attempt is one ``request_log`` row; the attempts of one exchange share
  its ``chain_id`` and carry the request-level fields (model requested, sampling, owner);
  ``created_at`` is when the attempt started, ``finished_at`` when it ended (start plus
  response time; the start when it has none);
- a chat exchange threads into a conversation. The request's messages are chain-hashed;
  the deepest message already stored (or written earlier in the same batch) with the same
  chain hash, owned by the same user (or, without a user, the same API key), is where the
  request continues, and only the messages after it are inserted. A match continues a
  conversation only if the matched prefix holds an assistant message: a prefix of system
  and user messages alone ("Hi") says nothing about which conversation it belongs to, so
  two clients sending the same greeting get two conversations. Among equal matches the
  newest row wins. So only a message after an assistant message is ever looked up: the
  others (a new chat's system and first user message) are stored with chain key 0,
  which the lookup index leaves out;
- each answer (a ``Choice``) is a new assistant message, a child of the request's last
  message with the chain hash the client will send back, plus a ``responses`` row pointing
  at the attempt that produced it. Identical answers are sibling rows, never merged;
- a chat-API exchange names its conversation and the message it answers
  (``Exchange.reply_to``): its request's messages are already stored, so nothing is looked
  up or inserted but its answers, children of that message; the conversation's
  ``updated_at`` moves, and its active branch (``active_leaf_id``) moves to the first
  answer unless it moved since the turn began (``ReplyTo.leaf_at_start``);
- nothing the user sent is lost: an exchange that failed everywhere still records its
  attempts and its messages; its answers are kept only if they hold partial output;
- embeddings (any endpoint but chat completions and Anthropic messages) record only
  their attempts.

Speed (the writer's goal is 10,000 exchanges/s on SQLite) shapes the code: one
chain-hash lookup per batch; every row, id and link decided in Python first (ids are
reserved up front), then one driver-level ``executemany`` per table (``store.bulk``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Connection, Row, bindparam, select, update

from parley.domain.exchange import Attempt, Exchange
from parley.domain.messages import chain_hash, chain_of, content_hash_of
from parley.domain.times import utc
from parley.store import exchange_lookups as lookups
from parley.store import rollups
from parley.store.bulk import PublicIds, assign_ids, bulk_insert, bulk_update
from parley.store.exchange_lookups import Owner, Stored
from parley.store.history_rows import insert_conversations, insert_messages
from parley.store.schema import conversations, messages, request_log, responses

# Endpoints whose exchanges are conversations: OpenAI chat completions, Anthropic messages.
_CHAT_ENDPOINTS = frozenset({"chat", "messages"})

# pg_advisory_xact_lock key of the writers' transactions ("parley-r": the key that once
# guarded the rollups alone, so a server of an older version still takes turns with them).
WRITER_LOCK = 0x7061726C65792D72


class Recorded:
    """What one exchange became in the store. Public ids are the ones clients may see.

    Read from the exchange's plan when asked: the writer returns one per exchange and
    most callers only wait for it, so nothing is copied out on the commit path.
    """

    __slots__ = ("_plan",)

    def __init__(self, plan: _Plan) -> None:
        self._plan = plan

    @property
    def chain_id(self) -> uuid.UUID | None:
        return self._plan.exchange.chain_id

    @property
    def request_public_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(row["public_id"] for row in self._plan.attempt_rows)

    @property
    def conversation_public_id(self) -> uuid.UUID | None:
        conv = self._plan.conv
        return conv.public_id if conv is not None else None

    @property
    def answer_public_ids(self) -> tuple[uuid.UUID, ...]:
        return tuple(node.row["public_id"] for node, _ in self._plan.answers)

    @property
    def attempt_rows(self) -> list[dict[str, Any]]:
        """The request-log rows as written (for observers after the commit)."""
        return self._plan.attempt_rows

    @property
    def request_ids(self) -> tuple[int, ...]:
        return tuple(row["id"] for row in self._plan.attempt_rows)

    @property
    def conversation_id(self) -> int | None:
        conv = self._plan.conv
        return conv.id if conv is not None else None

    @property
    def message_ids(self) -> tuple[int, ...]:
        return tuple(node.row["id"] for node in self._plan.nodes)


@dataclass(slots=True, eq=False)
class _Conv:
    public_id: uuid.UUID
    id: int | None = None
    new_row: dict[str, Any] | None = None


@dataclass(slots=True, eq=False)
class _Node:
    """A message row to insert; its parent is a stored id, another new row, or nothing."""

    row: dict[str, Any]
    parent: _Node | int | None
    conv: _Conv


@dataclass(slots=True, eq=False)
class _Plan:
    exchange: Exchange
    attempt_rows: list[dict[str, Any]]
    # The attempt the messages and answers point at: the success, else the last one.
    answer_attempt: int | None
    conv: _Conv | None = None
    nodes: list[_Node] = field(default_factory=list)
    answers: list[tuple[_Node, dict[str, Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Hashed:
    """A chat request's message hashes, computed once per exchange."""

    # Each message's stored payload: the bytes its content hash is made of (serialised
    # once), except for tool calls, whose arguments are stored exactly as sent.
    payloads: list[str]
    content_hashes: list[str]
    chains: list[str]
    first_assistant: int | None
    owner: Owner


def write_batch(
    conn: Connection, batch: Sequence[Exchange], rollup_cache: rollups.RollupCache | None = None
) -> list[Recorded]:
    """Insert the rows of every exchange in ``batch``, in the caller's transaction.

    On SQLite the transaction must hold the write lock (``BEGIN IMMEDIATE``, as the
    writer's connection does) for ids reserved here to stay free until the inserts; on
    PostgreSQL it takes the writers' advisory lock itself.
    With ``rollup_cache``, call its ``settle()`` once the transaction committed.
    """
    if conn.dialect.name != "sqlite":
        # Writers of several servers take turns, as BEGIN IMMEDIATE makes them on SQLite:
        # the lookup of stored messages below then sees what the other one committed, so
        # one conversation never becomes two threads.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK})")
    now = datetime.now(UTC)
    hashed = [_hash(exchange) for exchange in batch]
    planner = _Planner(
        now, lookups.stored_matches(conn, _continuable(hashed)), lookups.unanswerable(conn, batch)
    )
    plans = [planner.plan(exchange, h) for exchange, h in zip(batch, hashed, strict=True)]

    # A conversation started in this batch may be continued in it too: one row, once.
    new_convs = {id(p.conv): p.conv for p in plans if p.conv and p.conv.new_row is not None}
    conv_rows = [c.new_row for c in new_convs.values() if c.new_row is not None]
    attempt_rows = [row for plan in plans for row in plan.attempt_rows]
    message_rows = [node.row for plan in plans for node in plan.nodes]
    assign_ids(
        conn, [(conversations, conv_rows), (request_log, attempt_rows), (messages, message_rows)]
    )
    for conv, conv_row in zip(new_convs.values(), conv_rows, strict=True):
        conv.id = conv_row["id"]
    response_rows = [row for plan in plans for row in _link(plan)]

    # Parents first: ids grow in planning order, and a parent is always planned first.
    insert_conversations(conn, conv_rows)
    bulk_insert(conn, request_log, attempt_rows)
    # In the same transaction: a rollup never counts an uncommitted row or misses one.
    rollups.add(conn, attempt_rows, rollup_cache)
    insert_messages(conn, message_rows)
    bulk_insert(conn, responses, response_rows)
    bulk_update(
        conn, conversations, [{"id": conv_id, "updated_at": now} for conv_id in planner.continued]
    )
    answered = [
        (plan.conv.id, plan.exchange.reply_to.leaf_at_start, plan.answers[0][0].row["id"])
        for plan in plans
        if plan.exchange.reply_to is not None and plan.conv is not None and plan.answers
    ]
    bulk_update(conn, conversations, [{"id": conv, "updated_at": now} for conv, _, _ in answered])
    if answered:
        # The answer comes into view unless the view moved since its turn began (another
        # tab sent a message or chose a branch). In batch order: of two answers begun
        # from one view, the first moves it.
        conn.execute(
            _MOVE_LEAF,
            [{"conv": conv, "expected": start, "leaf": leaf} for conv, start, leaf in answered],
        )
    return [Recorded(plan) for plan in plans]


_MOVE_LEAF = (
    update(conversations)
    .where(
        conversations.c.id == bindparam("conv"),
        conversations.c.active_leaf_id.is_not_distinct_from(bindparam("expected")),
    )
    .values(active_leaf_id=bindparam("leaf"))
)


def list_requests(conn: Connection, limit: int = 100) -> Sequence[Row[Any]]:
    """The newest request-log rows first."""
    return conn.execute(select(request_log).order_by(request_log.c.id.desc()).limit(limit)).all()


def conversation_messages(
    conn: Connection, conversation_public_id: uuid.UUID
) -> Sequence[Row[Any]]:
    """A conversation's messages in insertion order, each with its response, if any."""
    query = (
        select(
            messages,
            responses.c.request_id.label("response_request_id"),
            responses.c.model_used,
            responses.c.finish_reason,
            responses.c.prompt_tokens,
            responses.c.completion_tokens,
        )
        .join(conversations, conversations.c.id == messages.c.conversation_id)
        .outerjoin(responses, responses.c.message_id == messages.c.id)
        .where(conversations.c.public_id == conversation_public_id)
        .order_by(messages.c.id)
    )
    return conn.execute(query).all()


def _link(plan: _Plan) -> list[dict[str, Any]]:
    """Fill in the ids that tie a planned exchange's rows together; its response rows."""
    conv_id = plan.conv.id if plan.conv is not None else None
    for row in plan.attempt_rows:
        row["conversation_id"] = conv_id
    request_id = (
        None if plan.answer_attempt is None else plan.attempt_rows[plan.answer_attempt]["id"]
    )
    for node in plan.nodes:
        parent = node.parent
        node.row["parent_id"] = parent.row["id"] if isinstance(parent, _Node) else parent
        node.row["conversation_id"] = node.conv.id
        node.row["request_id"] = request_id
    for node, response in plan.answers:
        response["message_id"] = node.row["id"]
        response["request_id"] = request_id
    return [response for _node, response in plan.answers]


class _Planner:
    """Decides, in Python, every row of a batch and how the rows link to each other."""

    def __init__(
        self,
        now: datetime,
        stored: dict[tuple[str, Owner], Stored],
        unanswerable: set[int],
    ) -> None:
        self.now = now
        self.unanswerable = unanswerable
        self.ids = PublicIds()
        self.stored = stored
        # Messages planned earlier in this batch, by (chain hash, owner): newest wins.
        self.planned: dict[tuple[str, Owner], _Node] = {}
        self.existing: dict[int, _Conv] = {}
        self.continued: list[int] = []

    def plan(self, exchange: Exchange, hashed: _Hashed | None) -> _Plan:
        plan = _Plan(
            exchange, _attempt_rows(exchange, self.ids), _answer_attempt(exchange.attempts)
        )
        target = exchange.reply_to
        if target is not None:
            if id(exchange) in self.unanswerable:
                # Its conversation, or the message answered, was deleted while the answer
                # was being made: the attempts are still facts, the answer has no place.
                return plan
            plan.conv = _Conv(target.conversation_public_id, target.conversation_id)
            self._plan_answers(
                plan,
                target.parent_message_id,
                target.parent_chain_hash,
                lookups.owner(exchange.user_id, exchange.api_key_id),
                target.answer_public_ids,
                target.notice,
            )
            return plan
        if hashed is None:
            return plan
        depth, parent, conv = self._match(hashed)
        started = utc(exchange.started_at)
        if conv is None:
            conv = _Conv(self.ids.new())
            conv.new_row = {
                "public_id": conv.public_id,
                "created_at": started,
                "updated_at": self.now,
                "title": None,
                "source": "api",
                "default_model": _clip(exchange.model_requested, 255),
                "user_id": exchange.user_id,
                "api_key_id": exchange.api_key_id,
            }
        plan.conv = conv
        for i in range(depth + 1, len(exchange.messages)):
            message = exchange.messages[i]
            parent = self._node(
                plan,
                parent,
                hashed.owner,
                {
                    "public_id": self.ids.new(),
                    "role": message.role,
                    "content": _text(message.text()),
                    "payload": hashed.payloads[i],
                    "content_hash": hashed.content_hashes[i],
                    "chain_hash": hashed.chains[i],
                    # Only a message after an assistant one can be continued from
                    # (see ``_match``): the others get no entry in the lookup index.
                    "chain_key": lookups.chain_key(hashed.chains[i])
                    if hashed.first_assistant is not None and i >= hashed.first_assistant
                    else lookups.UNINDEXED,
                    "created_at": started,
                    "user_id": exchange.user_id,
                    "api_key_id": exchange.api_key_id,
                },
            )
        self._plan_answers(plan, parent, hashed.chains[-1], hashed.owner)
        return plan

    def _match(self, hashed: _Hashed) -> tuple[int, _Node | int | None, _Conv | None]:
        """The deepest message the request continues: (index, parent, conversation)."""
        if hashed.first_assistant is None:
            return -1, None, None
        for i in range(len(hashed.chains) - 1, hashed.first_assistant - 1, -1):
            key = (hashed.chains[i], hashed.owner)
            node = self.planned.get(key)
            if node is not None:
                return i, node, node.conv
            stored = self.stored.get(key)
            if stored is not None:
                message_id, conv_id, conv_public_id = stored
                conv = self.existing.get(conv_id)
                if conv is None:
                    conv = self.existing[conv_id] = _Conv(conv_public_id, conv_id)
                    self.continued.append(conv_id)
                return i, message_id, conv
        return -1, None, None

    def _plan_answers(
        self,
        plan: _Plan,
        parent: _Node | int | None,
        parent_chain: str | None,
        owner: Owner,
        public_ids: Sequence[uuid.UUID] = (),
        notice: str | None = None,
    ) -> None:
        """An assistant message and a response row per answer, children of ``parent``;
        ``public_ids`` (by choice index) name them when the caller chose their ids;
        ``notice`` is stored with each (``ReplyTo.notice``)."""
        exchange = plan.exchange
        attempt = None if plan.answer_attempt is None else exchange.attempts[plan.answer_attempt]
        success = attempt is not None and attempt.success
        usage = attempt.usage if attempt is not None else None
        for choice in exchange.choices:
            if not success and not (choice.text or choice.reasoning or choice.tool_calls):
                continue
            message = choice.message()
            payload = message.canonical()
            if choice.reasoning:
                # Not part of the hash (clients do not send it back), but never dropped.
                payload["reasoning_content"] = choice.reasoning
            content_hash = message.content_hash()
            answer_chain = chain_hash(parent_chain, content_hash)
            node = self._node(
                plan,
                parent,
                owner,
                {
                    "public_id": public_ids[choice.index]
                    if choice.index < len(public_ids)
                    else self.ids.new(),
                    "role": "assistant",
                    "content": _text(message.text()),
                    "payload": orjson.dumps(payload).decode(),
                    "content_hash": content_hash,
                    "chain_hash": answer_chain,
                    "chain_key": lookups.chain_key(answer_chain),
                    "created_at": self.now,
                    "user_id": exchange.user_id,
                    "api_key_id": exchange.api_key_id,
                },
            )
            # Token counts are the attempt's; with n > 1 choices they are shared, so
            # totals are summed over request_log, never over responses.
            plan.answers.append(
                (
                    node,
                    {
                        "model_used": _clip(
                            attempt.model_used if attempt else exchange.model_requested, 255
                        ),
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "completion_tokens": usage.completion_tokens if usage else None,
                        "total_tokens": usage.total_tokens if usage else None,
                        "completion_time_ms": attempt.response_time_ms if attempt else None,
                        "finish_reason": _clip(choice.finish_reason, 64),
                        "created_at": self.now,
                        "notice": notice,
                    },
                )
            )

    def _node(
        self, plan: _Plan, parent: _Node | int | None, owner: Owner, row: dict[str, Any]
    ) -> _Node:
        assert plan.conv is not None
        node = _Node(row, parent, plan.conv)
        plan.nodes.append(node)
        self.planned[(row["chain_hash"], owner)] = node
        return node


def _continuable(hashed: Iterable[_Hashed | None]) -> set[str]:
    """The chain hashes a request of the batch might continue from: only a prefix holding
    an assistant message may continue a conversation, so shorter prefixes are never looked
    up (a new chat costs no query at all)."""
    wanted: set[str] = set()
    for h in hashed:
        if h is not None and h.first_assistant is not None:
            wanted.update(h.chains[h.first_assistant :])
    return wanted


def _hash(exchange: Exchange) -> _Hashed | None:
    if (
        exchange.endpoint not in _CHAT_ENDPOINTS
        or not exchange.messages
        or exchange.reply_to is not None
    ):
        return None
    canonical = [m.canonical_json() for m in exchange.messages]
    content_hashes = [content_hash_of(raw) for raw in canonical]
    chains = chain_of(content_hashes)
    first_assistant = next(
        (i for i, m in enumerate(exchange.messages) if m.role == "assistant"), None
    )
    return _Hashed(
        [
            orjson.dumps(m.canonical()).decode() if m.tool_calls else raw.decode()
            for m, raw in zip(exchange.messages, canonical, strict=True)
        ],
        content_hashes,
        chains,
        first_assistant,
        lookups.owner(exchange.user_id, exchange.api_key_id),
    )


def _answer_attempt(attempts: Sequence[Attempt]) -> int | None:
    for i, attempt in enumerate(attempts):
        if attempt.success:
            return i
    return len(attempts) - 1 if attempts else None


def _attempt_rows(exchange: Exchange, ids: PublicIds) -> list[dict[str, Any]]:
    """One request_log row per attempt; the request's own fields repeat on each."""
    if exchange.chain_id is None:
        # Assigned here rather than on the hot path, where the random read would cost.
        exchange.chain_id = ids.new()
    # Spelled out rather than built with getattr over field lists: this runs for every
    # attempt and the literal is several times faster.
    e = exchange
    rows = []
    for a in exchange.attempts:
        u = a.usage
        started = utc(a.started_at)
        rows.append(
            {
                "attempt": a.attempt,
                "success": a.success,
                "status_code": a.status_code,
                "response_time_ms": a.response_time_ms,
                "provider": _clip(a.provider, 128),
                "finish_reason": _clip(a.finish_reason, 64),
                "time_to_first_token_ms": a.time_to_first_token_ms,
                "time_to_last_token_ms": a.time_to_last_token_ms,
                "tokens_per_second": a.tokens_per_second,
                "error_type": _clip(a.error_type, 64),
                "error_message": None if a.error_message is None else _text(a.error_message),
                "cost_usd": a.cost_usd,
                "upstream_id": _clip(a.upstream_id, 255),
                "usage_estimated": a.usage_estimated,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.total_tokens,
                "cached_tokens": u.cached_tokens,
                "reasoning_tokens": u.reasoning_tokens,
                "endpoint": e.endpoint,
                "client_protocol": e.client_protocol,
                "model_requested": _clip(e.model_requested, 255),
                "origin": _clip(e.origin, 255),
                "is_streaming": e.is_streaming,
                "max_tokens": e.max_tokens,
                "temperature": e.temperature,
                "top_p": e.top_p,
                "message_count": len(e.messages),
                "user_id": e.user_id,
                "api_key_id": e.api_key_id,
                "chain_id": e.chain_id,
                "public_id": ids.new(),
                "created_at": started,
                # Tokens-per-minute limits count an attempt when it ended (store.limits).
                "finished_at": (
                    started
                    if a.response_time_ms is None
                    else started + timedelta(milliseconds=a.response_time_ms)
                ),
                "model": _clip(a.model_used, 255),
            }
        )
    return rows


def _clip(value: object, length: int) -> Any:
    """A value for a bounded text column: PostgreSQL refuses what SQLite would keep, and a
    client- or upstream-chosen string must never make a paid answer fail to commit."""
    if value is None:
        return None
    return _text(value if isinstance(value, str) else str(value))[:length]


def _text(value: str) -> str:
    """A client- or upstream-chosen text as PostgreSQL takes it: a NUL character (valid
    JSON) becomes U+FFFD, on every database alike. ``payload`` keeps the exact message."""
    if "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value
