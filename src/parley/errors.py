"""Every error parley raises on purpose, and how each maps to the client's protocol.

The tree::

    ParleyError                      status, OpenAI ``type`` / ``code``, recorded ``error_type``
    ├── ConfigError                  bad settings or config file, or an unusable database
    │   ├── DataWouldBeLost          a downgrade would drop tables / columns holding data
    │   └── DatabaseInUse            a server or another parley command holds the database
    ├── ClientError                  the caller sent something we refuse (4xx, never retried)
    │   ├── InvalidRequest           400 malformed JSON, wrong types, missing fields
    │   ├── AuthenticationFailed     401 missing or wrong credentials
    │   ├── PermissionDenied         403 authenticated, but this channel may not
    │   │   └── CsrfTokenInvalid     403 a cookie write without the session's CSRF token
    │   ├── NotFound                 404 no such endpoint or object
    │   │   └── ModelNotFound        404 unknown model, alias or provider
    │   ├── BodyTooLarge             413 request body over the configured limit
    │   ├── UnsupportedMediaType     415 a body or file of a type the route does not take
    │   └── RateLimited              429 over a requests per minute limit
    │       ├── TokensRateLimited    429 over a tokens per minute limit (OpenAI's ``tokens``)
    │       └── BudgetExceeded       429 a daily or monthly spend budget is used up
    ├── UpstreamError                an upstream attempt failed; ``retryable`` says whether
    │   ├── UpstreamConnectError     could not connect (retryable)
    │   ├── UpstreamTimeout          connect / first byte / idle-between-chunks timeout
    │   ├── UpstreamHTTPError        upstream answered 4xx/5xx; 429 and 5xx are retryable
    │   ├── UpstreamProtocolError    upstream sent something that is not its protocol
    │   └── UpstreamInterrupted      the stream broke after it started (reset, EOF without end)
    ├── StoreError                   the record could not be committed
    │   ├── StoreUnavailable         503 the writer is down; refused before any upstream call
    │   ├── StoreBusy                503 SQLite's write lock stayed taken past the busy
    │   │                            timeout; nothing was written, try again later
    │   └── StoreFull                507 the database's disk is full; writes resume once
    │                                space is freed
    ├── SearchUnavailable            503 semantic search needs an embedder: none is
    │   │                            configured or installed, or it failed
    │   └── VectorStoreUnusable      503 the vector store cannot be read or written
    │                                (damaged or missing files, a file in the way...)
    ├── ServerShuttingDown           503 the server is stopping: refused, or cut off after
    │                                the shutdown grace
    ├── StopRequested                not an error: SIGINT / SIGTERM while the server was
    │                                starting; the startup unwinds and the exit is clean
    └── BackupError                  a backup, verify or restore failed (nothing was swapped)

``error_type`` is the stable string stored in the request log; the OpenAI error JSON
carries ``message``, ``type`` and ``code``. Messages never include secrets: upstream
bodies are reduced to their ``error.message`` and scrubbed by the caller's redactor.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

# The error taxonomy recorded in request_log.error_type. Later provider families map their
# own errors onto these names, so reports can group across providers.
ERROR_TYPES = (
    "bad_request",
    "authentication",
    "permission",
    "not_found",
    "rate_limit",
    "context_length",
    "content_filter",
    "overloaded",
    "server_error",
    "timeout",
    "connection",
    "protocol",
    "interrupted",
    "cancelled",
    "internal",
)


class ParleyError(Exception):
    """Base of every deliberate parley error."""

    status: int = 500
    openai_type: str = "server_error"
    code: str | None = None
    error_type: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "param": None,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After and the like)."""
        return {}


class ConfigError(ParleyError):
    """Settings or the config file are wrong; raised at start."""

    error_type = "internal"


class DataWouldBeLost(ConfigError):
    """A downgrade was refused: it drops tables or columns that hold data. ``losses``
    has one line per item ("attachments: 56 rows"), and so does the message, after its
    first line."""

    def __init__(self, message: str, losses: Sequence[str]) -> None:
        super().__init__("\n  ".join((message, *losses)))
        self.losses = tuple(losses)


class DatabaseInUse(ConfigError):
    """A server (or a restore, offline maintenance) holds the database: nothing was done."""


class ClientError(ParleyError):
    """The client's request is refused; ``param`` names the field at fault, if one is."""

    status = 400
    openai_type = "invalid_request_error"
    error_type = "bad_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def to_openai(self) -> dict[str, Any]:
        body = super().to_openai()
        body["error"]["param"] = self.param
        return body


class InvalidRequest(ClientError):
    pass


def refuse_unknown(given: Collection[str], allowed: Collection[str], where: str = "") -> None:
    """``InvalidRequest`` naming every field of ``given`` outside ``allowed``, and what is
    expected (``where``: the place in the body, also the error's ``param``): every API
    that takes a closed set of fields refuses a typo in these same words."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        place = f" in {where}" if where else ""
        raise InvalidRequest(
            f"unknown field(s){place}: {', '.join(repr(f) for f in unknown)}; "
            f"expected: {', '.join(sorted(allowed))}",
            where or None,
        )


class Unsupported(InvalidRequest):
    """A valid request this provider family cannot serve (a field it cannot honour, a
    content type it does not take, an API it lacks): another candidate may serve it."""


class AuthenticationFailed(ClientError):
    status = 401
    openai_type = "invalid_request_error"
    code = "invalid_api_key"
    error_type = "authentication"


class PermissionDenied(ClientError):
    status = 403
    code = "permission_denied"
    error_type = "permission"


class CsrfTokenInvalid(PermissionDenied):
    code = "csrf_token_invalid"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    error_type = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class BodyTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(ClientError):
    """``param`` names what had the wrong type: the ``Content-Type`` header, or the
    ``file`` whose bytes were sniffed."""

    status = 415
    code = "unsupported_media_type"


class UpstreamError(ParleyError):
    """One upstream attempt failed."""

    status = 502
    openai_type = "api_error"
    error_type = "server_error"
    retryable = False

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class UpstreamConnectError(UpstreamError):
    error_type = "connection"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout"

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream timed out ({phase}, {seconds:g}s)")
        self.phase = phase
        # Only a timeout before any byte arrived may be retried; an idle stream may not.
        self.retryable = phase in ("connect", "first_byte")


_STATUS_ERROR_TYPES = {
    400: "bad_request",
    408: "timeout",
    401: "authentication",
    403: "permission",
    404: "not_found",
    413: "context_length",
    429: "rate_limit",
    503: "overloaded",
    529: "overloaded",
}


def _status_error_type(status_code: int) -> str:
    if status_code in _STATUS_ERROR_TYPES:
        return _STATUS_ERROR_TYPES[status_code]
    if status_code >= 500:
        return "server_error"
    return "bad_request" if status_code >= 400 else "protocol"


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an error status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        retry_after: float | None = None,
        upstream_type: str | None = None,
        upstream_code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        """``error_type``, when the adapter knows it (one of ``ERROR_TYPES``), overrides
        the one derived from the status and the OpenAI-style ``upstream_code``."""
        if status_code < 400:
            # parley follows no redirect: a 3xx (or a stray 1xx / 2xx) is a misconfigured
            # or misbehaving upstream, never the client's bad request.
            message = f"{message} (not an answer: check the provider's base_url)"
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after
        # 408: the upstream (or a proxy before it) gave up waiting; it may not next time.
        self.retryable = status_code in (408, 429) or status_code >= 500
        self.error_type = _status_error_type(status_code)
        if upstream_code == "context_length_exceeded":
            self.error_type = "context_length"
        elif upstream_code == "content_filter":
            self.error_type = "content_filter"
        if error_type is not None:
            self.error_type = error_type
        # A client-side problem upstream (400, 404, 422) is the client's to see as such;
        # a refused key (401, 403) is parley's configuration, never the caller's key.
        client_side = 400 <= status_code < 500 and status_code not in (401, 403, 408)
        self.status = status_code if client_side else 504 if status_code == 408 else 502
        if status_code in (401, 403):
            self.message = f"the upstream rejected parley's credentials: {message}"
            self.args = (self.message,)
        self.openai_type = (upstream_type if client_side else None) or (
            "invalid_request_error" if client_side else "api_error"
        )
        self.code = upstream_code

    def headers(self) -> dict[str, str]:
        if self.status_code == 429 and self.retry_after is not None:
            return {"Retry-After": str(max(1, round(self.retry_after)))}
        return {}


class UpstreamProtocolError(UpstreamError):
    error_type = "protocol"


class UpstreamInterrupted(UpstreamError):
    error_type = "interrupted"


def interrupted(message: str, *, overloaded: bool = False) -> UpstreamInterrupted:
    """A stream the upstream broke off with an error of its own; ``overloaded`` when it
    said it was overloaded, recorded and answered as such (Anthropic's
    ``overloaded_error``), not as a plain interruption."""
    error = UpstreamInterrupted(message)
    if overloaded:
        error.error_type = "overloaded"
    return error


class StoreError(ParleyError):
    status = 500
    openai_type = "server_error"
    error_type = "internal"


class StoreUnavailable(StoreError):
    """The writer is not running: refuse before spending upstream tokens."""

    status = 503


class StoreBusy(StoreError):
    """SQLite's write lock stayed taken past the busy timeout: nothing was written."""

    status = 503


class StoreFull(StoreError):
    """The database refused a write for lack of space: nothing half-written, and the
    writer carries on once space is freed."""

    status = 507
    openai_type = "server_error"
    code = "insufficient_storage"


class SearchUnavailable(ParleyError):
    """Semantic search (or RAG) was asked for and no embedder is configured or installed,
    or the embedder failed (its provider errors or is down, its process died)."""

    status = 503
    openai_type = "service_unavailable"
    code = "search_unavailable"
    error_type = "internal"


class VectorStoreUnusable(SearchUnavailable):
    """LanceDB could not read or write the vector store: a file damaged or missing, a
    table gone, a file where its directory should be, a disk that refuses. The message
    names the store (for the operator: commands and the log); ``cause`` says what is wrong
    without the store's location, for an API's answer. ``damaged``: its files are (rather
    than a disk or permission refusing them), and ``parley reindex --full`` rebuilds it
    from the database. Keyword search is unaffected either way."""

    def __init__(self, store: str, cause: str, *, damaged: bool) -> None:
        remedy = "; 'parley reindex --full' rebuilds it from the database" if damaged else ""
        super().__init__(f"cannot use the vector store {store}: {cause}{remedy}")
        self.cause = cause
        self.damaged = damaged

    def public(self, what: str) -> str:
        """The message for a client of the API: ``what`` failed, and why, without the
        store's location."""
        remedy = "; an administrator can rebuild it with 'parley reindex --full'"
        return f"{what} ({self.cause}){remedy if self.damaged else ''}"


class BackupError(ParleyError):
    """A backup, its verification or a restore failed; the message says what and where."""

    error_type = "internal"


class RateLimited(ClientError):
    """The caller's API key or user is over a rate limit; ``Retry-After`` says when the
    window frees up."""

    status = 429
    openai_type = "requests"
    code = "rate_limit_exceeded"
    error_type = "rate_limit"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class TokensRateLimited(RateLimited):
    """Over a tokens-per-minute limit: OpenAI types it ``tokens``, not ``requests``."""

    openai_type = "tokens"


class BudgetExceeded(RateLimited):
    """A spend budget is used up until the next day or month (UTC)."""

    openai_type = "insufficient_quota"
    code = "insufficient_quota"


class StopRequested(ParleyError):
    """SIGINT or SIGTERM arrived while the server was starting (``server.shutdown``'s
    ``StopRequest``): the startup unwinds, stopping what it had started, and the process
    exits as after a normal stop. Never answered to a client."""


class ServerShuttingDown(ParleyError):
    """The server is stopping: a request is refused, or an answer was cut off."""

    status = 503
    openai_type = "server_error"
    code = "server_shutting_down"
    error_type = "interrupted"
