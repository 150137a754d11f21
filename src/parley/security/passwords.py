"""Password hashing with argon2id (argon2-cffi's RFC 9106 low-memory profile).

Invariants: a plain password is never stored, logged or returned; ``verify`` answers
False for a wrong password or an unreadable hash, never raises; ``burn`` spends the time
of one verification, so that a login for an unknown user takes as long as one for a
known user with a wrong password (no user enumeration by timing).
"""

from __future__ import annotations

import functools
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from parley.errors import InvalidRequest

MIN_LENGTH = 8
# argon2 hashes any length, but hashing megabytes per login attempt is a denial of service.
MAX_LENGTH = 1024

# Configuration only (no state): safe to share between threads.
_HASHER = PasswordHasher()


def check_password(password: object, param: str = "password") -> str:
    """``password`` if it is acceptable, else ``InvalidRequest`` (the value is never echoed)."""
    if not isinstance(password, str):
        raise InvalidRequest(f"'{param}' must be a string", param)
    if len(password) < MIN_LENGTH:
        raise InvalidRequest(f"'{param}' must be at least {MIN_LENGTH} characters long", param)
    if len(password) > MAX_LENGTH:
        raise InvalidRequest(f"'{param}' must be at most {MAX_LENGTH} characters long", param)
    return password


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (salted; about 0.1 s of CPU)."""
    return _HASHER.hash(password)


def verify(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """Whether ``password_hash`` was made with other parameters than today's."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def burn(password: str) -> None:
    """Spend one verification's time on ``password`` against a hash nobody knows."""
    verify(_dummy_hash(), password)


@functools.cache
def _dummy_hash() -> str:
    # Made on first use (not at import), with today's parameters so the timing matches.
    return _HASHER.hash(secrets.token_urlsafe(16))
