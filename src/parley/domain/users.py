"""Users and what stands for them, as pure values: ``User``, ``ApiKey`` (as it may be
shown: never the key, never its hash), ``Principal`` (who a valid key or session is) and
``NewSession``; and the checks every user field passes, whoever writes it (the API, the
CLI). A failed check is an ``InvalidRequest`` naming the field, never echoing a secret.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from parley.domain.times import utc
from parley.errors import InvalidRequest

ROLES: Final = ("user", "admin")
_USERNAME = re.compile(r"[A-Za-z0-9_.-]{3,64}")
_MAX_FULL_NAME = 200
_MAX_KEY_NAME = 128
# The furthest ahead a key's expiry may be, in days (a key that should not expire gets
# none): a year-9999 expiry is a mistake, and near the end of the calendar a time cannot
# even be converted to UTC.
MAX_KEY_DAYS: Final = 3650


@dataclass(frozen=True, slots=True)
class User:
    id: int
    public_id: uuid.UUID
    email: str
    username: str
    full_name: str | None
    role: str
    is_active: bool
    preferences: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    last_active_at: datetime | None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as it may be shown: never the key, never its hash."""

    id: int
    public_id: uuid.UUID
    user_id: int
    user_public_id: uuid.UUID
    username: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid API key or web session stands for."""

    user_id: int
    role: str
    api_key_id: int | None = None
    session_id: int | None = None
    # Sessions only: the token cookie-authenticated writes must echo, and the expiry.
    csrf_token: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just made: the cookie's value exists only here."""

    id: int
    token: str
    csrf_token: str
    expires_at: datetime


def normalise_email(email: object) -> str:
    """``email`` lower-cased, if it looks like one (one ``@``, a dot in the domain)."""
    if not isinstance(email, str):
        raise InvalidRequest("'email' must be a string", "email")
    value = email.strip().lower()
    local, at, domain = value.partition("@")
    if (
        not at
        or not local
        or "@" in domain
        or "." not in domain.strip(".")
        or domain.startswith(".")
        or domain.endswith(".")
        or any(c.isspace() for c in value)
        or len(value) > 320
    ):
        raise InvalidRequest("'email' is not a valid email address", "email")
    return value


def check_username(username: object) -> str:
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise InvalidRequest(
            "'username' must be 3 to 64 characters: letters, digits, '_', '.' or '-'",
            "username",
        )
    return username


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidRequest("'role' must be 'user' or 'admin'", "role")
    assert isinstance(role, str)
    return role


def check_full_name(full_name: object) -> str | None:
    if full_name is None:
        return None
    if not isinstance(full_name, str) or len(full_name) > _MAX_FULL_NAME:
        raise InvalidRequest(
            f"'full_name' must be a string of at most {_MAX_FULL_NAME} characters", "full_name"
        )
    return full_name.strip() or None


def check_key_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > _MAX_KEY_NAME:
        raise InvalidRequest(
            f"'name' must be a non-empty string of at most {_MAX_KEY_NAME} characters", "name"
        )
    return name.strip()


def check_key_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    """A key's expiry in UTC: None (never), or a time after ``now`` and at most
    ``MAX_KEY_DAYS`` days after it (a time without an offset is UTC)."""
    if expires_at is None:
        return None
    if expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    # Compared before converting: a time beyond the bound may not convert at all.
    if expires_at <= now:
        raise InvalidRequest("'expires_at' must be in the future", "expires_at")
    if expires_at > now + timedelta(days=MAX_KEY_DAYS):
        raise InvalidRequest(
            f"'expires_at' must be at most {MAX_KEY_DAYS} days ahead", "expires_at"
        )
    return utc(expires_at)
