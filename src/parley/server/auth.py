"""Authentication: one check for every request, whatever the route, and the web session
cookie.

``install(app, settings)`` puts the identity repository (``USERS``) and the activity
recorder on the app, and, only when ``PARLEY_MASTER_KEY`` is set, the middleware. Without a
master key parley is in local mode: no middleware runs and every caller is
``identity.LOCAL``.

With a master key every path but ``/healthz`` and the login route needs credentials, all
checked by ``identify``:

1. ``Authorization: Bearer <x>`` or ``x-api-key: <x>``: the master key (constant-time
   comparison; ``identity.MASTER``) or a user's API key (one indexed lookup of its
   SHA-256 digest, no cache: a revoke takes effect on the next request, in every process);
2. else the ``parley_session`` cookie; a cookie-authenticated write (POST, PUT, PATCH,
   DELETE) must also carry the session's CSRF token in ``X-CSRF-Token`` (403 otherwise).

Presented credentials that do not check out are a 401; a request never falls back from a
bad key to a cookie. Error messages never repeat what was presented.

Every answer, in either mode, carries ``X-Content-Type-Options: nosniff`` and, unless its
handler chose its own caching, ``Cache-Control: no-store``: answers hold private history,
keys shown once and CSRF tokens, and no browser or proxy cache may keep them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from parley.domain.users import Principal
from parley.errors import AuthenticationFailed, CsrfTokenInvalid
from parley.security import tokens
from parley.server.activity import Activity
from parley.server.identity import IDENTITY_KEY, LOCAL_MODE, MASTER, Identity
from parley.server.login_throttle import LoginThrottle
from parley.server.state import SERVICES
from parley.settings import Secret, Settings
from parley.store.limits import LimitStore
from parley.store.users import Users

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

USERS = web.AppKey("parley.users", Users)
LOGIN_THROTTLE = web.AppKey("parley.login_throttle", LoginThrottle)
ACTIVITY = web.AppKey("parley.activity", Activity)
# Where argon2 runs (see ``hashing``).
PASSWORD_POOL = web.AppKey("parley.password_pool", ThreadPoolExecutor)
# The web session a request came with (cookie channel only).
SESSION = web.RequestKey("parley.session", Principal)

COOKIE = "parley_session"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_PATH = "/api/auth/login"
OPEN_PATHS = frozenset({"/healthz", "/api/openapi.json", LOGIN_PATH})
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def install(app: web.Application, settings: Settings) -> None:
    """Register the repository's lifespan and, with a master key, the auth middleware
    (after the ones already there: the error middleware stays first)."""
    app.cleanup_ctx.append(_lifespan(settings))
    app.on_response_prepare.append(_private_headers)
    if settings.master_key is not None:
        app.middlewares.append(middleware(settings.master_key))


def _lifespan(
    settings: Settings,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        # Runs after the app's own lifespan: the schema is at head and SERVICES is set.
        users = Users(app[SERVICES].engine)
        activity = Activity(users)
        activity.start()
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parley-passwords")
        app[USERS] = users
        app[LOGIN_THROTTLE] = LoginThrottle(LimitStore(app[SERVICES].engine))
        app[ACTIVITY] = activity
        app[PASSWORD_POOL] = pool
        try:
            yield
        finally:
            await asyncio.to_thread(pool.shutdown)
            await asyncio.to_thread(activity.stop)

    return lifespan


async def _private_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Before any answer's headers go out (streams and errors included): never sniffed,
    never stored by a cache unless the handler said otherwise."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")


def middleware(master_key: Secret) -> Middleware:
    master = master_key.get()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            request[IDENTITY_KEY] = await identify(request, master)
        return await handler(request)

    return authenticate


async def identify(request: web.Request, master: str) -> Identity:
    """The caller, by the first channel presented; 401 or 403 when it does not check out."""
    presented = presented_key(request)
    if presented is not None:
        if tokens.same(presented, master):
            return MASTER
        if tokens.is_api_key(presented):
            users = request.app[USERS]
            principal = await asyncio.to_thread(users.resolve_key, tokens.digest(presented))
            if principal is not None:
                request.app[ACTIVITY].seen(principal)
                return Identity(principal.user_id, principal.api_key_id, principal.role, "api_key")
        raise AuthenticationFailed("invalid API key")
    session = await session_of(request)
    if session is None:
        if request.cookies.get(COOKIE):
            raise AuthenticationFailed("the session has expired or is not valid: log in again")
        raise AuthenticationFailed(
            "missing credentials: send 'Authorization: Bearer <key>' or 'x-api-key: <key>', "
            "or log in"
        )
    if request.method in _WRITES:
        token = request.headers.get(CSRF_HEADER, "")
        assert session.csrf_token is not None
        if not tokens.same(token, session.csrf_token):
            raise CsrfTokenInvalid(
                f"a write with a session cookie needs the session's CSRF token in {CSRF_HEADER}"
            )
    request.app[ACTIVITY].seen(session)
    return Identity(session.user_id, None, session.role, "session")


def presented_key(request: web.Request) -> str | None:
    """The key in ``Authorization: Bearer`` (first) or ``x-api-key``, if any."""
    header = request.headers.get("Authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = request.headers.get("x-api-key", "").strip()
    return value or None


async def session_of(request: web.Request) -> Principal | None:
    """The valid web session named by the request's cookie, looked up once per request."""
    found = request.get(SESSION)
    if isinstance(found, Principal):
        return found
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    session = await asyncio.to_thread(request.app[USERS].resolve_session, tokens.digest(cookie))
    if session is not None:
        request[SESSION] = session
    return session


async def hashing(request: web.Request, call: Callable[[], T]) -> T:
    """Run ``call`` (a repository call that hashes or verifies a password: ~0.1 s of CPU)
    on a small pool of its own, so that a burst of logins cannot starve the default
    executor every API-key lookup runs on."""
    return await asyncio.get_running_loop().run_in_executor(request.app[PASSWORD_POOL], call)


def came_over_https(request: web.Request) -> bool:
    """Whether the browser spoke https: to parley itself, or to the TLS-terminating proxy
    in front of it (``X-Forwarded-Proto: https`` or ``Forwarded: proto=https``).

    The proxy's word is taken without knowing the proxy: it can only make the cookie
    stricter (a client that claims https over plain http loses its own cookie), while
    ignoring it would leave every cookie of a proxied https deployment without Secure,
    so that the browser would also send it over plain http."""
    if request.secure:
        return True
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "")
    if forwarded_proto.split(",")[0].strip().lower() == "https":
        return True
    forwarded = request.headers.get("Forwarded", "").split(",")[0]
    for pair in forwarded.split(";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "proto" and value.strip().strip('"').lower() == "https":
            return True
    return False


def set_session_cookie(
    request: web.Request, response: web.StreamResponse, token: str, expires_at: datetime
) -> None:
    """The session cookie: HttpOnly, SameSite=Lax, Path=/, Secure when the browser came
    over https (``came_over_https``); it lasts as long as the session."""
    max_age = max(0, int((expires_at - datetime.now(expires_at.tzinfo)).total_seconds()))
    response.set_cookie(
        COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=came_over_https(request),
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(
        COOKIE, path="/", httponly=True, samesite="Lax", secure=came_over_https(request)
    )


def is_local(request: web.Request) -> bool:
    return request.app.get(LOCAL_MODE, False)
