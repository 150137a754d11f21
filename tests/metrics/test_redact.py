"""Redaction of stored request bodies: secrets by name, by shape and by value."""

from __future__ import annotations

import pickle
from urllib.parse import urlencode

import orjson

from parley.metrics.redact import REDACTED, SecretSet, redact_body, redact_text

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


def test_a_body_is_read_as_json_whatever_its_content_type_says() -> None:
    body = orjson.dumps({"username": "gina", "password": CANARY, "role": "user"})
    for content_type in ("application/x-www-form-urlencoded", "text/plain", ""):
        out = redact_body(body, content_type)
        assert out is not None and CANARY not in out, content_type
        assert orjson.loads(out) == {"username": "gina", "password": REDACTED, "role": "user"}


def test_names_in_camel_case_and_pwd_are_secret_names_and_words_ending_in_key_are_not() -> None:
    fields = {"accessKey": CANARY, "masterKey": CANARY, "privateKey": CANARY, "pwd": CANARY}
    out = redact_body(orjson.dumps({**fields, "monkey": "banana", "hockey": 1}), "")
    assert out is not None and orjson.loads(out) == {
        **dict.fromkeys(fields, REDACTED),
        "monkey": "banana",
        "hockey": 1,
    }


def test_text_that_does_not_parse_loses_every_value_named_like_a_secret() -> None:
    bodies = [
        f'{{"login": "frank", "password": "{CANARY}",}}',  # a trailing comma
        f'{{"password": "{CANARY}',  # cut short, no closing quote
        f'{{"password": "a \\" b {CANARY}", "x": 1',  # an escaped quote inside
        f"{{'api_key': '{CANARY}', 'n': 2",
        f"password={CANARY}&user=x",
        f"token: {CANARY}\nAuthorization: Bearer {CANARY}\nkeep: this",
    ]
    for body in bodies:
        out = redact_body(body.encode(), "text/plain")
        assert out is not None and CANARY not in out, out
    assert redact_body(b'{"login": "frank", "keep": "this",}', "application/json") == (
        '{"login": "frank", "keep": "this",}'
    )


def test_large_bodies_are_cut_after_redaction() -> None:
    body = orjson.dumps({"content": "x" * 10_000, "password": CANARY})
    out = redact_body(body, "application/json", limit=100)
    assert out is not None and len(out) < 200 and "truncated" in out and CANARY not in out
    assert redact_body(b"", "application/json") is None
    assert redact_body(b"--x\r\n", "multipart/form-data; boundary=x") == "[multipart body, 5 bytes]"


# The vault's master secret from its key file (URL-safe base64, "=" padded), and a
# PARLEY_SECRET_KEY, which may be any string.
KEY_FILE_SECRET = "q0_Ny-3vT8canaryKx1Zb9Yw2Lm5Rj7Hs4Fd6Ga8Pc0E="
PASSPHRASE = 'canary "quoted\\ passphrase'


def test_known_secrets_are_found_however_the_body_spells_them() -> None:
    secrets = SecretSet.of([KEY_FILE_SECRET, PASSPHRASE])
    form = urlencode({"note": KEY_FILE_SECRET, "other": PASSPHRASE, "keep": "visible"})
    as_json = orjson.dumps({"content": f"{KEY_FILE_SECRET} and {PASSPHRASE}"})
    for body, content_type in (
        (form.encode(), "application/x-www-form-urlencoded"),
        (as_json, "application/json"),
        (f"pasted: {form}".encode(), "text/plain"),
    ):
        out = redact_body(body, content_type, secrets)
        assert out is not None and "canary" not in out, content_type
        assert "visible" in out or "content" in out
    # Given as plain strings, as before.
    assert "canary" not in (
        redact_body(
            form.encode(), "application/x-www-form-urlencoded", [KEY_FILE_SECRET, PASSPHRASE]
        )
        or ""
    )


def test_secrets_that_begin_alike_are_removed_whole_and_nothing_else() -> None:
    short, long = "mk-canary-0123456789", "mk-canary-0123456789-abcdef"
    others = [f"mk-canary-{i:06d}-{i * 7919:x}" for i in range(2000)]
    secrets = SecretSet.of([short, long, *others])
    text = f"a {long} b {short}. c {others[1234]} d mk-canary-01234 e mk-canary-"
    assert redact_text(text, secrets) == (
        f"a {REDACTED} b {REDACTED}. c {REDACTED} d mk-canary-01234 e mk-canary-"
    )
    # It travels to the writer's process with the rows.
    assert pickle.loads(pickle.dumps(secrets)).sub(long) == REDACTED
    assert SecretSet.of(["abc", ""]).spellings == ()  # too short to be told from words


def test_google_api_keys_are_redacted_by_shape() -> None:
    key = "AIza" + "SyCanary0123456789abcdefghijklmno_-"
    assert len(key) == 39
    assert redact_text(f"gemini key {key}, thanks") == f"gemini key {REDACTED}, thanks"
