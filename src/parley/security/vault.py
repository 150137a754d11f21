"""Provider keys encrypted at rest: the ``Vault`` turns a key into text safe to store and back.

The master secret is ``PARLEY_SECRET_KEY`` (any string) or, when that is not set, the key
file ``<data dir>/secret.key``: 32 random bytes in URL-safe base64, created on first run
with mode 0600 (``O_CREAT | O_EXCL``, so two processes starting together never both write
one) in a directory made with mode 0700. An existing key file that group or others may
read, or that does not hold 32 bytes of base64, is refused with a ``ConfigError``.

The encryption key is derived from the master secret with HKDF-SHA256, so any string
makes a full-strength key and the secret itself is used for nothing else. Ciphertext is
``v1.<key id>.<Fernet token>`` (ASCII text): Fernet (AES-128-CBC with HMAC-SHA256) makes
every encryption differ and detects tampering; the key id (also derived by HKDF, so it
reveals nothing of the key) lets a wrong master secret be named as the cause instead of
"damaged data". Invariants: plaintext never appears in an error, a log line or a repr.

Every provider key passes through the vault in plain text (set through the API, or read
from the database), so it keeps ``known_secrets``: the master secret and every plaintext
it encrypted or decrypted, for what stores request text (``metrics.redact``) to remove.
The set only grows (a replaced key stays a secret) and is replaced, never changed in
place, so a reader may cache what it derives from it by its identity.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from parley.errors import ConfigError
from parley.settings import Settings

_SALT = b"parley vault"
_FORMAT = "v1"
_KEY_BYTES = 32


class VaultError(ConfigError):
    """A stored secret cannot be decrypted (wrong master secret or damaged ciphertext)."""


@dataclass(frozen=True, slots=True)
class _Keys:
    fernet: Fernet
    key_id: str


class Vault:
    """Encrypts and decrypts short secrets (provider API keys) with the master secret."""

    __slots__ = ("_keys", "_known", "_lock", "source")

    def __init__(self, master_secret: str, source: str = "the master secret") -> None:
        """``source`` names where the secret came from, for error messages."""
        if not master_secret:
            raise ConfigError("the master secret is empty")
        raw = master_secret.encode()
        fernet_key = _derive(raw, b"parley provider keys")
        key_id = _derive(raw, b"parley key id")[:4].hex()
        self._keys = _Keys(Fernet(base64.urlsafe_b64encode(fernet_key)), key_id)
        self.source = source
        self._known = frozenset({master_secret})
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Vault(key_id={self._keys.key_id!r}, source={self.source!r})"

    @property
    def key_id(self) -> str:
        """A fingerprint of the encryption key (safe to show: it is derived separately)."""
        return self._keys.key_id

    @property
    def known_secrets(self) -> frozenset[str]:
        """The master secret and every plaintext this vault encrypted or decrypted."""
        return self._known

    @classmethod
    def from_settings(cls, settings: Settings) -> Vault:
        """The vault for ``settings``: ``PARLEY_SECRET_KEY``, else the key file (made on
        first run). Raises ``ConfigError`` for a key file that is unsafe or malformed."""
        if settings.secret_key is not None:
            return cls(settings.secret_key.get(), "PARLEY_SECRET_KEY")
        path = settings.secret_key_file
        return cls(load_or_create_key_file(path), f"the key file {path}")

    def encrypt(self, plaintext: str) -> str:
        """Ciphertext as ASCII text; two encryptions of the same text differ."""
        self._remember(plaintext)
        token = self._keys.fernet.encrypt(plaintext.encode()).decode("ascii")
        return f"{_FORMAT}.{self._keys.key_id}.{token}"

    def decrypt(self, ciphertext: str) -> str:
        """The plaintext of ``ciphertext``; ``VaultError`` naming the likely cause when it
        was made with another master secret or is damaged."""
        version, _, rest = ciphertext.partition(".")
        key_id, _, token = rest.partition(".")
        if version != _FORMAT or not key_id or not token:
            raise VaultError("a stored provider key is not in a format parley knows (damaged?)")
        if key_id != self._keys.key_id:
            raise VaultError(
                f"a stored provider key was encrypted with another master secret (key id "
                f"{key_id}; {self.source} gives {self._keys.key_id}): was PARLEY_SECRET_KEY "
                "changed or the key file replaced? Restore it, or set the key again"
            )
        try:
            plaintext = self._keys.fernet.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise VaultError(
                "a stored provider key could not be decrypted: its ciphertext is damaged"
            ) from None
        self._remember(plaintext)
        return plaintext

    def _remember(self, plaintext: str) -> None:
        if plaintext not in self._known:
            with self._lock:  # callers run on the event loop and in worker threads
                self._known = self._known | {plaintext}


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=_SALT, info=info).derive(secret)


def load_or_create_key_file(path: Path) -> str:
    """The master secret kept in ``path``; a new random one is written on first run."""
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = base64.urlsafe_b64encode(os.urandom(_KEY_BYTES)).decode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process made it first: use theirs.
        return _read_key_file(path)
    try:
        # The umask may have narrowed the mode further; never let it widen.
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def _read_key_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"the key file {path} is not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"the key file {path} may be read by other users (mode {stat.S_IMODE(mode):o}); "
                f"refusing to use it: run 'chmod 600 {path}'"
            )
        data = os.read(fd, 1024)
    finally:
        os.close(fd)
    text = data.decode("ascii", errors="replace").strip()
    try:
        decoded = base64.urlsafe_b64decode(text.encode("ascii", errors="replace"))
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != _KEY_BYTES or not text.isascii():
        # Another file written here by mistake: using it would silently change the key.
        raise ConfigError(
            f"the key file {path} is malformed (expected {_KEY_BYTES} bytes in URL-safe "
            "base64); restore it from a backup, or set PARLEY_SECRET_KEY"
        )
    return text
