"""Query-string parameters as every API route reads them.

A number in a query string is ASCII digits and nothing else: Python's ``int`` also takes
`` 5``, ``+5``, ``1_0`` and other scripts' digits, which no client means and which would
make one URL spell many. A refused value is a 400 naming the parameter.
"""

from __future__ import annotations

from parley.errors import InvalidRequest


def bounded_int(
    raw: str | None,
    param: str,
    low: int,
    high: int,
    *,
    default: int | None = None,
    refusal: str | None = None,
) -> int | None:
    """``raw`` as an integer from ``low`` to ``high``; ``default`` when absent or empty.
    ``refusal`` replaces the message of the 400 for anything else."""
    if raw is None or raw == "":
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() else None
    if value is None or not low <= value <= high:
        raise InvalidRequest(refusal or f"'{param}' must be an integer from {low} to {high}", param)
    return value


def page_size(raw: str | None, high: int, default: int = 50) -> int:
    """A page's ``limit``: from 1 to ``high``, ``default`` when absent."""
    value = bounded_int(raw, "limit", 1, high, default=default)
    assert value is not None
    return value
