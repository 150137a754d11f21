"""Encrypted backup archives: a streaming AES-256-GCM container around the archive bytes.

Layout of an encrypted archive (all integers big-endian)::

    MAGIC                 8 bytes  b"PRLYENC\\x01"
    header length         4 bytes
    header                JSON, UTF-8: {"format": 1, "cipher": "AES-256-GCM",
                          "kdf": {"name": "scrypt", "n", "r", "p", "salt"}, "key_check",
                          "nonce_prefix", "chunk_size", "summary": {...}}
    frames, each:         1 byte flag (1 on the last frame, else 0), 4 bytes ciphertext
                          length, ciphertext (chunk plus its 16-byte tag)

The key is ``scrypt(secret, salt)``: 64 bytes, the first 32 the AES key, the SHA-256 of
the last 32 (``key_check``) tells a wrong secret apart from a damaged file without
revealing anything about the key. Each frame's nonce is ``nonce_prefix`` (7 random bytes)
|| frame counter (4 bytes) || flag, and every frame authenticates the whole header as
associated data: frames cannot be reordered, dropped, truncated at a frame boundary or
moved to another archive, and the unencrypted header (which ``parley backup list`` reads)
cannot be altered, without decryption failing. The header's ``summary`` holds only
non-sensitive fields (see ``ops.archive.summary``); row counts, digests and file names
stay inside the ciphertext. The secret and the derived key are never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from parley.errors import BackupError
from parley.settings import Secret

MAGIC = b"PRLYENC\x01"
CHUNK_SIZE = 1024 * 1024
_TAG = 16
# scrypt cost: ~32 MiB and ~0.1 s per archive; bounds below refuse a header that asks
# for an absurd cost (a crafted file must not exhaust memory before it is rejected).
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
_MAX_HEADER = 64 * 1024
_FRAME = struct.Struct(">BI")


def _derive(secret: Secret, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, str]:
    material = Scrypt(salt=salt, length=64, n=n, r=r, p=p).derive(secret.get().encode())
    check = hashlib.sha256(b"parley-backup-key-check\x00" + material[32:]).hexdigest()
    return material[:32], check


class SealedWriter:
    """A write-only file object: bytes written are encrypted into ``raw`` frame by frame.

    ``close()`` writes the last frame; it does not close ``raw``.
    """

    def __init__(self, raw: BinaryIO, secret: Secret, summary: dict[str, Any]) -> None:
        salt = os.urandom(16)
        key, check = _derive(secret, salt, **_SCRYPT)
        self._prefix = os.urandom(7)
        header = {
            "format": 1,
            "cipher": "AES-256-GCM",
            "kdf": {"name": "scrypt", **_SCRYPT, "salt": salt.hex()},
            "key_check": check,
            "nonce_prefix": self._prefix.hex(),
            "chunk_size": CHUNK_SIZE,
            "summary": summary,
        }
        body = json.dumps(header, sort_keys=True).encode()
        self._aad = MAGIC + struct.pack(">I", len(body)) + body
        self._aead = AESGCM(key)
        self._raw = raw
        self._buffer = bytearray()
        self._counter = 0
        self._closed = False
        raw.write(self._aad)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        # Keep at least one byte back, so the frame written by close() is never empty
        # unless the whole stream is.
        while len(self._buffer) > CHUNK_SIZE:
            self._frame(bytes(self._buffer[:CHUNK_SIZE]), last=False)
            del self._buffer[:CHUNK_SIZE]
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._frame(bytes(self._buffer), last=True)
            self._buffer.clear()
            self._raw.flush()

    def _frame(self, chunk: bytes, *, last: bool) -> None:
        nonce = self._prefix + struct.pack(">I", self._counter) + (b"\x01" if last else b"\x00")
        self._counter += 1
        sealed = self._aead.encrypt(nonce, chunk, self._aad)
        self._raw.write(_FRAME.pack(1 if last else 0, len(sealed)) + sealed)


def is_sealed(raw: BinaryIO) -> bool:
    """Whether ``raw`` (positioned at its start) is an encrypted archive; rewinds it."""
    start = raw.read(len(MAGIC))
    raw.seek(0)
    return start == MAGIC


def read_header(raw: BinaryIO, name: str) -> tuple[dict[str, Any], bytes]:
    """The header of the encrypted archive ``raw`` and its raw bytes (no key needed)."""
    if raw.read(len(MAGIC)) != MAGIC:
        raise BackupError(f"{name} is not an encrypted parley backup")
    size_bytes = raw.read(4)
    if len(size_bytes) != 4:
        raise BackupError(f"{name} is truncated (no header)")
    (size,) = struct.unpack(">I", size_bytes)
    if size > _MAX_HEADER:
        raise BackupError(f"{name} has a damaged header")
    body = raw.read(size)
    try:
        header = json.loads(body)
        if not isinstance(header, dict) or header.get("format") != 1:
            raise ValueError("unknown format")
    except ValueError:
        raise BackupError(f"{name} has a damaged or unknown header") from None
    return header, MAGIC + size_bytes + body


class SealedReader:
    """A read-only file object over an encrypted archive: yields the plaintext, and
    raises ``BackupError`` on a wrong key or any damaged, truncated or extended frame."""

    def __init__(self, raw: BinaryIO, secret: Secret | None, name: str) -> None:
        self._name = name
        header, self._aad = read_header(raw, name)
        if secret is None:
            raise BackupError(
                f"{name} is encrypted: set PARLEY_BACKUP_KEY to the key it was made with"
            )
        try:
            kdf = header["kdf"]
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            salt = bytes.fromhex(kdf["salt"])
            self._prefix = bytes.fromhex(header["nonce_prefix"])
            self._chunk = int(header["chunk_size"])
            expected = str(header["key_check"])
        except (KeyError, TypeError, ValueError):
            raise BackupError(f"{name} has a damaged header") from None
        if not (1 < n <= _MAX_N and 0 < r <= _MAX_R and 0 < p <= _MAX_P) or len(self._prefix) != 7:
            raise BackupError(f"{name} has a damaged header")
        key, check = _derive(secret, salt, n, r, p)
        if check != expected:
            raise BackupError(f"{name} was encrypted with a different key than PARLEY_BACKUP_KEY")
        self._aead = AESGCM(key)
        self._raw = raw
        self._counter = 0
        self._plain = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        # One frame is held at a time and served by offset: slicing the rest off on every
        # small read would copy the frame once per read.
        out: list[bytes] = []
        wanted = size
        while wanted != 0:
            if self._offset >= len(self._plain):
                if self._done:
                    break
                self._plain, self._offset = self._next_frame(), 0
                continue
            end = len(self._plain) if wanted < 0 else min(len(self._plain), self._offset + wanted)
            out.append(self._plain[self._offset : end])
            if wanted > 0:
                wanted -= end - self._offset
            self._offset = end
        return b"".join(out)

    def _next_frame(self) -> bytes:
        head = self._raw.read(_FRAME.size)
        if len(head) != _FRAME.size:
            raise BackupError(f"{self._name} is truncated (an encrypted frame is missing)")
        flag, length = _FRAME.unpack(head)
        if flag not in (0, 1) or not _TAG <= length <= self._chunk + _TAG:
            raise BackupError(f"{self._name} is damaged (bad frame header)")
        sealed = self._raw.read(length)
        if len(sealed) != length:
            raise BackupError(f"{self._name} is truncated")
        nonce = self._prefix + struct.pack(">I", self._counter) + bytes([flag])
        self._counter += 1
        try:
            chunk = self._aead.decrypt(nonce, sealed, self._aad)
        except InvalidTag:
            raise BackupError(
                f"{self._name} is damaged (an encrypted frame fails its check)"
            ) from None
        if flag == 1:
            self._done = True
            if self._raw.read(1):
                raise BackupError(f"{self._name} is damaged (data after the last frame)")
        return chunk
