"""Reading uploads from ``multipart/form-data`` bodies: HTTP only, shared by the upload routes.

A file part is streamed to a pending blob in ``WRITE_BATCH`` pieces (off the event loop)
while its first bytes go to the type sniffer, and refused with 413 once it passes the
limit; small text fields are read whole, up to ``FIELD_MAX`` bytes of UTF-8.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader

from parley.chat.uploads import Sniffer
from parley.errors import BodyTooLarge, InvalidRequest
from parley.store.blobs import PendingBlob

CHUNK = 64 * 1024
# Bytes gathered before one write to the blob store (off the event loop).
WRITE_BATCH = 1024 * 1024
# Multipart framing and small fields around the file: a body this much over the limit
# cannot hold a file within it, and is refused before it is read.
FRAMING_SLACK = 64 * 1024
FIELD_MAX = 256


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
            raise BodyTooLarge(f"the file is larger than the upload limit of {limit} bytes")
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
