"""Times are stored and compared in UTC: one conversion for every layer.

SQLite keeps no offset, so a stored time read back is naive; it is UTC by construction.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a time without an offset is taken as UTC. A time already in UTC
    is returned as is (the bulk writer converts equal objects once)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else utc(moment)
