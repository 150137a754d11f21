"""Incremental Server-Sent Events decoding, shared by every SSE-speaking adapter.

``SSEDecoder`` returns exactly the events a conforming SSE reader dispatches, whatever the
read boundaries (LF, CRLF or CR line ends; multi-line ``data`` joined by LF; comments and
other fields, ``event:`` included, dropped; events without data not dispatched), and
refuses an event over ``MAX_EVENT_BYTES`` instead of buffering without bound. Providers
whose events carry their type inside the JSON (OpenAI, Anthropic, Gemini) need only data.
"""

from __future__ import annotations

from parley.errors import UpstreamProtocolError

# One SSE event larger than this is not a chat chunk: refuse it rather than buffer forever.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEDecoder:
    """Incremental Server-Sent Events decoder: bytes in, each event's data out."""

    __slots__ = ("_buf", "_cr")

    def __init__(self) -> None:
        # The start of an event still waiting for its blank line (usually empty).
        self._buf = bytearray()
        # A CR ending a read may be half of a CRLF: held until the next read shows.
        self._cr = False

    def feed(self, data: bytes) -> list[bytes]:
        """The data of every event completed by ``data``."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if b"\r" in data:
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buf:
            pending = self._buf
            # Only the new bytes (and a blank line split across reads) can end an event,
            # so a big event arriving in many reads is appended, not re-copied and
            # re-scanned each time.
            ends = b"\n\n" in data or (pending.endswith(b"\n") and data.startswith(b"\n"))
            pending += data
            if len(pending) > MAX_EVENT_BYTES:
                raise UpstreamProtocolError("upstream sent an SSE event larger than 16 MiB")
            if not ends:
                return []
            buf = bytes(pending)
            pending.clear()
        else:
            buf = data
        out: list[bytes] = []
        start = 0
        find = buf.find
        while (end := find(b"\n\n", start)) >= 0:
            if buf.startswith(b"data: ", start) and find(b"\n", start, end) < 0:
                out.append(buf[start + 6 : end])  # the usual one-line event
            else:
                payload = _event_data(buf[start:end])
                if payload is not None:
                    out.append(payload)
            start = end + 2
        if start < len(buf):
            self._buf += memoryview(buf)[start:]
        return out

    def close(self) -> list[bytes]:
        """At end of stream: an event whose last line ended but whose blank line never
        came is kept (some servers omit it); a line cut off mid-way is dropped."""
        tail = bytes(self._buf) + b"\n" if self._cr else bytes(self._buf)
        self._buf.clear()
        self._cr = False
        if not tail.endswith(b"\n"):
            return []
        payload = _event_data(tail.rstrip(b"\n"))
        return [] if payload is None else [payload]


def _event_data(block: bytes) -> bytes | None:
    lines: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data"):
            rest = line[4:]
            if not rest:
                lines.append(b"")
            elif rest.startswith(b":"):
                lines.append(rest[2:] if rest.startswith(b": ") else rest[1:])
            # "dataX: ..." is another field: dropped like any other.
    return b"\n".join(lines) if lines else None
