"""What the request handlers share: the services built in the app's lifespan.

``Services`` is created by ``create_app``'s lifespan and reached through ``app[SERVICES]``;
there is no module-level state. Recording goes through here so that every handler obeys
the same rule: in ``durable`` mode ``record`` returns only once the exchange is committed,
in ``journal`` mode once it is written to the journal (``store.journal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy
from aiohttp import web

from parley.domain.exchange import Exchange
from parley.errors import BodyTooLarge, StoreError, StoreUnavailable
from parley.gateway.catalog import ModelCatalog
from parley.gateway.directory import ProviderDirectory
from parley.gateway.limits import Caller, Limiter
from parley.gateway.service import Gateway
from parley.metrics.prometheus import PrometheusMetrics
from parley.search.services import SearchServices
from parley.settings import Settings
from parley.store.journal import Journal
from parley.store.writer import RecordWriter

log = logging.getLogger(__name__)

# Async recording queues at most this many writer batches before it waits for commits.
ASYNC_BACKLOG_BATCHES = 4


@dataclass(slots=True)
class Services:
    settings: Settings
    # The one engine (and pool) of the process: every repository reads through it.
    engine: sqlalchemy.Engine
    gateway: Gateway
    catalog: ModelCatalog
    writer: RecordWriter
    started_at: float
    # Provider configurations in the database (and the vault for their keys); None only
    # in an app built without them (the admin provider API then answers 503).
    directory: ProviderDirectory | None = field(default=None, kw_only=True)
    # Per-key and per-user limits; None in an app built without them.
    limiter: Limiter | None = field(default=None, kw_only=True)
    # This process's Prometheus collectors (``GET /metrics``).
    prometheus: PrometheusMetrics | None = field(default=None, kw_only=True)
    # Semantic search (issue 7): embedder, vector store, indexer; None in an app built
    # without them (semantic search then answers 503, hybrid falls back to keyword).
    search: SearchServices | None = field(default=None, kw_only=True)
    # Journal recording's journal (``store.journal``); None in the other modes.
    journal: Journal | None = field(default=None, kw_only=True)

    def check_recording(self) -> None:
        """Refuse before any upstream call when the answer could not be recorded."""
        if not self.writer.is_alive():
            raise StoreUnavailable("the store writer is not running; try again later")

    async def admit(self, caller: Caller) -> None:
        """Refuse before any upstream call: the answer could not be recorded, or the
        caller is over one of its limits (429)."""
        self.check_recording()
        if self.limiter is not None:
            await self.limiter.check(caller)

    async def record(self, exchange: Exchange) -> None:
        """Commit ``exchange`` (durable mode), write it to the journal and queue it
        (journal mode), or queue it (async mode); in the last two, with the writer four
        batches behind, wait for its commit as durable mode does. A failed commit reaches
        the client as durable mode's would, except for a journaled exchange: that one is
        acknowledged, and the next start's replay commits it."""
        limit = ASYNC_BACKLOG_BATCHES * self.settings.writer_batch_max
        pending: asyncio.Future[Any] | None
        if self.journal is not None and self.journal.takes(exchange):
            await self._journal(self.journal, exchange, limit)
            return
        if self.settings.recording == "async":
            # Acknowledged before the commit, unless the writer is a few batches behind.
            pending = self.writer.submit_unless_behind(exchange, limit)
            if pending is None:
                return
        else:
            pending = self.writer.submit(exchange)
        try:
            await pending
        except StoreError:
            raise
        except Exception as exc:
            log.exception("recording failed")
            raise StoreError("the exchange could not be recorded") from exc

    async def _journal(self, journal: Journal, exchange: Exchange, limit: int) -> None:
        """Append ``exchange`` to the journal (acknowledged from then on) and queue its
        commit; wait for that commit only while the writer is a few batches behind."""
        segment = journal.append(exchange)
        try:
            pending = self.writer.submit(exchange)
        except Exception:
            journal.failed(segment)  # logged there; kept for the next start's replay
            return
        pending.add_done_callback(functools.partial(journal.settled, segment))
        if journal.pending <= limit:
            return
        # A client that leaves while waiting must not cancel the commit's future: the
        # journal would take the record for failed.
        with contextlib.suppress(Exception):
            await asyncio.shield(pending)

    async def record_quietly(self, exchange: Exchange) -> None:
        """Record an exchange whose client already gets an error; a store failure is logged.

        An exchange that never reached an upstream (refused by routing) has nothing to keep.
        """
        if not exchange.attempts:
            return
        try:
            await self.record(exchange)
        except StoreError:
            log.error("could not record a failed exchange (model %s)", exchange.model_requested)

    def record_in_background(self, exchange: Exchange) -> None:
        """Record without waiting: the client is gone, nobody is waiting for the ack."""
        try:
            self.writer.submit_nowait(exchange)
        except StoreError:
            log.error("could not queue the record of an abandoned exchange")


SERVICES = web.AppKey("services", Services)


# The body a handler read, for the HTTP metrics middleware (which stores it redacted).
BODY_KEY = web.RequestKey("parley.body", bytes)


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"request body is larger than the limit of {limit} bytes") from None
    request[BODY_KEY] = body
    return body
