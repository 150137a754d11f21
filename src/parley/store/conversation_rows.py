"""The conversation repository's values and reads: what its rows become, and the queries
``store.conversations`` composes. Callers use ``store.conversations``.

Reads of a conversation's messages take values as the driver returns them (``raw``) and
decode them in one loop (``messages_of``): SQLAlchemy's per-value conversion of UUIDs and
times cost more than the read itself on a 1,000-message conversation.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Select,
    bindparam,
    func,
    literal,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.types import NullType

from parley.domain.messages import Message, ToolCall
from parley.domain.times import utc
from parley.errors import InvalidRequest
from parley.store import attachments as files
from parley.store.attachments import AttachmentRow
from parley.store.documents import CitationRow
from parley.store.schema import (
    attachments,
    conversations,
    messages,
    provider_configs,
    request_log,
    responses,
)

_C = conversations.c
_M = messages.c
_R = responses.c


class Viewer(Protocol):
    """Who asks (``server.identity.Identity`` is one)."""

    @property
    def user_id(self) -> int | None: ...

    def may_see(self, owner_id: int | None) -> bool: ...


class ActiveLeaf:
    """Marks "continue the active branch" where a parent message is expected."""


ACTIVE_LEAF: Final = ActiveLeaf()
# Where a new message goes: under a message (public id), at the root (None), or at the
# end of the active branch.
Parent = uuid.UUID | ActiveLeaf | None


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation row; ``message_count`` and ``last_message_at`` are filled in by
    the reads that show them (listing, ``load``)."""

    id: int
    public_id: uuid.UUID
    user_id: int | None
    api_key_id: int | None
    title: str | None
    default_model: str | None
    source: str
    archived: bool
    pinned: bool
    is_active: bool
    system_prompt: str | None
    provider_config_id: int | None
    active_leaf_id: int | None
    created_at: datetime
    updated_at: datetime
    message_count: int = 0
    last_message_at: datetime | None = None


# Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, seven
# times slower to build, and a loaded conversation builds a thousand of these.
@dataclass(slots=True)
class StoredMessage:
    """One message with its parent's public id, for an answer its response row, the
    files it carries and an answer's sources (``attachments``, ``citations``: filled in
    by the reads that need them)."""

    id: int
    public_id: uuid.UUID
    parent_id: int | None
    parent_public_id: uuid.UUID | None
    role: str
    content: str
    # The message in OpenAI wire shape, as JSON text.
    payload: str
    created_at: datetime
    model_used: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    finish_reason: str | None = None
    # Files attached to the message, in upload order; their bytes are never in ``payload``.
    attachments: tuple[AttachmentRow, ...] = ()
    # An answer's sources (``store.documents``), in rank order.
    citations: tuple[CitationRow, ...] = ()
    # Why an answer was given without the conversation's documents (their search failed).
    notice: str | None = None

    def message(self) -> Message:
        """The message as stored, without its files (``chat.service`` adds them as content
        parts); reasoning is not sent back."""
        data = orjson.loads(self.payload)
        content = data.get("content")
        return Message(
            role=data["role"],
            content=tuple(content) if isinstance(content, list) else content,
            name=data.get("name"),
            tool_calls=tuple(
                ToolCall(
                    id=call.get("id", ""),
                    name=call["function"]["name"],
                    arguments=call["function"].get("arguments", ""),
                    type=call.get("type", "function"),
                )
                for call in data.get("tool_calls") or ()
            ),
            tool_call_id=data.get("tool_call_id"),
        )


@dataclass(frozen=True, slots=True)
class Tree:
    """A conversation with every message of every branch (oldest first) and the active
    branch, root to leaf (internal ids)."""

    conversation: Conversation
    messages: list[StoredMessage]
    active_path: list[int]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Conversation]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Turn:
    """What a model is asked to answer: the message answered and the branch up to it."""

    conversation: Conversation
    # The message answered (the new user message, or the one regenerated from).
    message: StoredMessage
    # ``message``'s chain hash: its answers chain from it.
    chain_hash: str
    # Root to ``message``, inclusive.
    path: list[StoredMessage]
    # The conversation's own, else its provider configuration's.
    system_prompt: str | None
    # Untitled and never answered in full (``needs_title``): this answer makes a title.
    needs_title: bool = False
    # The conversation's active leaf when the turn began: its answer becomes the active
    # leaf only if nobody moved it meanwhile (``ReplyTo.leaf_at_start``).
    leaf_at_start: int | None = None


@dataclass(frozen=True, slots=True)
class Anchor:
    """A message as far as linking to it goes."""

    id: int
    public_id: uuid.UUID
    parent_id: int | None
    role: str
    chain_hash: str


def raw(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as the driver returns it: SQLAlchemy's per-value conversion (UUID, time)
    costs more than the read itself on a 1,000-message conversation; ``messages_of``
    converts faster."""
    return type_coerce(column, NullType())


# Positions: 0 id, 1 public_id, 2 parent_id, 3 role, 4 content, 5 payload, 6 created_at.
MESSAGES = select(
    _M.id, raw(_M.public_id), _M.parent_id, _M.role, _M.content, _M.payload, raw(_M.created_at)
).order_by(_M.id)
# Positions: 0 message_id, 1 model_used, 2-4 prompt, completion and total tokens,
# 5 finish_reason, 6 notice.
_RESPONSE_COLUMNS = (
    _R.message_id,
    _R.model_used,
    _R.prompt_tokens,
    _R.completion_tokens,
    _R.total_tokens,
    _R.finish_reason,
    _R.notice,
)
# Answers only: separate from MESSAGES, since most messages have no response row.
RESPONSES = select(*_RESPONSE_COLUMNS).join(messages, _M.id == _R.message_id)


def visible_row(
    conn: Connection, viewer: Viewer, public_id: uuid.UUID, *, lock: bool = False
) -> Row[Any] | None:
    """The conversation if ``viewer`` may see it; ``lock``: ``FOR UPDATE`` (PostgreSQL;
    SQLite's write transaction serialises), for a delete or a send."""
    query = select(conversations).where(_C.public_id == public_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None or not viewer.may_see(row.user_id):
        return None
    return row


def one_row(conn: Connection, where: Any) -> Row[Any]:
    return conn.execute(select(conversations).where(where)).one()


def counted(conn: Connection, rows: Sequence[Row[Any]]) -> list[Conversation]:
    """Conversations of ``rows`` with their message counts and last message times (one
    query for them all)."""
    if not rows:
        return []
    query = (
        select(_M.conversation_id, func.count(), raw(func.max(_M.created_at)))
        .where(_M.conversation_id.in_([row.id for row in rows]))
        .group_by(_M.conversation_id)
    )
    counts = {r[0]: (r[1], time_of(r[2])) for r in conn.execute(query).all()}
    return [conversation_of(row, *counts.get(row.id, (0, None))) for row in rows]


def active_leaf(conn: Connection, conversation_id: int, leaf_id: int | None) -> Anchor | None:
    """The end of the active branch: the chosen leaf, else the newest message."""
    if leaf_id is not None:
        found = anchor(conn, conversation_id, _M.id == leaf_id)
        if found is not None:
            return found
    newest = conn.execute(
        select(func.max(_M.id)).where(_M.conversation_id == conversation_id)
    ).scalar()
    return None if newest is None else anchor(conn, conversation_id, _M.id == newest)


def anchor(conn: Connection, conversation_id: int, where: Any) -> Anchor | None:
    row = conn.execute(
        select(_M.id, _M.public_id, _M.parent_id, _M.role, _M.chain_hash).where(
            where, _M.conversation_id == conversation_id
        )
    ).first()
    return None if row is None else Anchor(row[0], row[1], row[2], row[3], row[4])


def path_to(conn: Connection, leaf: int) -> list[StoredMessage]:
    """The messages from the root to ``leaf``, inclusive, with their files: one query
    (``_BRANCH``), and a second for the files only when a message of the branch has any."""
    rows = conn.execute(_BRANCH, {"leaf": leaf}).all()
    answers = {row[0]: row[7:14] for row in rows if row[7] is not None}
    path = messages_of([row[:7] for row in rows], answers)
    with_files(path, files.of_messages(conn, [row[0] for row in rows if row[14]]))
    return path


def _branch() -> Select[Any]:
    """The branch up to the message ``:leaf``, root first, as ``MESSAGES`` rows followed by
    the ``RESPONSES`` columns (NULL for a message without a response row) and whether the
    message has files.

    Each step of the recursion finds the parent by primary key, its response row and
    whether it has files by their ``message_id`` indexes, and carries every column the
    branch needs: the plan is index lookups per message of the branch, however large the
    tables (joining the finished branch to ``messages`` or ``responses`` was planned as
    a scan of the whole table on PostgreSQL). The branch's ids never travel back as an
    ``IN`` list: on a 2,000-message branch the two lists (responses, then files in
    chunks of 500), 4,000 bound values rendered by SQLAlchemy and converted by the
    driver, were about half of a send's time on PostgreSQL (docs/benchmarks.md)."""
    columns = (
        *(_M.id, _M.public_id, _M.parent_id, _M.role, _M.content, _M.payload, _M.created_at),
        *_RESPONSE_COLUMNS,
        select(attachments.c.id)
        .where(attachments.c.message_id == _M.id)
        .exists()
        .label("has_files"),
    )
    answered = messages.outerjoin(responses, _R.message_id == _M.id)
    up = (
        select(*columns, literal(0).label("depth"))
        .select_from(answered)
        .where(_M.id == bindparam("leaf"))
        .cte("branch", recursive=True)
    )
    up = up.union_all(
        select(*columns, (up.c.depth + 1).label("depth")).select_from(
            up.join(answered, _M.id == up.c.parent_id)
        )
    )
    out: list[ColumnElement[Any]] = [up.c[column.name] for column in columns]
    # As MESSAGES reads them (``raw``).
    out[1], out[6] = raw(out[1]), raw(out[6])
    return select(*out).order_by(up.c.depth.desc())


_BRANCH: Final = _branch()


def with_files(listed: Sequence[StoredMessage], found: Mapping[int, list[AttachmentRow]]) -> None:
    """Put each message's files (``store.attachments`` rows by message id) on it."""
    if found:
        for message in listed:
            rows = found.get(message.id)
            if rows:
                message.attachments = tuple(rows)


def system_prompt_of(conn: Connection, conversation: Row[Any]) -> str | None:
    if conversation.system_prompt is not None or conversation.provider_config_id is None:
        prompt: str | None = conversation.system_prompt
        return prompt
    found: str | None = conn.execute(
        select(provider_configs.c.system_prompt).where(
            provider_configs.c.id == conversation.provider_config_id
        )
    ).scalar()
    return found


def needs_title(conn: Connection, conversation: Row[Any]) -> bool:
    """Untitled and never answered in full. The partial answer of a request that failed
    or was cut short (the client left) does not count, or a chat whose first answer was
    stopped would stay untitled; an answer without a request row (imported) does."""
    if conversation.title is not None:
        return False
    answered = conn.execute(
        select(_M.id)
        .outerjoin(responses, _R.message_id == _M.id)
        .outerjoin(request_log, request_log.c.id == _R.request_id)
        .where(
            _M.conversation_id == conversation.id,
            _M.role == "assistant",
            or_(request_log.c.success.is_(None), request_log.c.success.is_(True)),
        )
        .limit(1)
    ).first()
    return answered is None


def conversation_of(row: Row[Any], count: int = 0, last: datetime | None = None) -> Conversation:
    m = row._mapping
    return Conversation(
        id=m["id"],
        public_id=m["public_id"],
        user_id=m["user_id"],
        api_key_id=m["api_key_id"],
        title=m["title"],
        default_model=m["default_model"],
        source=m["source"],
        archived=bool(m["archived"]),
        pinned=bool(m["pinned"]),
        is_active=bool(m["is_active"]),
        system_prompt=m["system_prompt"],
        provider_config_id=m["provider_config_id"],
        active_leaf_id=m["active_leaf_id"],
        created_at=utc(m["created_at"]),
        updated_at=utc(m["updated_at"]),
        message_count=count,
        last_message_at=last,
    )


def messages_of(
    rows: Sequence[Sequence[Any]],
    answers: Mapping[int, Sequence[Any]],
    parents: dict[int, uuid.UUID] | None = None,
) -> list[StoredMessage]:
    """``StoredMessage``s of ``MESSAGES`` rows (parents before children, as stored) with
    their ``RESPONSES`` rows by message id; ``parents``: public ids of parents that are
    not among ``rows`` (the dict is filled in with those of ``rows``).

    Values come as the driver returns them: PostgreSQL's makes UUIDs and aware times;
    SQLite gives the 32 hex digits SQLAlchemy stored (made into a UUID without
    ``uuid.UUID(hex)``'s re-validation of what is valid by construction, at half the
    cost) and ISO text without an offset (parsed with its UTC offset appended: six
    times faster than parsing, then ``replace(tzinfo=UTC)``). One flat loop: it runs for
    every message of a loaded conversation, and a call per value cost a quarter of it."""
    public_of = parents if parents is not None else {}
    out: list[StoredMessage] = []
    append = out.append
    answer_of = answers.get
    for key, raw_id, parent, role, content, payload, created in rows:
        if type(raw_id) is str:
            public_id = _NEW(uuid.UUID)
            _SET(public_id, "int", int(raw_id, 16))
            _SET(public_id, "is_safe", _UNKNOWN_SAFETY)
        else:
            public_id = raw_id
        public_of[key] = public_id
        when = _FROM_ISO(created + "+00:00") if type(created) is str else utc(created)
        above = None if parent is None else public_of.get(parent)
        answer = answer_of(key)
        if answer is None:
            append(StoredMessage(key, public_id, parent, above, role, content, payload, when))
        else:
            append(
                StoredMessage(
                    key,
                    public_id,
                    parent,
                    above,
                    role,
                    content,
                    payload,
                    when,
                    answer[1],
                    answer[2],
                    answer[3],
                    answer[4],
                    answer[5],
                    notice=answer[6],
                )
            )
    return out


_UNKNOWN_SAFETY = uuid.SafeUUID.unknown
_NEW = object.__new__
_SET = object.__setattr__
_FROM_ISO = datetime.fromisoformat


def time_of(value: Any) -> datetime:
    """A stored time as the driver returned it (SQLite: ISO text without offset), in UTC."""
    if isinstance(value, str):
        return datetime.fromisoformat(value + "+00:00")  # see messages_of
    return utc(value)


def encode_cursor(last: Conversation) -> str:
    packed = orjson.dumps([last.pinned, last.updated_at.isoformat(), last.public_id.hex])
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[bool, datetime, uuid.UUID]:
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        pinned, updated_at, public_id = orjson.loads(packed)
        if not isinstance(pinned, bool) or not isinstance(public_id, str):
            raise ValueError(pinned)
        return pinned, utc(datetime.fromisoformat(updated_at)), uuid.UUID(hex=public_id)
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError, OverflowError):
        raise InvalidRequest("'cursor' is not a cursor this API returned", "cursor") from None
