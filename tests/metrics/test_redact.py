"""Redaction of stored request bodies: secrets by name, by shape and by value."""

from __future__ import annotations

import orjson

from parley.metrics.redact import REDACTED, redact_body

CANARY = "canary-8f3b2e91d7c4a5"


def test_fields_named_like_secrets_are_redacted_at_any_depth() -> None:
    body = orjson.dumps(
        {
            "model": "up/m",
            "max_tokens": 10,
            "password": CANARY,
            "nested": [{"api_key": CANARY, "client_secret": CANARY, "keep": "visible"}],
            "Authorization": CANARY,
            "refresh_token": CANARY,
        }
    )
    out = redact_body(body, "application/json")
    assert out is not None and CANARY not in out
    parsed = orjson.loads(out)
    assert parsed["max_tokens"] == 10 and parsed["model"] == "up/m"
    assert parsed["nested"][0]["keep"] == "visible"
    assert parsed["password"] == REDACTED


def test_credentials_are_redacted_by_shape_and_named_secrets_by_value() -> None:
    text = f'{{"content": "use sk-proj-{CANARY} or Bearer {CANARY}; also {CANARY}!"}}'
    out = redact_body(text.encode(), "application/json", secrets=[CANARY])
    assert out is not None and CANARY not in out
    assert redact_body(f"token={CANARY}&a=b".encode(), "application/x-www-form-urlencoded") == (
        "token=%5Bredacted%5D&a=b"
    )
    broken = f'{{"password": "{CANARY}"'.encode()  # not JSON: the known secret still goes
    assert CANARY not in (redact_body(broken, "application/json", secrets=[CANARY]) or "")


def test_large_bodies_are_cut_after_redaction() -> None:
    body = orjson.dumps({"content": "x" * 10_000, "password": CANARY})
    out = redact_body(body, "application/json", limit=100)
    assert out is not None and len(out) < 200 and "truncated" in out and CANARY not in out
    assert redact_body(b"", "application/json") is None
    assert redact_body(b"--x\r\n", "multipart/form-data; boundary=x") == "[multipart body, 5 bytes]"
