"""Attachments (``/api/attachments``) and history export / import (``/api/export``,
``/api/conversations/{id}/export``, ``/api/import``).

Uploads are ``multipart/form-data`` streamed into the blob store (``store.blobs``) while
their bytes are counted, hashed and sniffed: over ``max_upload_bytes`` is a 413, nothing
is an 400, a type outside the allowlist (``chat.uploads``) a 415, and in every refused
case the temporary file is gone before the answer is sent. The client's file name is
kept, sanitised, as metadata only. Downloads are always ``Content-Disposition:
attachment`` with ``nosniff`` and a sandboxing CSP, so an upload can never run as a page
of parley's origin.

Ownership: every route asks ``identity.current(request)``; an attachment or conversation
the caller may not see is a 404, the same as one that does not exist. Attachments made in
local mode or with the master key have no owner (the local admin's, like conversations).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import orjson
import sqlalchemy
from aiohttp import web

from parley.chat import history
from parley.chat.attachments import Attachments
from parley.chat.uploads import TEXT_TYPES, Sniffer
from parley.errors import BodyTooLarge, InvalidRequest, NotFound, UnsupportedMediaType
from parley.server import identity
from parley.server.multipart import CHUNK, check_form, receive_form
from parley.server.state import SERVICES
from parley.store.attachments import AttachmentRow, ConversationRef
from parley.store.blobs import BlobStore, PendingBlob


@dataclass(frozen=True, slots=True)
class Files:
    engine: sqlalchemy.Engine
    attachments: Attachments


FILES = web.AppKey("parley.files", Files)


def add_routes(app: web.Application) -> None:
    """Register this module's routes and the attachment store's lifespan on ``app``."""
    app.cleanup_ctx.append(_lifespan)
    app.router.add_post("/api/attachments", upload)
    app.router.add_get("/api/attachments/{id}", metadata)
    app.router.add_get("/api/attachments/{id}/content", download)
    app.router.add_delete("/api/attachments/{id}", remove)
    app.router.add_get("/api/conversations/{id}/export", export_conversation)
    app.router.add_get("/api/export", export_all)
    app.router.add_post("/api/import", import_history)


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    # Runs after the app's own lifespan: the schema is at head and SERVICES is set.
    settings = app[SERVICES].settings
    engine = app[SERVICES].engine
    blobs = BlobStore(settings.blob_dir)
    await asyncio.to_thread(blobs.ensure)
    await asyncio.to_thread(blobs.clean_temporary)
    app[FILES] = Files(engine, Attachments(engine, blobs))
    yield


# --- attachments ---------------------------------------------------------------------


async def upload(request: web.Request) -> web.Response:
    """Upload an attachment (multipart ``file``, optional ``conversation_id``)."""
    caller = identity.current(request)
    files = request.app[FILES].attachments
    limit = request.app[SERVICES].settings.max_upload_bytes
    check_form(request, limit)
    pending: PendingBlob | None = None
    try:
        upload = await receive_form(
            request,
            files.begin,
            limit,
            fields=("conversation_id",),
            expected="'file' and, optionally, 'conversation_id'",
        )
        pending, filename, sniffer = upload.pending, upload.filename, upload.sniffer
        conversation_field = upload.fields.get("conversation_id")
        if pending.size == 0:
            raise InvalidRequest("the file is empty", "file")
        mime_type = sniffer.mime_type(filename)
        if mime_type is None:
            raise _unsupported(sniffer)
        conversation: ConversationRef | None = None
        if conversation_field:
            conversation = await asyncio.to_thread(
                files.conversation, _public_id(conversation_field, "conversation"), caller.may_see
            )
        row = await asyncio.to_thread(
            files.record,
            pending,
            user_id=caller.user_id,
            conversation=conversation,
            filename=filename,
            mime_type=mime_type,
        )
    finally:
        if pending is not None:
            await asyncio.to_thread(pending.discard)
    return _json(_attachment_json(row), status=201)


def _unsupported(sniffer: Sniffer) -> UnsupportedMediaType:
    detected = sniffer.detected()
    what = f"files of type {detected}" if detected else "binary files of unknown type"
    return UnsupportedMediaType(
        f"{what} are not accepted: upload PNG, JPEG, GIF or WebP images, PDF, or UTF-8 "
        "text (plain, Markdown, CSV, JSON)",
        "file",
    )


async def metadata(request: web.Request) -> web.Response:
    """An attachment's metadata (name, MIME type, size, dates)."""
    row = await _attachment(request)
    return _json(_attachment_json(row))


async def download(request: web.Request) -> web.StreamResponse:
    """Download an attachment's bytes (as an attachment, ``nosniff``)."""
    row = await _attachment(request)
    files = request.app[FILES].attachments
    handle = await asyncio.to_thread(files.open, row)
    try:
        response = web.StreamResponse(
            headers={
                "Content-Disposition": content_disposition(row.filename),
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cache-Control": "private, no-cache",
            }
        )
        response.content_type = row.mime_type
        if row.mime_type in TEXT_TYPES:
            response.charset = "utf-8"
        response.content_length = os.fstat(handle.fileno()).st_size
        await response.prepare(request)
        while chunk := await asyncio.to_thread(handle.read, 256 * 1024):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        handle.close()


async def remove(request: web.Request) -> web.Response:
    """Delete an attachment (its blob goes when nothing else refers to it)."""
    row = await _attachment(request)
    await asyncio.to_thread(request.app[FILES].attachments.delete, row)
    return _json({"id": str(row.public_id), "object": "attachment", "deleted": True})


async def _attachment(request: web.Request) -> AttachmentRow:
    caller = identity.current(request)
    public_id = _public_id(request.match_info["id"], "attachment")
    files = request.app[FILES].attachments
    return await asyncio.to_thread(files.get, public_id, caller.may_see)


def _attachment_json(row: AttachmentRow) -> dict[str, Any]:
    return {
        "id": str(row.public_id),
        "object": "attachment",
        "filename": row.filename,
        "mime_type": row.mime_type,
        "size": row.size,
        "sha256": row.sha256,
        "conversation_id": _opt_str(row.conversation_public_id),
        "message_id": _opt_str(row.message_public_id),
        "created_at": row.created_at.isoformat(),
    }


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` fallback and the exact name as RFC 6266 /
    RFC 8187 ``filename*`` (UTF-8, percent-encoded)."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;%' else "_" for c in filename)
    encoded = quote(filename, safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# --- export and import ---------------------------------------------------------------


async def export_conversation(request: web.Request) -> web.Response:
    """Export one conversation as parley JSON or OpenAI-messages JSONL."""
    caller = identity.current(request)
    fmt = _export_format(request)
    public_id = _public_id(request.match_info["id"], "conversation")
    engine = request.app[FILES].engine
    conv_id = await asyncio.to_thread(history.conversation_id, engine, public_id, caller.may_see)
    body = await asyncio.to_thread(history.export, engine, [conv_id], fmt)
    return _download(body, fmt, f"conversation-{public_id}")


async def export_all(request: web.Request) -> web.Response:
    """Export all of the caller's conversations as parley JSON or JSONL."""
    caller = identity.current(request)
    fmt = _export_format(request)
    engine = request.app[FILES].engine
    ids = await asyncio.to_thread(history.user_conversations, engine, caller.user_id)
    body = await asyncio.to_thread(history.export, engine, ids, fmt)
    return _download(body, fmt, f"parley-export-{datetime.now(UTC):%Y%m%d-%H%M%S}")


async def import_history(request: web.Request) -> web.Response:
    """Import a parley export or a ChatGPT ``conversations.json``."""
    caller = identity.current(request)
    fmt = request.query.get("format") or None
    settings = request.app[SERVICES].settings
    # An export is an upload: it may be as large as an attachment.
    raw = await _read_limited(request, max(settings.max_body_bytes, settings.max_upload_bytes))
    engine = request.app[FILES].engine
    ids = await asyncio.to_thread(history.import_document, engine, raw, fmt, caller.user_id)
    return _json({"imported": len(ids), "conversations": [str(i) for i in ids]}, status=201)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    body = bytearray()
    while chunk := await request.content.read(CHUNK):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    return bytes(body)


def _export_format(request: web.Request) -> str:
    fmt = request.query.get("format", "json")
    if fmt not in history.EXPORT_FORMATS:
        raise InvalidRequest(f"unknown export format {fmt[:32]!r}: use json or jsonl", "format")
    return fmt


def _download(body: bytes, fmt: str, stem: str) -> web.Response:
    return web.Response(
        body=body,
        headers={
            "Content-Type": history.MEDIA_TYPES[fmt],
            "Content-Disposition": content_disposition(f"{stem}.{fmt}"),
            "X-Content-Type-Options": "nosniff",
        },
    )


# --- helpers -------------------------------------------------------------------------


def _public_id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None


def _opt_str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
