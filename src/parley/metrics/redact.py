"""Redaction of request bodies before they are stored as HTTP metrics.

Invariants:
- in a JSON or form body, the value of every field named like a secret (key, secret,
  token, password, authorization, credential, cookie, signature...) is replaced, at any
  depth. A body is read as JSON whatever its Content-Type says (parley's APIs take JSON
  sent as a form or as text: ``curl -d`` does that), and a body that is neither JSON nor
  a form (malformed JSON, text) has every ``name: value`` or ``name=value`` pair whose
  name looks like a secret replaced as it is spelled in the text;
- anywhere in the text, values shaped like credentials (``Bearer ...``, ``sk-...`` and
  Google ``AIza...`` keys) and every secret the caller names (a ``SecretSet``: the master
  key, provider keys, the vault's master secret) are replaced, spelled as they are, as a
  JSON string spells them or as a form body does;
- the result is cut to ``limit`` characters, marked as truncated; redaction happens before
  truncation, so a secret cut in half is never left behind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import orjson

REDACTED = "[redacted]"
# Shorter named secrets are ignored: replacing them would blot out ordinary words.
MIN_SECRET = 4
SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|secret|token(?!s)|api[-_]?key|^key$|[-_]key$|(?-i:[a-z0-9]Key$)"
    r"|authori[sz]ation|^auth$|[-_]auth$|^pwd$|[-_]pwd$|credential|cookie|session[-_]?id"
    r"|signature|private)",
    re.IGNORECASE,
)
# A name and its value in text that did not parse: "name": "value" (the closing quote may
# be missing), 'name': 'value', name=value, name: value.
_NAMED_VALUE = re.compile(
    r"""(?P<head>(?P<q>["']?)(?P<name>[A-Za-z0-9_.$-]+)(?P=q)\s*[:=]\s*)"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"?|'[^']*'?|[^\s&,;}\]]+)"""
)
_SHAPES = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|\b(sk|pk|rk|pl|hf|gsk|xai)[-_][A-Za-z0-9_-]{8,}"
    r"|\bAIza[A-Za-z0-9_-]{35}"
)


@dataclass(frozen=True, slots=True)
class SecretSet:
    """Secret values to remove from stored text, prepared once: build it with ``of`` when
    the secrets change, never per request. Picklable, to travel with the rows to the
    writer's process (once per batch: the rows share one).

    ``spellings`` holds each value as is, as a JSON string spells it (a quote or backslash
    escaped: JSON bodies are stored re-serialised) and as a form body does (``urlencode``:
    the ``=`` of base64 padding is ``%3D``), longest first, so that a secret that contains
    another is removed whole. ``sub`` runs one ``str.replace`` per spelling: each skips
    through the text by the spelling's length (Boyer-Moore-Horspool, in C), so 100 keys
    cost ~60 us on a 4 KiB body. One regular expression shaped as a trie, a single pass
    in theory, measured 5 to 8 times slower below ~1,000 keys and cost ~150 ms to compile
    at 2,000; the set is rebuilt on the event loop when the vault learns a key.
    """

    values: frozenset[str]
    spellings: tuple[str, ...]

    @classmethod
    def of(cls, values: Iterable[str]) -> SecretSet:
        kept = frozenset(v for v in values if len(v) >= MIN_SECRET)
        spellings = {spelling for value in kept for spelling in _spellings(value)}
        return cls(kept, tuple(sorted(spellings, key=len, reverse=True)))

    def sub(self, text: str) -> str:
        """``text`` with every occurrence of a secret replaced by ``REDACTED``."""
        for spelling in self.spellings:
            text = text.replace(spelling, REDACTED)
        return text


def redact_body(
    body: bytes, content_type: str, secrets: SecretSet | Iterable[str] = (), limit: int = 4096
) -> str | None:
    if not body:
        return None
    if "multipart/" in content_type:
        return f"[multipart body, {len(body)} bytes]"
    named = False
    try:
        text = orjson.dumps(_redact_value(orjson.loads(body))).decode()
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace")
        if "x-www-form-urlencoded" in content_type:
            pairs = parse_qsl(text, keep_blank_values=True)
            text = urlencode([(k, REDACTED if SECRET_NAME.search(k) else v) for k, v in pairs])
        else:
            named = True
    text = redact_text(text, secrets)
    if named:
        # After the shapes: "Authorization: Bearer sk-..." kept its "Bearer " to be found.
        text = _NAMED_VALUE.sub(_named_value, text)
    if len(text) > limit:
        text = text[:limit] + f"...[truncated, {len(body)} bytes]"
    return text


def redact_text(text: str, secrets: SecretSet | Iterable[str] = ()) -> str:
    return _SHAPES.sub(_shape, as_secret_set(secrets).sub(text))


def as_secret_set(secrets: SecretSet | Iterable[str]) -> SecretSet:
    """``secrets`` as a ``SecretSet`` (prepared here when given as plain strings)."""
    if isinstance(secrets, SecretSet):
        return secrets
    return SecretSet.of(secrets)


def _spellings(secret: str) -> set[str]:
    # As stored: JSON bodies are re-serialised (a quote or backslash escaped), form
    # bodies re-encoded (the "=" of base64 padding is "%3D").
    return {secret, orjson.dumps(secret).decode()[1:-1], quote_plus(secret, safe="")}


def _named_value(match: re.Match[str]) -> str:
    if not SECRET_NAME.search(match["name"]):
        return match[0]
    quote = match["value"][0] if match["value"][0] in "\"'" else ""
    return f"{match['head']}{quote}{REDACTED}{quote}"


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
