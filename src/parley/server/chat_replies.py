"""How the chat API writes what it answers: conversations and messages as JSON, and an
answer (a ``chat.interface.Reply``) as Server-Sent Events or one JSON body.

Invariants:
- an answer streams as SSE (``event: message`` with the stored message answered,
  ``event: delta`` per text piece, then ``event: done`` with the stored answer or
  ``event: error``; each event's data one line, even for a client that splits lines as
  ``str.splitlines`` does) or, with ``"stream": false``, as one JSON body. ``done`` is
  sent only once the answer is committed (durable recording), as on ``/v1``;
- a client that goes away mid-stream cancels the upstream call (closing the event
  stream does it, see ``chat.service``); what was received is recorded;
- an answer always ends with ``done`` or ``error``: a failure that is not a
  ``ParleyError`` (parley's own fault) is logged and answered as an internal error, as
  an event once the stream began, since headers already sent leave the error middleware
  nothing to answer with;
- a message is shown the same way wherever it appears (``GET``, the send's events and
  bodies): ``message_json``; files as metadata (id, file name, MIME type, size), never
  their bytes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import orjson
from aiohttp import web

from parley.chat.interface import ChatEvent, Delta, Done, Failed, Reply
from parley.errors import ParleyError
from parley.server.relay import SSE_HEADERS
from parley.store.conversations import Conversation, StoredMessage, Tree

log = logging.getLogger(__name__)


async def answer(request: web.Request, reply: Reply, stream: bool) -> web.StreamResponse:
    """Send ``reply``: as SSE when ``stream``, else as one JSON body."""
    events = _guarded(reply.events)
    if not stream:
        try:
            async for event in events:
                if isinstance(event, Done):
                    return json_response(
                        {
                            "user_message": message_json(reply.message),
                            "assistant_message": message_json(event.message),
                        }
                    )
                if isinstance(event, Failed):
                    body = event.error.to_openai()
                    body["user_message"] = message_json(reply.message)
                    return json_response(
                        body, status=event.error.status, headers=event.error.headers()
                    )
        finally:
            await events.aclose()
        raise ParleyError("the answer ended without a result")
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        await response.write(_frame("message", message_json(reply.message)))
        async for event in events:
            if isinstance(event, Delta):
                await response.write(_frame("delta", {"text": event.text}))
            elif isinstance(event, Done):
                await response.write(_frame("done", message_json(event.message)))
            else:
                await response.write(_frame("error", _error_json(event.error)))
        await response.write_eof()
    except (ConnectionError, OSError):
        # Only writes raise these here (``_guarded`` turns the answer's own failures into
        # ``Failed``): the client left; closing the events below cancels the upstream call.
        pass
    finally:
        await events.aclose()
    return response


async def _guarded(events: AsyncGenerator[ChatEvent, None]) -> AsyncGenerator[ChatEvent, None]:
    """``events``, with a failure that is not a ``ParleyError`` (a bug, a fault of the
    disk or the database) logged and ended as ``Failed``: never a silent end."""
    try:
        async for event in events:
            yield event
    except Exception:
        log.exception("an answer of the chat API failed")
        yield Failed(ParleyError("internal error while answering"))
    finally:
        await events.aclose()


def conversation_json(conversation: Conversation) -> dict[str, Any]:
    c = conversation
    return {
        "id": c.public_id,
        "title": c.title,
        "default_model": c.default_model,
        "source": c.source,
        "archived": c.archived,
        "pinned": c.pinned,
        "is_active": c.is_active,
        "system_prompt": c.system_prompt,
        "message_count": c.message_count,
        "last_message_at": c.last_message_at,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    }


def message_json(message: StoredMessage) -> dict[str, Any]:
    m = message
    usage = None
    if m.prompt_tokens is not None or m.completion_tokens is not None:
        usage = {
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "total_tokens": m.total_tokens,
        }
    return {
        "id": m.public_id,
        "parent_id": m.parent_public_id,
        "role": m.role,
        "content": m.content,
        # Stored as JSON text; embedded as it is rather than parsed and written again.
        "payload": orjson.Fragment(m.payload),
        "created_at": m.created_at,
        "model_used": m.model_used,
        "usage": usage,
        "finish_reason": m.finish_reason,
        "attachments": [
            {"id": a.public_id, "filename": a.filename, "mime_type": a.mime_type, "size": a.size}
            for a in m.attachments
        ],
        "citations": [
            {
                "index": c.ordinal,
                "document_id": c.document_public_id,
                "filename": c.filename,
                "page": c.page,
                "chunk": c.chunk_ordinal,
                "score": round(c.score, 4),
            }
            for c in m.citations
        ],
        # Why an answer was given without the conversation's documents, else null.
        "notice": m.notice,
    }


def tree_json(tree: Tree) -> dict[str, Any]:
    public_of = {m.id: m.public_id for m in tree.messages}
    path = [public_of[key] for key in tree.active_path]
    body = conversation_json(tree.conversation)
    body["active_leaf_id"] = path[-1] if path else None
    body["active_path"] = path
    body["messages"] = [message_json(m) for m in tree.messages]
    return body


# Characters that end a line for ``str.splitlines`` (so for httpx's ``iter_lines`` and
# the SSE readers built on it) but that orjson writes raw: escaped in a frame, so that a
# message holding one never cuts its event in two. (UTF-8 is self-synchronizing: these
# bytes are always those characters.)
_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def _frame(event: str, data: Mapping[str, Any]) -> bytes:
    body = orjson.dumps(data)
    if b"\xc2\x85" in body or b"\xe2\x80" in body:
        for raw, escaped in _LINE_BREAKS:
            body = body.replace(raw, escaped)
    return b"event: " + event.encode() + b"\ndata: " + body + b"\n\n"


def _error_json(error: ParleyError) -> dict[str, Any]:
    return {"message": error.message, "type": error.error_type, "status": error.status}


def json_response(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )
