"""Documents for answers (``/api/documents``): upload, list, get, delete. HTTP only.

An upload is ``multipart/form-data`` with a ``file`` and either ``conversation_id`` (the
document is used when answering in that conversation, and belongs to its owner) or
``collection`` (a name of the caller's own; a message names the collections to use).
The file is streamed into the blob store while counted, hashed and sniffed, then read and
chunked (``search.documents``) before anything is stored: an empty file, a file named
``.pdf`` that is not a PDF, an encrypted or damaged PDF, a file without text is a 400 with
a ``code`` saying why, a type that is not a document a 415, a file over
``max_upload_bytes`` a 413; each of them with ``param`` ``file``. In every refused case
nothing is kept. An accepted document is
``pending`` until the indexer has embedded all of its chunks (``indexed``), or ``failed``
with its ``error``.

Ownership: every route asks ``identity.current(request)``; a document or conversation the
caller may not see is a 404, the same as one that does not exist. Admins see every
document; listings are the caller's own (or a conversation's).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from parley.errors import InvalidRequest, NotFound
from parley.search.documents import DocumentRefused, chunk, document_type, extract
from parley.search.documents_library import DocumentLibrary, collection_name
from parley.search.rag import Retriever
from parley.server import identity
from parley.server.multipart import check_form, receive_form
from parley.server.params import page_size
from parley.server.state import SERVICES
from parley.store.blobs import BlobStore
from parley.store.documents import MAX_PAGE, STATUSES, DocumentRow


@dataclass(frozen=True, slots=True)
class Documents:
    library: DocumentLibrary
    # None while no embedder is available: answers are given without documents.
    retriever: Retriever | None


DOCUMENTS = web.AppKey("parley.documents", Documents)


def add_routes(app: web.Application) -> None:
    """Register this module's routes and the document library's lifespan on ``app``."""
    app.cleanup_ctx.append(_lifespan)
    app.router.add_post("/api/documents", upload)
    app.router.add_get("/api/documents", list_documents)
    app.router.add_get("/api/documents/{id}", get_document)
    app.router.add_delete("/api/documents/{id}", delete_document)


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    # Runs after the app's own lifespan: the schema is at head and SERVICES is set.
    services = app[SERVICES]
    blobs = BlobStore(services.settings.blob_dir)
    await asyncio.to_thread(blobs.ensure)
    retriever: Retriever | None = None
    # The embedder and vector store (``search.services``), made by the app's lifespan.
    search = services.search
    if search is not None and search.embedder is not None:
        retriever = Retriever(services.engine, search.embedder, search.vectors)
    app[DOCUMENTS] = Documents(DocumentLibrary(services.engine, blobs), retriever)
    yield


async def upload(request: web.Request) -> web.Response:
    """Upload a document (multipart ``file`` with ``conversation_id`` or ``collection``).

    PDF, HTML, Markdown or UTF-8 text. The text is extracted (with page numbers for a PDF)
    and cut into overlapping chunks before the answer: 201 with the document, ``pending``
    until its chunks are embedded. Refused files (empty, not a PDF, encrypted, no text:
    400; not a document type: 415; too large: 413) leave nothing stored.
    """
    caller = identity.current(request)
    library = request.app[DOCUMENTS].library
    limit = request.app[SERVICES].settings.max_upload_bytes
    check_form(request, limit)
    # receive_form discards the file it was writing when it refuses the form.
    upload = await receive_form(
        request,
        library.begin,
        limit,
        fields=("conversation_id", "collection"),
        expected="'file' and 'conversation_id' or 'collection'",
        keep=True,
        once=True,
    )
    pending = upload.pending
    data, filename, sniffer, fields = upload.data, upload.filename, upload.sniffer, upload.fields
    try:
        conversation = fields.get("conversation_id")
        place = await asyncio.to_thread(
            library.place,
            conversation=None if conversation is None else _public_id(conversation, "conversation"),
            collection=_collection(fields.get("collection")),
            user_id=caller.user_id,
            may_see=caller.may_see,
        )
        if not data:
            raise DocumentRefused("the file is empty", "empty_file")
        mime_type = document_type(filename, sniffer.mime_type(filename), data[:512])
        extracted = await asyncio.to_thread(extract, data, mime_type)
        chunks = await asyncio.to_thread(chunk, extracted)
        row = await asyncio.to_thread(
            library.record, pending, place, filename=filename, extracted=extracted, chunks=chunks
        )
    finally:
        await asyncio.to_thread(pending.discard)
    return _json(document_json(row), status=201)


async def list_documents(request: web.Request) -> web.Response:
    """List your documents (or a conversation's), newest first, with their status.

    Query: ``conversation_id?``, ``collection?``, ``status?`` (pending, indexed, failed),
    ``limit`` (1-200, default 50), ``after`` (a page's ``next_cursor``).
    ``{"data": [...], "next_cursor": ...}``.
    """
    caller = identity.current(request)
    query = request.query
    status = query.get("status") or None
    if status is not None and status not in STATUSES:
        raise InvalidRequest("'status' must be pending, indexed or failed", "status")
    conversation = query.get("conversation_id") or None
    after = query.get("after") or None
    limit = page_size(query.get("limit"), MAX_PAGE)
    rows = await asyncio.to_thread(
        request.app[DOCUMENTS].library.listing,
        user_id=caller.user_id,
        may_see=caller.may_see,
        conversation=None if conversation is None else _public_id(conversation, "conversation"),
        collection=_collection(query.get("collection")),
        status=status,
        after=None if after is None else _cursor(after),
        limit=limit,
    )
    next_cursor = str(rows[-1].public_id) if len(rows) == limit else None
    return _json({"data": [document_json(r) for r in rows], "next_cursor": next_cursor})


async def get_document(request: web.Request) -> web.Response:
    """A document's metadata and status (``pending``, ``indexed``, ``failed`` with ``error``)."""
    return _json(document_json(await _document(request)))


async def delete_document(request: web.Request) -> web.Response:
    """Delete a document with its chunks and their vectors (its blob goes when nothing else
    refers to it). Answers keep their citations, without the document's id."""
    row = await _document(request)
    await asyncio.to_thread(request.app[DOCUMENTS].library.delete, row)
    return _json({"id": str(row.public_id), "object": "document", "deleted": True})


def document_json(row: DocumentRow) -> dict[str, Any]:
    return {
        "id": str(row.public_id),
        "object": "document",
        "filename": row.filename,
        "mime_type": row.mime_type,
        "size": row.size,
        "sha256": row.sha256,
        "conversation_id": _opt_str(row.conversation_public_id),
        "collection": row.collection,
        "status": row.status,
        "error": row.error,
        "page_count": row.page_count,
        "chunk_count": row.chunk_count,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }


# --- input ---------------------------------------------------------------------------


def _collection(value: str | None) -> str | None:
    return None if value is None or value == "" else collection_name(value)


async def _document(request: web.Request) -> DocumentRow:
    caller = identity.current(request)
    public_id = _public_id(request.match_info["id"], "document")
    return await asyncio.to_thread(request.app[DOCUMENTS].library.get, public_id, caller.may_see)


def _public_id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None


def _cursor(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest("'after' must be a page's next_cursor", "after") from None


def _opt_str(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
