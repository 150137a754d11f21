"""One served request's ``http_metrics`` row, as the middleware captured it.

Made on the request's path with nothing but the values read from the request; turned
into the row (``__call__``: secrets redacted, long bodies truncated) by the store writer,
off that path, in this process or in the writer's own (``store.writer_child``). A
tuple, so that it pickles in C and holds one object, not fifteen, while it waits for the
writer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import orjson

from parley.metrics.redact import SecretSet, as_secret_set, redact_body, redact_text


class HttpRow(NamedTuple):
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
    user_id: int | None
    api_key_id: int | None
    # One ``SecretSet`` shared by every row until the secrets change, so it is pickled
    # once per batch sent to the writer's process (a tuple of strings: tests, old callers).
    secrets: SecretSet | tuple[str, ...]
    limit: int

    def __call__(self) -> dict[str, Any]:
        secrets = as_secret_set(self.secrets)
        user_agent, error, body = _text(self.user_agent), _text(self.error), self.body
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
            "user_id": self.user_id,
            "api_key_id": self.api_key_id,
        }


def _tags(header: str | None, secrets: SecretSet) -> str | None:
    header = _text(header)
    if not header:
        return None
    tags = [redact_text(t.strip(), secrets)[:64] for t in header.split(",") if t.strip()]
    return orjson.dumps(tags[:20]).decode() if tags else None


def _text(value: str | None) -> str | None:
    """``value`` storable as text: a header that was not UTF-8 reaches parley with lone
    surrogates in it (aiohttp decodes with surrogateescape), which neither database nor
    JSON takes; each becomes U+FFFD, so one odd client never fails its batch's rows."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
