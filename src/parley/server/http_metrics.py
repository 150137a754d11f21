"""HTTP performance metrics: one ``http_metrics`` row per request parley serves (sampled).

The middleware runs outermost, so it sees every answer, errors included, and the caller
the auth middleware found. It measures, then hands the writer a closure: the row is built
on the writer thread, where the body is redacted (``metrics.redact``: fields named like
secrets, credential-shaped values and the known secrets themselves) and truncated.
So the request path pays for a timer and a queue put, never for redaction or SQL.

The known secrets are the configured ones (master key, ``PARLEY_SECRET_KEY``, config-file
provider keys) and the vault's (``security.vault``: its master secret, from the key file
too, and every provider key it encrypted or decrypted: configurations in the database,
users' own keys). ``KnownSecrets`` makes them one ``SecretSet`` again only when the vault
learned a new one, so a request pays an identity check, never a database read.

Invariants: the endpoint is the route template (``/api/conversations/{id}``), never the
raw path, and the query string is never stored; headers are not stored except the user
agent; Prometheus counts every request whatever the sampling.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.typedefs import Middleware

from parley.metrics.http_row import HttpRow
from parley.metrics.redact import SecretSet
from parley.server.identity import IDENTITY_KEY
from parley.server.state import BODY_KEY, SERVICES
from parley.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by the error middleware: the message the client got (already free of secrets).
ERROR_KEY = web.RequestKey("parley.error_message", str)
# What a request its client abandoned is recorded with (nginx's "client closed request").
CLIENT_CLOSED = 499
CLIENT_CLOSED_MESSAGE = "the client closed the connection"
TAGS_HEADER = "X-Parley-Tags"


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Every secret parley knows of, removed from stored bodies wherever it appears."""
    found = [settings.master_key, settings.secret_key]
    found += [p.api_key for p in settings.providers]
    return tuple(s.get() for s in found if s is not None)


class KnownSecrets:
    """The configured secrets and the vault's, as one ``SecretSet`` (see the module)."""

    __slots__ = ("_configured", "_seen", "_set")

    def __init__(self, configured: tuple[str, ...]) -> None:
        self._configured = configured
        self._seen: frozenset[str] = frozenset()
        self._set = SecretSet.of(configured)

    def current(self, vault_secrets: frozenset[str]) -> SecretSet:
        if vault_secrets is not self._seen:
            # On the event loop, once per key the vault learns: a sort of the spellings.
            self._set = SecretSet.of((*self._configured, *vault_secrets))
            self._seen = vault_secrets
        return self._set


def middleware(settings: Settings) -> Middleware:
    known = KnownSecrets(secrets_of(settings))
    no_vault: frozenset[str] = frozenset()
    sample = settings.http_metrics_sample
    limit = settings.http_metrics_body_bytes

    @web.middleware
    async def http_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler of a client that hung up: not a server error.
            status = CLIENT_CLOSED
            request[ERROR_KEY] = CLIENT_CLOSED_MESSAGE
            raise
        finally:
            elapsed = time.perf_counter() - started
            services = request.app.get(SERVICES)
            if services is not None:
                endpoint = _template(request)
                if services.prometheus is not None:
                    services.prometheus.observe_http(endpoint, request.method, status, elapsed)
                if sample > 0 and (sample >= 1 or random.random() < sample):
                    directory = services.directory
                    secrets = known.current(
                        no_vault if directory is None else directory.vault.known_secrets
                    )
                    services.writer.submit_metric(
                        _row_maker(request, endpoint, status, elapsed, secrets, limit)
                    )

    return http_metrics


def _template(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return "(unmatched)"
    return resource.canonical[:255]


def _row_maker(
    request: web.Request,
    endpoint: str,
    status: int,
    elapsed: float,
    secrets: SecretSet,
    limit: int,
) -> HttpRow:
    # Everything read from the request now: it is gone once the handler returns.
    caller = request.get(IDENTITY_KEY)
    return HttpRow(
        datetime.now(UTC),
        endpoint,
        request.method,
        status,
        elapsed,
        request.headers.get("User-Agent"),
        request.remote,
        request.headers.get(TAGS_HEADER),
        request.get(ERROR_KEY),
        request.get(BODY_KEY),
        request.content_type,
        getattr(caller, "user_id", None),
        getattr(caller, "api_key_id", None),
        secrets,
        limit,
    )
