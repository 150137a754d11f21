"""Wire helpers every adapter shares: strict field readers, JSON, Retry-After.

Pure functions with no I/O. Field readers raise ``ValueError`` on a value of the wrong
type; adapters turn that into ``UpstreamProtocolError`` so a malformed upstream answer is
an error of its attempt, never a traceback.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from parley.errors import UpstreamProtocolError

# Upstream error messages are cut to this many characters.
MAX_MESSAGE = 500

# The largest token count taken from an upstream (see ``count``): four of them add up to
# less than 2**31, and it is far beyond any model's context.
MAX_USAGE_COUNT = 500_000_000

# Removes secrets (keys an upstream might echo) from a message.
Scrub = Callable[[str], str]


def whole(value: Any) -> int:
    """An index from the upstream; anything but an integer is a protocol error."""
    if type(value) is not int:
        raise ValueError(f"expected an integer index, got {type(value).__name__}")
    return value


def text_of(value: Any) -> str:
    """A text field from the upstream; anything but a string is a protocol error."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value


def count(value: Any) -> int | None:
    """A token count from the upstream; None (not reported) unless an integer from 0 to
    ``MAX_USAGE_COUNT``. A larger one is no real count: stored, it would not fit the
    request log's 32-bit columns on PostgreSQL once added to others (a prompt is up to
    three counts, a total four), and summed into the rollups it would overflow their
    64-bit totals and fail every later commit of its series."""
    return value if type(value) is int and 0 <= value <= MAX_USAGE_COUNT else None


def dumps(body: Mapping[str, Any]) -> bytes:
    return orjson.dumps(body, default=_json_default)


def _json_default(value: object) -> object:
    # Neutral requests hold read-only mappings (message parts, tools); orjson wants dicts.
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def loads_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"upstream {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"upstream {what} is not a JSON object")
    return obj


def short(value: Any) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text[:MAX_MESSAGE]


def opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# Longer waits read as this: a number of seconds too large for a float is still "do not
# retry soon", never "no wait given".
MAX_RETRY_AFTER = 366 * 86400.0


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date),
    at most ``MAX_RETRY_AFTER``."""
    millis = headers.get("retry-after-ms")
    if millis:
        with contextlib.suppress(ValueError):
            value = float(millis) / 1000
            if not math.isnan(value):
                return min(max(0.0, value), MAX_RETRY_AFTER)
    text = headers.get("Retry-After")
    if not text:
        return None
    with contextlib.suppress(ValueError):
        value = float(text)
        return None if math.isnan(value) else min(max(0.0, value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)
