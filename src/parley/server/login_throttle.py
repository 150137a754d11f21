"""Login throttling: a login name that keeps failing is refused for a while.

Invariants:
- failures are counted per login name (trimmed and lower-cased, whether or not such a
  user exists, so a refusal tells nothing about which names are accounts), in the
  database's ``rate_windows`` (one row per name and minute, ``LimitStore.count_request``),
  so every parley process on one database shares the count;
- every attempt is counted before its password is checked, and the attempt is refused
  with 429 and ``Retry-After`` (its password never checked) when the count over
  ``WINDOW``, itself included, is above ``MAX_FAILURES``; a refused attempt then takes its
  count back. Counting first makes the limit hold under a burst: of any number of
  concurrent attempts at most ``MAX_FAILURES`` get their password checked per window
  (an attempt that was let through never takes its count back). Not counting refused
  attempts means retrying while refused never prolongs the refusal: ``Retry-After`` is
  when enough of the counted attempts will have left the window for one more;
- a successful login forgets the name's count, so failures are what it keeps;
- the counter's key is a hash of the name, never the name itself;
- the count is per name, not per client address: behind a reverse proxy every client
  shares one address, and a per-address count would let one client lock everyone out.
  The cost is that anyone can keep a known name refused by failing it again every
  ``WINDOW``; its owner's API keys keep working.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

from parley.errors import RateLimited
from parley.store.limits import LimitStore, minute_of

MAX_FAILURES = 10
WINDOW = timedelta(minutes=15)
# ``rate_windows.subject`` holds 32 characters: the prefix and 26 hex digits (104 bits).
_PREFIX = "login:"


class LoginThrottle:
    def __init__(self, store: LimitStore) -> None:
        self.store = store

    async def attempt(self, login: str) -> None:
        """Count an attempt to log in as ``login``; raise ``RateLimited`` (and take the
        count back) when it is over ``MAX_FAILURES`` in ``WINDOW``."""
        now = datetime.now(UTC)
        subject, minute = subject_of(login), minute_of(now)
        await asyncio.to_thread(self.store.count_request, subject, minute)
        counts = await asyncio.to_thread(self.store.counts_since, subject, minute_of(now - WINDOW))
        if sum(count for _, count in counts) <= MAX_FAILURES:
            return
        await asyncio.to_thread(self.store.uncount, subject, minute)
        raise RateLimited(
            "too many failed logins for this name; try again later",
            retry_after=_until_one_more(counts, now),
        )

    async def succeeded(self, login: str) -> None:
        """Forget the attempts of ``login``: it logged in."""
        await asyncio.to_thread(self.store.forget, subject_of(login))


def _until_one_more(counts: list[tuple[datetime, int]], now: datetime) -> float:
    """Seconds until the minutes counted in ``counts`` (oldest first; a refused attempt's
    count included, which it takes back) leave room for one more attempt: a minute leaves
    the window once its start is more than ``WINDOW`` ago."""
    left = sum(count for _, count in counts) - 1
    for start, count in counts:
        left -= count
        if left < MAX_FAILURES:
            return (start + WINDOW + timedelta(minutes=1) - now).total_seconds()
    return 0.0


def subject_of(login: str) -> str:
    digest = hashlib.sha256(login.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()
    return _PREFIX + digest[:26]
