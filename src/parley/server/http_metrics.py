"""HTTP performance metrics: one ``http_metrics`` row per request parley serves (sampled).

The middleware runs outermost, so it sees every answer, errors included, and the caller
the auth middleware found. It measures, then hands the writer a closure: the row is built
on the writer thread, where the body is redacted (``metrics.redact``: fields named like
secrets, credential-shaped values and the configured secrets themselves) and truncated.
So the request path pays for a timer and a queue put, never for redaction or SQL.

Invariants: the endpoint is the route template (``/api/conversations/{id}``), never the
raw path, and the query string is never stored; headers are not stored except the user
agent; Prometheus counts every request whatever the sampling.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from parley.metrics.redact import redact_body, redact_text
from parley.server.identity import IDENTITY_KEY
from parley.server.state import BODY_KEY, SERVICES
from parley.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by the error middleware: the message the client got (already free of secrets).
ERROR_KEY = web.RequestKey("parley.error_message", str)
TAGS_HEADER = "X-Parley-Tags"


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Every secret parley knows of, removed from stored bodies wherever it appears."""
    found = [settings.master_key, settings.secret_key]
    found += [p.api_key for p in settings.providers]
    return tuple(s.get() for s in found if s is not None)


def middleware(settings: Settings) -> Middleware:
    secrets = secrets_of(settings)
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
        finally:
            elapsed = time.perf_counter() - started
            services = request.app.get(SERVICES)
            if services is not None:
                endpoint = _template(request)
                if services.prometheus is not None:
                    services.prometheus.observe_http(endpoint, request.method, status, elapsed)
                if sample > 0 and (sample >= 1 or random.random() < sample):
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
    secrets: tuple[str, ...],
    limit: int,
) -> Callable[[], dict[str, Any]]:
    # Everything read from the request now: it is gone once the handler returns.
    return _Row(
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
        request.get(IDENTITY_KEY),
        secrets,
        limit,
    )


@dataclass(slots=True)
class _Row:
    """One request's row, made on the writer thread. One object rather than a closure:
    a closure over these fourteen values was fifteen more objects per request for the
    collector to walk while they wait in the writer's queue."""

    at: datetime
    endpoint: str
    method: str
    status: int
    elapsed: float
    user_agent: str | None
    client_ip: str | None
    tags: str | None
    error: str | None
    body: bytes | None
    content_type: str
    caller: object
    secrets: tuple[str, ...]
    limit: int

    def __call__(self) -> dict[str, Any]:
        secrets = self.secrets
        user_agent, error, body = self.user_agent, self.error, self.body
        return {
            "created_at": self.at,
            "endpoint": self.endpoint,
            "method": self.method[:16],
            "status_code": self.status,
            "response_time_ms": self.elapsed * 1000,
            "user_agent": redact_text(user_agent, secrets)[:512] if user_agent else None,
            "client_ip": (self.client_ip or "")[:64] or None,
            "tags": _tags(self.tags, secrets),
            "error_message": redact_text(error, secrets) if error else None,
            "request_body": redact_body(body, self.content_type, secrets, self.limit)
            if body
            else None,
            "user_id": getattr(self.caller, "user_id", None),
            "api_key_id": getattr(self.caller, "api_key_id", None),
        }


def _tags(header: str | None, secrets: tuple[str, ...]) -> str | None:
    if not header:
        return None
    tags = [redact_text(t.strip(), secrets)[:64] for t in header.split(",") if t.strip()]
    return orjson.dumps(tags[:20]).decode() if tags else None
