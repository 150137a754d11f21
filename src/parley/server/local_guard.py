"""Local mode's one check: the caller is a program on this machine, not a web page.

Without a master key parley trusts every request (it listens on loopback only). A web
page open in a browser on the same machine can still reach loopback: with a "simple"
cross-site request (a form or ``text/plain`` POST needs no CORS preflight) it could spend
the configured provider keys, and through DNS rebinding (a hostile name resolving to
127.0.0.1) it could even read the answers. So, in local mode only:

- a request carrying an ``Origin`` that is not a loopback origin is refused (403): SDKs,
  curl and servers send no ``Origin``; browsers always do on cross-site POSTs;
- a request whose ``Host`` is not a loopback name or address is refused (403): a rebound
  hostile name arrives with its own name in ``Host``;
- a request relayed for someone elsewhere is refused (403): a peer that is not a loopback
  address (parley was started on another address by other means than ``parley serve``),
  or ``X-Forwarded-For``, ``X-Real-IP`` or ``Forwarded: for=`` naming any address that is
  not loopback (a reverse proxy on this machine put in front of local mode, which would
  otherwise hand every remote client the local admin; its ``Host`` may well be
  ``127.0.0.1``). Loopback addresses include IPv4-mapped ones (``::ffff:127.0.0.1``).

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
_FORWARDING_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in _COMMON_LOOPBACK:
        return True
    host = host.lower().rstrip(".")
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    return _is_loopback_address(host.strip("[]"))


def _is_loopback_address(value: str) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False  # a name such as 127.0.0.1.evil.example
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _forwarded_for(request: web.Request) -> list[str]:
    """The client addresses proxies named, as written (``for=`` of ``Forwarded``, quotes
    and ports left for ``_host_name`` and ``_is_loopback``)."""
    found = [
        address
        for header in request.headers.getall("X-Forwarded-For", ())
        for address in header.split(",")
    ]
    found += request.headers.getall("X-Real-IP", ())
    for header in request.headers.getall("Forwarded", ()):
        for element in header.split(","):
            for pair in element.split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "for":
                    found.append(value.strip().strip('"'))
    return [address.strip() for address in found if address.strip()]


def _relayed_from_elsewhere(request: web.Request) -> bool:
    peer = request.remote
    if peer and peer not in _COMMON_LOOPBACK and not _is_loopback_address(peer):
        return True
    if not any(name in request.headers for name in _FORWARDING_HEADERS):
        return False
    # An unparsable or obfuscated address ("unknown", "_hidden") is not known to be local.
    return not all(_is_loopback(_host_name(a)) for a in _forwarded_for(request))


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
    if _relayed_from_elsewhere(request):
        raise PermissionDenied(
            "requests relayed for another machine are refused: parley runs without a "
            "master key (local mode); set PARLEY_MASTER_KEY to serve through a proxy"
        )
    return await handler(request)
