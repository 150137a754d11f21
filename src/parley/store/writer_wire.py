"""The store writer's wire between the server and its child process (``writer_process``,
``writer_child``): frames of a 4-byte length and a pickle, the command and event kinds,
and exchanges as plain tuples.
"""

from __future__ import annotations

import dataclasses
import operator
import pickle
import socket
import struct
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from parley.domain.exchange import Attempt, Choice, Exchange, ReplyTo
from parley.domain.messages import Message, ToolCall
from parley.domain.rollup import Dims, Tally
from parley.domain.usage import Usage
from parley.errors import StoreError, StoreFull

Tallies = Mapping[tuple[str, datetime, Dims], Tally]

_HEAD = struct.Struct("!I")

# Commands (server to child): (kind, sequence number or 0, payload).
COMMIT = "x"  # an exchange; its sequence number is 0 when nobody waits for it
DRAIN = "d"
METRICS = "m"
# Events (child to server), sent as lists.
DONE = "a"  # (kind, seq, None | (error class name, message), exchanges reported)
TALLIES = "t"  # (kind, tallies)
COUNTS = "s"  # (kind, committed, failed, batches)
# Bytes per socket read on either side: below the allocator's mmap threshold (a 1 MiB read
# cost a map and an unmap per batch); what else has arrived is read on.
READ_SIZE = 1 << 16


def report(error: object) -> tuple[str, str] | None:
    """An outcome as the child reports it: None for success, else the error's class and
    message (never a driver exception: those stay in the child's log)."""
    if not isinstance(error, BaseException):
        return None
    if isinstance(error, StoreError):
        return (type(error).__name__, error.message)
    return ("StoreError", f"the exchange could not be recorded: {type(error).__name__}")


def reported_error(kind: str, message: str) -> StoreError:
    return StoreFull(message) if kind == "StoreFull" else StoreError(message)


def frame(payload: object) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data)) + data


def read_frame(sock: socket.socket) -> Any:
    """The next frame's payload, read blocking (EOFError at the end of the stream)."""
    (length,) = _HEAD.unpack(_read_exactly(sock, _HEAD.size))
    return pickle.loads(_read_exactly(sock, length))


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return bytes(buffer)


def frames(buffer: bytearray) -> list[Any]:
    """The payloads of the complete frames at the start of ``buffer``, removed from it."""
    out: list[Any] = []
    at = 0
    size = len(buffer)
    while size - at >= _HEAD.size:
        (length,) = _HEAD.unpack_from(buffer, at)
        end = at + _HEAD.size + length
        if end > size:
            break
        out.append(pickle.loads(memoryview(buffer)[at + _HEAD.size : end]))
        at = end
    del buffer[:at]
    return out


# -- exchanges on the wire ----------------------------------------------------------------
# Plain tuples, datetimes as POSIX timestamps and UUIDs as integers: pickling the slotted
# dataclasses themselves cost ~45 us per exchange (their ``__getstate__`` is Python, and
# a datetime alone costs ~7 us), this ~7 us. ``tests/store/test_writer_process.py``
# checks that every field of every class below is carried.


def _when(value: datetime) -> float | datetime:
    # Aware datetimes round-trip exactly through a float at microsecond precision.
    return value.timestamp() if value.tzinfo is UTC else value


def _then(value: float | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC)


def _uuid_out(value: uuid.UUID | None) -> int | None:
    return None if value is None else value.int


def _uuid_in(value: int | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(int=value)


_usage = operator.attrgetter(*(f.name for f in dataclasses.fields(Usage)))
_tool_call = operator.attrgetter(*(f.name for f in dataclasses.fields(ToolCall)))


def _calls_out(calls: tuple[ToolCall, ...]) -> tuple[tuple[Any, ...], ...]:
    return tuple(_tool_call(c) for c in calls)


def _calls_in(calls: tuple[tuple[Any, ...], ...]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(*c) for c in calls)


def pack_exchange(ex: Exchange) -> tuple[Any, ...]:
    """``ex`` as plain values (``unpack_exchange`` is the inverse)."""
    reply = ex.reply_to
    return (
        ex.model_requested,
        tuple(
            (m.role, m.content, m.name, _calls_out(m.tool_calls), m.tool_call_id)
            for m in ex.messages
        ),
        _when(ex.started_at),
        ex.is_streaming,
        ex.endpoint,
        ex.client_protocol,
        ex.origin,
        ex.max_tokens,
        ex.temperature,
        ex.top_p,
        [
            (
                a.attempt,
                a.provider,
                a.model_used,
                _when(a.started_at),
                a.success,
                a.status_code,
                a.response_time_ms,
                a.time_to_first_token_ms,
                a.time_to_last_token_ms,
                a.tokens_per_second,
                a.finish_reason,
                a.error_type,
                a.error_message,
                _usage(a.usage),
                a.cost_usd,
                a.upstream_id,
                a.usage_estimated,
            )
            for a in ex.attempts
        ],
        [
            (c.index, c.text, c.reasoning, _calls_out(c.tool_calls), c.finish_reason)
            for c in ex.choices
        ],
        ex.user_id,
        ex.api_key_id,
        _uuid_out(ex.chain_id),
        None
        if reply is None
        else (
            reply.conversation_id,
            reply.conversation_public_id.int,
            reply.parent_message_id,
            reply.parent_chain_hash,
            tuple(u.int for u in reply.answer_public_ids),
            reply.leaf_at_start,
            reply.notice,
        ),
    )


def unpack_exchange(v: tuple[Any, ...]) -> Exchange:
    reply = v[15]
    return Exchange(
        model_requested=v[0],
        messages=tuple(Message(m[0], m[1], m[2], _calls_in(m[3]), m[4]) for m in v[1]),
        started_at=_then(v[2]),
        is_streaming=v[3],
        endpoint=v[4],
        client_protocol=v[5],
        origin=v[6],
        max_tokens=v[7],
        temperature=v[8],
        top_p=v[9],
        attempts=[
            Attempt(
                attempt=a[0],
                provider=a[1],
                model_used=a[2],
                started_at=_then(a[3]),
                success=a[4],
                status_code=a[5],
                response_time_ms=a[6],
                time_to_first_token_ms=a[7],
                time_to_last_token_ms=a[8],
                tokens_per_second=a[9],
                finish_reason=a[10],
                error_type=a[11],
                error_message=a[12],
                usage=Usage(*a[13]),
                cost_usd=a[14],
                upstream_id=a[15],
                usage_estimated=a[16],
            )
            for a in v[10]
        ],
        choices=[Choice(c[0], c[1], c[2], _calls_in(c[3]), c[4]) for c in v[11]],
        user_id=v[12],
        api_key_id=v[13],
        chain_id=_uuid_in(v[14]),
        reply_to=None
        if reply is None
        else ReplyTo(
            reply[0],
            uuid.UUID(int=reply[1]),
            reply[2],
            reply[3],
            tuple(uuid.UUID(int=u) for u in reply[4]),
            reply[5],
            reply[6],
        ),
    )
