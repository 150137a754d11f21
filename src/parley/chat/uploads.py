"""What an upload is: its MIME type judged from its bytes, and a safe display name.

Pure functions and one incremental ``Sniffer`` (fed chunk by chunk as an upload streams
in). Invariants:
- the MIME type comes from the content, never from the client's ``Content-Type``:
  binary formats by their magic numbers (``filetype``), text by being valid UTF-8 without
  NUL bytes; only ``ALLOWED`` types are accepted;
- a file name is display metadata only: ``display_name`` strips directories, control and
  format characters and bounds the length; it never becomes a path.
"""

from __future__ import annotations

import codecs
import unicodedata

import filetype  # type: ignore[import-untyped]

# Binary types accepted, recognised by their magic numbers.
BINARY_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"})
# Text types: valid UTF-8 content, named by the file's extension (text/plain otherwise).
TEXT_BY_EXTENSION = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
}
TEXT_TYPES = frozenset({"text/plain", *TEXT_BY_EXTENSION.values()})
ALLOWED = BINARY_TYPES | TEXT_TYPES
IMAGE_TYPES = frozenset(t for t in BINARY_TYPES if t.startswith("image/"))

# Enough for every signature ``filetype`` knows.
_HEAD_BYTES = 8192
MAX_NAME_CHARS = 255
_FALLBACK_NAME = "upload"


class Sniffer:
    """Watches an upload's bytes go by and says what they are."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = True

    def feed(self, chunk: bytes) -> None:
        if len(self._head) < _HEAD_BYTES:
            self._head += chunk[: _HEAD_BYTES - len(self._head)]
        if self._text:
            try:
                self._utf8.decode(chunk)
            except UnicodeDecodeError:
                self._text = False
            else:
                self._text = b"\x00" not in chunk

    def mime_type(self, filename: str) -> str | None:
        """The accepted MIME type of everything fed so far, or None (refuse it).

        Magic numbers decide first; content that is valid UTF-8 without NUL bytes is text
        even when a short signature matched by chance ("BM..." is also a bitmap's).
        """
        kind = filetype.guess(bytes(self._head))
        if kind is not None and kind.mime in BINARY_TYPES:
            return str(kind.mime)
        if not self._text:
            return None
        try:
            self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            return None  # ends inside a multi-byte character
        return text_type(filename)

    def detected(self) -> str | None:
        """What ``filetype`` recognised (for a refusal's message), if anything."""
        kind = filetype.guess(bytes(self._head))
        return None if kind is None else str(kind.mime)


def text_type(filename: str) -> str:
    dot = filename.rfind(".")
    extension = filename[dot:].lower() if dot > 0 else ""
    return TEXT_BY_EXTENSION.get(extension, "text/plain")


def display_name(raw: str | None) -> str:
    """The user's file name made safe to keep and show: its last path component, without
    control or format characters (NUL, newlines, bidirectional overrides), trimmed, at
    most ``MAX_NAME_CHARS`` characters (the extension kept); "upload" if nothing is left."""
    if not raw:
        return _FALLBACK_NAME
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf", "Cs"))
    name = unicodedata.normalize("NFC", name).strip()
    if not name.strip("."):  # nothing, or only dots
        return _FALLBACK_NAME
    if len(name) > MAX_NAME_CHARS:
        dot = name.rfind(".")
        extension = name[dot:] if dot > 0 and len(name) - dot <= 16 else ""
        name = name[: MAX_NAME_CHARS - len(extension)].rstrip() + extension
    return name
