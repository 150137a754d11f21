"""Redaction of request bodies before they are stored as HTTP metrics.

Invariants:
- in a JSON or form body, the value of every field named like a secret (key, secret,
  token, password, authorization, credential, cookie, signature...) is replaced, at any
  depth;
- anywhere in the text, values shaped like credentials (``Bearer ...``, ``sk-...`` keys)
  and every secret the caller names (the master key, provider keys) are replaced;
- the result is cut to ``limit`` characters, marked as truncated; redaction happens before
  truncation, so a secret cut in half is never left behind.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

REDACTED = "[redacted]"
SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token(?!s)|api[-_]?key|^key$|[-_]key$|authori[sz]ation"
    r"|^auth$|[-_]auth$|credential|cookie|session[-_]?id|signature|private)",
    re.IGNORECASE,
)
_SHAPES = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|\b(sk|pk|rk|pl|hf|gsk|xai)[-_][A-Za-z0-9_-]{8,}"
)


def redact_body(
    body: bytes, content_type: str, secrets: Iterable[str] = (), limit: int = 4096
) -> str | None:
    if not body:
        return None
    text = body.decode("utf-8", "replace")
    if "json" in content_type:
        # A body that is not JSON is still redacted as text below.
        with contextlib.suppress(orjson.JSONDecodeError):
            text = orjson.dumps(_redact_value(orjson.loads(body))).decode()
    elif "x-www-form-urlencoded" in content_type:
        pairs = parse_qsl(text, keep_blank_values=True)
        text = urlencode([(k, REDACTED if SECRET_NAME.search(k) else v) for k, v in pairs])
    elif "multipart/" in content_type:
        return f"[multipart body, {len(body)} bytes]"
    text = redact_text(text, secrets)
    if len(text) > limit:
        text = text[:limit] + f"...[truncated, {len(body)} bytes]"
    return text


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return _SHAPES.sub(_shape, text)


def _shape(match: re.Match[str]) -> str:
    return (match.group(1) or "") + REDACTED


def _redact_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and SECRET_NAME.search(k) and v not in (None, "")
            else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value
