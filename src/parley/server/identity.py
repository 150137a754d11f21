"""Who is calling: the ``Identity`` every handler asks for, whatever the auth channel.

The auth middleware (``server/auth.py``) resolves one ``Identity`` per request and stores
it on the request; handlers call ``current(request)`` (any caller), ``user_of(request)``
(a caller that owns things: a user, or the local / master admin) or ``admin(request)``.
Channels: the master key (``PARLEY_MASTER_KEY``: the admin bootstrap, no user row), a
user's API key (``Authorization: Bearer`` or ``x-api-key``), a web session cookie (writes
also need the session's CSRF token in ``X-CSRF-Token``). Without a master key parley runs
in local mode (loopback only): every request is the local admin.

Invariants: ownership checks compare ``Identity.user_id`` with a row's ``user_id``; an
admin sees everything; a caller who may not see a row gets the same 404 as for a row
that does not exist, so ids cannot be probed.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from parley.errors import AuthenticationFailed, NotFound

# Set on the app when it runs without a master key: no middleware runs on the hot path,
# and every caller is ``LOCAL``.
LOCAL_MODE = web.AppKey("parley.local_mode", bool)


@dataclass(frozen=True, slots=True)
class Identity:
    # None for the master key and for local mode: an admin with no user row.
    user_id: int | None
    api_key_id: int | None
    role: str  # "admin" | "user"
    # "local" | "master" | "api_key" | "session"
    via: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner_id: int | None) -> bool:
        """Whether this caller may see a row owned by ``owner_id``."""
        return self.is_admin or (self.user_id is not None and owner_id == self.user_id)


IDENTITY_KEY = web.RequestKey("parley.identity", Identity)
LOCAL = Identity(user_id=None, api_key_id=None, role="admin", via="local")
MASTER = Identity(user_id=None, api_key_id=None, role="admin", via="master")


def current(request: web.Request) -> Identity:
    """The caller; ``AuthenticationFailed`` (401) when nobody authenticated."""
    found = request.get(IDENTITY_KEY)
    if isinstance(found, Identity):
        return found
    if request.app.get(LOCAL_MODE, False):
        return LOCAL
    raise AuthenticationFailed("authentication required")


def admin(request: web.Request) -> Identity:
    """The caller, who must be an admin; anyone else gets a 404 (admin routes are not
    advertised to users)."""
    caller = current(request)
    if not caller.is_admin:
        raise NotFound(f"no such endpoint: {request.method} {request.path}")
    return caller
