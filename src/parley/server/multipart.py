"""Reading uploads from ``multipart/form-data`` bodies: HTTP only, shared by the upload routes.

``receive_form`` reads a form of one ``file`` part and a few small text fields. The file
is streamed to a pending blob in ``WRITE_BATCH`` pieces (off the event loop) while its
first bytes go to the type sniffer, and refused with 413 once it passes the limit; small
text fields are read whole, up to ``FIELD_MAX`` bytes of UTF-8. On any refusal the
pending blob is discarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from parley.chat.uploads import Sniffer, display_name
from parley.errors import BodyTooLarge, InvalidRequest, UnsupportedMediaType
from parley.store.blobs import PendingBlob

CHUNK = 64 * 1024
# Bytes gathered before one write to the blob store (off the event loop).
WRITE_BATCH = 1024 * 1024
# Multipart framing and small fields around the file: a body this much over the limit
# cannot hold a file within it, and is refused before it is read.
FRAMING_SLACK = 64 * 1024
FIELD_MAX = 256


@dataclass(slots=True)
class Upload:
    pending: PendingBlob
    filename: str
    sniffer: Sniffer
    # The small fields sent, stripped (a field sent empty is left out).
    fields: dict[str, str]
    # The file's bytes, when ``receive_form`` was asked to keep them.
    data: bytes


def check_form(request: web.Request, limit: int) -> None:
    """Refuse an upload from its headers, before a byte of it is read: 415 naming the
    ``Content-Type`` header when it is not a form, 413 when its announced length cannot
    hold a file within ``limit``."""
    if request.content_type != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type {request.content_type!r} is not accepted: send the file as "
            "multipart/form-data, in a field named 'file'",
            "Content-Type",
        )
    if request.content_length is not None and request.content_length > limit + FRAMING_SLACK:
        raise BodyTooLarge(f"the file is larger than the upload limit of {limit} bytes", "file")


async def receive_form(
    request: web.Request,
    begin: Callable[[], PendingBlob],
    limit: int,
    *,
    fields: tuple[str, ...],
    expected: str,
    keep: bool = False,
    once: bool = False,
) -> Upload:
    """Stream the form: the file into ``begin()``'s pending blob (and memory, with
    ``keep``), the ``fields`` into memory (``once``: a field sent twice is refused,
    otherwise the last one counts). ``expected`` completes the refusal of an unknown
    field ("send ...")."""
    pending: PendingBlob | None = None
    data = bytearray() if keep else None
    filename = display_name(None)
    sniffer = Sniffer()
    values: dict[str, str] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("nested multipart bodies are not accepted")
            if part.name == "file":
                if pending is not None:
                    raise InvalidRequest("send one file per upload", "file")
                encoding = part.headers.get("Content-Transfer-Encoding", "binary").lower()
                if encoding not in ("binary", "8bit", "7bit"):
                    raise InvalidRequest("Content-Transfer-Encoding is not supported", "file")
                pending = await asyncio.to_thread(begin)
                filename = display_name(part.filename)
                await stream_file(part, pending, sniffer, limit, keep=data)
            elif part.name in fields:
                if once and part.name in values:
                    raise InvalidRequest(f"send {part.name!r} once", part.name)
                values[part.name] = (await small_field(part, part.name)).strip()
            else:
                raise InvalidRequest(f"unknown form field {str(part.name)[:64]!r}: send {expected}")
    except ValueError as exc:  # aiohttp's multipart parser refusing malformed framing
        if pending is not None:
            await asyncio.to_thread(pending.discard)
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    except BaseException:
        if pending is not None:
            await asyncio.to_thread(pending.discard)
        raise
    if pending is None:
        raise InvalidRequest("the form has no 'file' field", "file")
    kept = bytes(data) if data is not None else b""
    return Upload(pending, filename, sniffer, {k: v for k, v in values.items() if v}, kept)


async def stream_file(
    part: BodyPartReader,
    pending: PendingBlob,
    sniffer: Sniffer,
    limit: int,
    keep: bytearray | None = None,
) -> None:
    """Write ``part`` to ``pending`` (and append it to ``keep``, when given)."""
    received = 0
    batch = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(f"the file is larger than the upload limit of {limit} bytes", "file")
        sniffer.feed(chunk)
        if keep is not None:
            keep += chunk
        batch += chunk
        if len(batch) >= WRITE_BATCH:
            await asyncio.to_thread(pending.write, bytes(batch))
            batch.clear()
    if batch:
        await asyncio.to_thread(pending.write, bytes(batch))


async def small_field(part: BodyPartReader, name: str) -> str:
    """A short text field's value; 400 when it is too long or not UTF-8."""
    data = bytearray()
    while chunk := await part.read_chunk(FIELD_MAX):
        data += chunk
        if len(data) > FIELD_MAX:
            raise InvalidRequest(f"form field {name!r} is too long", name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"form field {name!r} is not UTF-8 text", name) from None
