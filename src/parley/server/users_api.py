"""The identity routes of the chat API: login and sessions, the caller's profile, API keys,
and the admin's user management.

Routes (JSON; errors are OpenAI error JSON):

- ``POST /api/auth/login``, ``POST /api/auth/logout``, ``GET /api/auth/session``;
- ``GET|PATCH /api/me``;
- ``GET|POST /api/keys``, ``DELETE /api/keys/{id}``;
- ``GET|POST /api/admin/users``, ``GET|PATCH /api/admin/users/{id}``,
  ``GET /api/admin/keys`` (admins only: anyone else gets 404, as for an unknown route).

Invariants: a password or key never appears in a response (a new key once, in the answer
that made it) nor in an error; a key the caller may not see is a 404 exactly like a key
that does not exist; every repository call leaves the event loop (``asyncio.to_thread``,
or ``auth.hashing`` for the ones that hash a password).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from parley.domain.users import MAX_KEY_DAYS, ApiKey, Principal, User, check_key_expiry
from parley.errors import AuthenticationFailed, InvalidRequest, NotFound
from parley.server import auth, identity
from parley.server.api_body import read_fields
from parley.server.identity import Identity
from parley.server.params import page_size
from parley.server.state import SERVICES
from parley.store.users import KEEP, Users

_MAX_PAGE = 200


def add_routes(app: web.Application) -> None:
    """Register this module's routes on ``app``."""
    app.router.add_post(auth.LOGIN_PATH, login)
    app.router.add_post("/api/auth/logout", logout)
    app.router.add_get("/api/auth/session", session)
    app.router.add_get("/api/me", me)
    app.router.add_patch("/api/me", update_me)
    app.router.add_get("/api/keys", list_keys)
    app.router.add_post("/api/keys", create_key)
    app.router.add_delete("/api/keys/{id}", revoke_key)
    app.router.add_get("/api/admin/users", admin_list_users)
    app.router.add_post("/api/admin/users", admin_create_user)
    app.router.add_get("/api/admin/users/{id}", admin_get_user)
    app.router.add_patch("/api/admin/users/{id}", admin_update_user)
    app.router.add_get("/api/admin/keys", admin_list_keys)


# -- sessions ------------------------------------------------------------------------------


async def login(request: web.Request) -> web.Response:
    """Log in with a login (email or username) and password; sets the session cookie."""
    # JSON only: a cross-site form cannot send it without a CORS preflight (login CSRF).
    if request.content_type != "application/json":
        raise InvalidRequest("send the credentials as JSON (Content-Type: application/json)")
    data = await read_fields(request, {"login", "password"})
    name, password = data.get("login"), data.get("password")
    if not isinstance(name, str) or not name or not isinstance(password, str):
        raise InvalidRequest("'login' (email or username) and 'password' are required strings")
    users = _users(request)
    throttle = request.app[auth.LOGIN_THROTTLE]
    await throttle.attempt(name)
    user = await auth.hashing(request, lambda: users.check_login(name, password))
    if user is None:
        # One message whatever went wrong: ids cannot be probed.
        raise AuthenticationFailed("wrong login or password")
    await throttle.succeeded(name)
    hours = request.app[SERVICES].settings.session_hours
    # The browser's cookie is about to be replaced: the session it named ends here, or it
    # would stay valid, unseen, until it expired.
    replaced = await auth.session_of(request)
    if replaced is not None and replaced.session_id is not None:
        await asyncio.to_thread(users.delete_session, replaced.session_id)
    new = await asyncio.to_thread(users.create_session, user.id, hours)
    response = _json(
        {"user": user_json(user), "csrf_token": new.csrf_token, "expires_at": new.expires_at}
    )
    auth.set_session_cookie(request, response, new.token, new.expires_at)
    return response


async def logout(request: web.Request) -> web.Response:
    """End the cookie's session (if any) and clear the cookie."""
    found = await auth.session_of(request)
    if found is not None and found.session_id is not None:
        await asyncio.to_thread(_users(request).delete_session, found.session_id)
    response = web.Response(status=204)
    auth.clear_session_cookie(request, response)
    return response


async def session(request: web.Request) -> web.Response:
    """Who is calling and, for a cookie session, the CSRF token writes must carry (the
    cookie itself is HttpOnly, so a page learns the token here). A request authenticated
    with a key is described as that key's caller, whatever cookie it also carries."""
    caller = identity.current(request)
    found = await _own_session(request, caller)
    if found is not None:
        user = await _user_or_401(request, found.user_id)
        return _json(
            {
                "user": user_json(user),
                "csrf_token": found.csrf_token,
                "expires_at": found.expires_at,
                "via": "session",
            }
        )
    user_body = None
    if caller.user_id is not None:
        user_body = user_json(await _user_or_401(request, caller.user_id))
    return _json({"user": user_body, "csrf_token": None, "expires_at": None, "via": caller.via})


async def _own_session(request: web.Request, caller: Identity) -> Principal | None:
    """The cookie's session, unless the request was authenticated with a key (in local
    mode, where no credentials are needed, a logged-in browser still has its session)."""
    if caller.via not in ("session", "local"):
        return None
    return await auth.session_of(request)


# -- the caller ----------------------------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    """The caller: their user, or the admin identity of the master key / local mode."""
    caller = identity.current(request)
    user = None
    if caller.user_id is not None:
        user = user_json(await _user_or_401(request, caller.user_id))
    return _json({"user": user, "role": caller.role, "via": caller.via})


async def update_me(request: web.Request) -> web.Response:
    """Change the caller's full name, preferences (replaced whole) or password (with the
    current one; other sessions end, the caller's own stays)."""
    caller = identity.current(request)
    user_id = caller.user_id
    if user_id is None:
        raise InvalidRequest(f"this caller ({caller.via}) has no user profile to change")
    data = await read_fields(request, {"full_name", "preferences", "password", "current_password"})
    users = _users(request)
    changes: dict[str, Any] = {}
    if "full_name" in data:
        changes["full_name"] = data["full_name"]
    if "preferences" in data:
        changes["preferences"] = data["preferences"]
    if "password" in data:
        current = data.get("current_password")
        if not isinstance(current, str):
            raise InvalidRequest(
                "changing the password needs 'current_password'", "current_password"
            )
        if not await auth.hashing(request, lambda: users.check_password(user_id, current)):
            raise InvalidRequest("'current_password' is not correct", "current_password")
        changes["password"] = data["password"]
        # The caller's own session stays, never a cookie it merely carries.
        found = await _own_session(request, caller)
        changes["end_sessions"] = True
        changes["keep_session"] = found.session_id if found is not None else None
    elif "current_password" in data:
        raise InvalidRequest("'current_password' goes with 'password'", "current_password")
    user = await auth.hashing(request, lambda: users.update_user(user_id, **changes))
    if user is None:
        raise AuthenticationFailed("the user no longer exists")
    return _json({"user": user_json(user), "role": user.role, "via": caller.via})


# -- API keys ------------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    """The caller's own keys, newest first (admins see everybody's at /api/admin/keys)."""
    caller = identity.current(request)
    limit, after = _page(request)
    if caller.user_id is None:
        return _json({"data": [], "has_more": False})
    found, more = await asyncio.to_thread(
        _users(request).list_keys, caller.user_id, limit=limit, after=after
    )
    return _json({"data": [key_json(k) for k in found], "has_more": more})


async def create_key(request: web.Request) -> web.Response:
    """A new key for the caller (an admin may name another ``user``); the key is in this
    answer and nowhere else, ever."""
    caller = identity.current(request)
    data = await read_fields(request, {"name", "expires_at", "expires_in_days", "user"})
    users = _users(request)
    owner_id = caller.user_id
    if "user" in data:
        if not caller.is_admin:
            raise NotFound("no such user")
        owner = await _find_user(users, data["user"])
        owner_id = owner.id
    if owner_id is None:
        raise InvalidRequest(
            f"this caller ({caller.via}) has no user: name the key's owner in 'user'", "user"
        )
    expires_at = _expiry(data)
    key, plain = await asyncio.to_thread(users.create_key, owner_id, data.get("name"), expires_at)
    return _json({**key_json(key), "key": plain}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke one of the caller's keys (admins: anyone's); effective on the next request."""
    caller = identity.current(request)
    users = _users(request)
    key = await asyncio.to_thread(users.get_key, _public_id(request, "no such API key"))
    if key is None or not caller.may_see(key.user_id):
        raise NotFound("no such API key")
    revoked = await asyncio.to_thread(users.revoke_key, key.id)
    assert revoked is not None
    return _json(key_json(revoked))


# -- administration ------------------------------------------------------------------------


async def admin_list_users(request: web.Request) -> web.Response:
    """Admins: list users, paginated (``limit``, ``after``)."""
    identity.admin(request)
    limit, after = _page(request)
    found, more = await asyncio.to_thread(_users(request).list_users, limit=limit, after=after)
    return _json({"data": [user_json(u) for u in found], "has_more": more})


async def admin_create_user(request: web.Request) -> web.Response:
    """Admins: create a user (email, username, password, full name, role)."""
    identity.admin(request)
    data = await read_fields(request, {"email", "username", "password", "full_name", "role"})
    users = _users(request)
    user = await auth.hashing(
        request,
        lambda: users.create_user(
            email=data.get("email"),
            username=data.get("username"),
            password=data.get("password"),
            full_name=data.get("full_name"),
            role=data.get("role", "user"),
        ),
    )
    return _json(user_json(user), status=201)


async def admin_get_user(request: web.Request) -> web.Response:
    """Admins: one user by id."""
    identity.admin(request)
    return _json(user_json(await _user_by_path(request)))


async def admin_update_user(request: web.Request) -> web.Response:
    """Change a user's role, active flag, password or full name. Disabling a user or
    setting their password ends their web sessions; a disabled user's keys stop working
    (and work again if the user is enabled)."""
    identity.admin(request)
    target = await _user_by_path(request)
    data = await read_fields(request, {"role", "is_active", "password", "full_name"})
    changes: dict[str, Any] = {key: data.get(key, KEEP) for key in data}
    changes["end_sessions"] = data.get("is_active") is False or "password" in data
    users = _users(request)
    user = await auth.hashing(request, lambda: users.update_user(target.id, **changes))
    if user is None:
        raise NotFound("no such user")
    return _json(user_json(user))


async def admin_list_keys(request: web.Request) -> web.Response:
    """Everybody's keys, newest first; ``?user=`` (id, username or email) narrows to one."""
    identity.admin(request)
    limit, after = _page(request)
    users = _users(request)
    owner_id = None
    ref = request.query.get("user")
    if ref:
        owner_id = (await _find_user(users, ref)).id
    found, more = await asyncio.to_thread(users.list_keys, owner_id, limit=limit, after=after)
    return _json({"data": [key_json(k, with_owner=True) for k in found], "has_more": more})


# -- shapes --------------------------------------------------------------------------------


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": str(user.public_id),
        "email": user.email,
        "username": user.username,
        "full_name": user.full_name,
        "role": user.role,
        "is_active": user.is_active,
        "preferences": user.preferences,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
        "last_active_at": user.last_active_at,
    }


def key_json(key: ApiKey, *, with_owner: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(key.public_id),
        "name": key.name,
        "prefix": key.prefix,
        "status": key.status(datetime.now(UTC)),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "last_used_at": key.last_used_at,
    }
    if with_owner:
        body["user"] = {"id": str(key.user_public_id), "username": key.username}
    return body


# -- helpers -------------------------------------------------------------------------------


def _users(request: web.Request) -> Users:
    return request.app[auth.USERS]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def _user_or_401(request: web.Request, user_id: int) -> User:
    user = await asyncio.to_thread(_users(request).get_user, user_id)
    if user is None:
        raise AuthenticationFailed("the user no longer exists")
    return user


async def _user_by_path(request: web.Request) -> User:
    public_id = _public_id(request, "no such user")
    user = await asyncio.to_thread(_users(request).get_by_public_id, public_id)
    if user is None:
        raise NotFound("no such user")
    return user


async def _find_user(users: Users, ref: object) -> User:
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRequest("'user' must be a user id, username or email", "user")
    user = await asyncio.to_thread(users.find_user, ref)
    if user is None:
        raise NotFound("no such user")
    return user


def _public_id(request: web.Request, missing: str) -> uuid.UUID:
    # A malformed id names nothing: the same 404 as an unknown one.
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound(missing) from None


def _page(request: web.Request) -> tuple[int, uuid.UUID | None]:
    limit = page_size(request.query.get("limit"), _MAX_PAGE)
    raw_after = request.query.get("after")
    if not raw_after:
        return limit, None
    try:
        return limit, uuid.UUID(raw_after)
    except ValueError:
        raise InvalidRequest("'after' must be an id from a previous page", "after") from None


_MIN_KEY_SECONDS = 60


def _expiry(data: dict[str, Any]) -> datetime | None:
    """The key's expiry from ``expires_at`` (ISO 8601) or ``expires_in_days``; None: never.
    Either way at most ``MAX_KEY_DAYS`` ahead (``domain.users.check_key_expiry``)."""
    at, days = data.get("expires_at"), data.get("expires_in_days")
    if at is not None and days is not None:
        raise InvalidRequest("give 'expires_at' or 'expires_in_days', not both")
    now = datetime.now(UTC)
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int | float) or days <= 0:
            raise InvalidRequest("'expires_in_days' must be a positive number", "expires_in_days")
        if days > MAX_KEY_DAYS:
            raise InvalidRequest(
                f"'expires_in_days' must be at most {MAX_KEY_DAYS}", "expires_in_days"
            )
        if days * 86400 < _MIN_KEY_SECONDS:
            # Else the key would expire before the store checks it, refused under the
            # name of a field the caller did not send.
            raise InvalidRequest(
                "'expires_in_days' must be at least one minute (0.0007 days)", "expires_in_days"
            )
        return now + timedelta(days=days)
    if at is None:
        return None
    if not isinstance(at, str):
        raise InvalidRequest("'expires_at' must be an ISO 8601 date-time", "expires_at")
    try:
        moment = datetime.fromisoformat(at)
    except ValueError:
        raise InvalidRequest("'expires_at' must be an ISO 8601 date-time", "expires_at") from None
    # Checked here too, not only by the store: a refusal before any database work.
    return check_key_expiry(moment, now)
