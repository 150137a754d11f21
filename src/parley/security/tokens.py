"""Random tokens that stand for a user: API keys, web session tokens and CSRF tokens.

API keys look like ``pk-<43 URL-safe characters>`` (256 random bits); a key is shown to
its owner once, at creation, and stored as its SHA-256 hex digest, with its first
``PREFIX_LENGTH`` characters kept in clear so that a user can tell keys apart. Session
tokens are stored the same way. A SHA-256 digest is enough for these: they are random,
so there is nothing to guess from the digest, and a lookup by digest takes one index probe.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_MARK = "pk-"
PREFIX_LENGTH = 12
_RANDOM_BYTES = 32


def new_api_key() -> str:
    """A fresh API key: ``pk-`` and 43 URL-safe characters."""
    return API_KEY_MARK + secrets.token_urlsafe(_RANDOM_BYTES)


def new_session_token() -> str:
    """A fresh web session token (the cookie's value)."""
    return secrets.token_urlsafe(_RANDOM_BYTES)


def new_csrf_token() -> str:
    """A fresh CSRF token (43 characters; the column holds 64)."""
    return secrets.token_urlsafe(_RANDOM_BYTES)


def digest(token: str) -> str:
    """The SHA-256 hex digest a token is stored and looked up by."""
    return hashlib.sha256(_raw(token)).hexdigest()


def display_prefix(api_key: str) -> str:
    """The part of a key that may be shown again: its first ``PREFIX_LENGTH`` characters."""
    return api_key[:PREFIX_LENGTH]


def is_api_key(value: str) -> bool:
    """Whether ``value`` has the shape of a parley API key (worth a lookup)."""
    return value.startswith(API_KEY_MARK) and len(value) >= len(API_KEY_MARK) + 40


def same(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(_raw(given), _raw(expected))


def _raw(token: str) -> bytes:
    # A header or cookie that is not UTF-8 reaches us with lone surrogates in it (aiohttp
    # decodes with surrogateescape): encode them anyway, so such a value is a token that
    # matches nothing (a 401), never an encoding error (a 500). Real tokens are ASCII.
    return token.encode("utf-8", "surrogatepass")
