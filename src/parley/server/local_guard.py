"""Local mode's one check: the caller is a program on this machine, not a web page.

Without a master key parley trusts every request (it listens on loopback only). A web
page open in a browser on the same machine can still reach loopback: with a "simple"
cross-site request (a form or ``text/plain`` POST needs no CORS preflight) it could spend
the configured provider keys, and through DNS rebinding (a hostile name resolving to
127.0.0.1) it could even read the answers. So, in local mode only:

- a request carrying an ``Origin`` that is not a loopback origin is refused (403): SDKs,
  curl and servers send no ``Origin``; browsers always do on cross-site POSTs;
- a request whose ``Host`` is not a loopback name or address is refused (403): a rebound
  hostile name arrives with its own name in ``Host``.

With a master key, credentials do this job (a page cannot read them) and nothing here runs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from parley.errors import PermissionDenied

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_LOOPBACK_NAMES = frozenset({"localhost"})
# What nearly every local client sends, answered without parsing an address (which cost
# more than the rest of this middleware).
_COMMON_LOOPBACK = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in _COMMON_LOOPBACK:
        return True
    host = host.lower().rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name such as 127.0.0.1.evil.example


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@web.middleware
async def local_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or not _is_loopback(urlsplit(origin).hostname)):
        raise PermissionDenied(
            "requests from web pages of other sites are refused: parley runs without a "
            "master key (local mode)"
        )
    host = request.headers.get("Host")
    if host is not None and not _is_loopback(_host_name(host)):
        raise PermissionDenied(
            f"host {host!r} is not a loopback name: parley runs without a master key "
            "(local mode) and answers only on 127.0.0.1 / localhost"
        )
    return await handler(request)
