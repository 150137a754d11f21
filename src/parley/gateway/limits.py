"""Limits on the hot path: refuse a request before it is routed when its API key or its
user is over a limit.

Invariants:
- a caller without limits costs two dictionary lookups, nothing more; limits are reloaded
  from the database every ``reload_seconds`` (a change made through this process applies
  at once: the API calls ``reload``; one made by another process within that interval);
- a refused request uses up no request-per-minute slot, nor shows in the count: spend and
  tokens are checked before the request is counted, and the counts of the key's and the
  user's limits are taken together or not at all (``LimitStore.take_request``: atomic
  upserts in one transaction, shared by every process on the database);
- the database work runs in a thread, never on the event loop;
- spend is what committed exchanges cost: requests already in flight when a budget runs
  out still finish, so a budget can be overshot by at most their cost;
- tokens per minute are those of attempts that finished over the last minute, however
  long ago they started (``store.limits``): a stream counts when it ends, and the
  Retry-After of a spent token limit is a minute after the oldest of them finished.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from parley.errors import BudgetExceeded, RateLimited, TokensRateLimited
from parley.store.limits import MINUTE, Limit, LimitStore, Usage, minute_of


class Caller(Protocol):
    """Who is asking (``server.identity.Identity`` is one)."""

    @property
    def user_id(self) -> int | None: ...

    @property
    def api_key_id(self) -> int | None: ...


class Limiter:
    def __init__(
        self,
        store: LimitStore,
        *,
        reload_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._reload_seconds = reload_seconds
        self._clock = clock
        self._by_key: dict[int, Limit] = {}
        self._by_user: dict[int, Limit] = {}
        self._loaded_at = -math.inf
        self._lock = asyncio.Lock()

    async def check(self, caller: Caller) -> None:
        """Raise ``RateLimited`` / ``BudgetExceeded`` (429) when the caller is over."""
        if caller.api_key_id is None and caller.user_id is None:
            return  # the local admin or the master key: no limits
        if time.monotonic() - self._loaded_at > self._reload_seconds:
            await self.reload(if_stale=True)
        found = self.limits_of(caller)
        if found:
            now = datetime.fromtimestamp(self._clock(), UTC)
            await asyncio.to_thread(self._check, found, now)

    def limits_of(self, caller: Caller) -> list[Limit]:
        """The caller's key's limit, then its user's (``take_request`` relies on the order)."""
        found = []
        if caller.api_key_id is not None and caller.api_key_id in self._by_key:
            found.append(self._by_key[caller.api_key_id])
        if caller.user_id is not None and caller.user_id in self._by_user:
            found.append(self._by_user[caller.user_id])
        return found

    async def reload(self, *, if_stale: bool = False) -> None:
        """Read the limits again; with ``if_stale``, only if nobody did meanwhile (many
        requests find them stale at once: one of them reads)."""
        async with self._lock:
            if if_stale and time.monotonic() - self._loaded_at <= self._reload_seconds:
                return
            rows = await asyncio.to_thread(self.store.all_limits)
            self._by_key = {r.api_key_id: r for r in rows if r.api_key_id is not None}
            self._by_user = {r.user_id: r for r in rows if r.user_id is not None}
            self._loaded_at = time.monotonic()

    def _check(self, found: list[Limit], now: datetime) -> None:
        refusals: list[RateLimited] = []
        for limit in found:
            if (limit.usd_per_day, limit.usd_per_month, limit.tokens_per_minute) == (None,) * 3:
                continue  # only a request count: nothing to read
            refusals.extend(_over(limit, self.store.usage(limit, now), now))
        if refusals:
            # Of several limits spent, the one that frees up last: a client that waits
            # for its Retry-After is not refused again by another.
            raise max(refusals, key=lambda refusal: refusal.retry_after)
        if all(limit.requests_per_minute is None for limit in found):
            return
        window = minute_of(now)
        full = self.store.take_request(found, window)
        if full is not None:
            raise RateLimited(
                f"rate limit reached: {full.requests_per_minute} requests per minute "
                f"for this {_what(full)}",
                retry_after=_seconds(window + MINUTE - now),
            )


def _over(limit: Limit, usage: Usage, now: datetime) -> list[RateLimited]:
    """The refusals for every spend and token limit of ``limit`` that ``usage`` reached."""
    over: list[RateLimited] = []
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if limit.usd_per_day is not None and usage.usd_today >= limit.usd_per_day:
        over.append(
            BudgetExceeded(
                f"daily budget of ${limit.usd_per_day:g} is spent for this {_what(limit)}",
                retry_after=_seconds(today + timedelta(days=1) - now),
            )
        )
    if limit.usd_per_month is not None and usage.usd_this_month >= limit.usd_per_month:
        next_month = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
        over.append(
            BudgetExceeded(
                f"monthly budget of ${limit.usd_per_month:g} is spent for this {_what(limit)}",
                retry_after=_seconds(next_month - now),
            )
        )
    if limit.tokens_per_minute is not None and usage.tokens_last_minute >= limit.tokens_per_minute:
        oldest = usage.oldest_token_at or now
        over.append(
            TokensRateLimited(
                f"rate limit reached: {limit.tokens_per_minute} tokens per minute for this "
                f"{_what(limit)}",
                retry_after=_seconds(oldest + MINUTE - now),
            )
        )
    return over


def _what(limit: Limit) -> str:
    return "API key" if limit.api_key_id is not None else "user"


def _seconds(delta: timedelta) -> float:
    return max(1.0, delta.total_seconds())
