"""The aiohttp application: ``create_app(settings)`` and its lifespan.

The lifespan holds ``ServerPresence`` for the server's whole life (restores and offline
maintenance refuse to run under it), prepares the database (an empty one is migrated; a
crash of the previous run is reported to the startup checks), opens the engine, starts
the group-commit writer, one pooled upstream HTTP session and the scheduled jobs
(``ops.schedule``), and builds the gateway.

Shutdown, in order: the listening sockets close (aiohttp); ``on_shutdown`` lets in-flight
requests finish for ``settings.shutdown_grace`` seconds and then interrupts the answers
still streaming (``server.shutdown``), while the scheduled jobs stop (a run in progress
gets the same grace); the upstream session closes; the writer commits everything queued; on SQLite
the write-ahead log is checkpointed and truncated; only then is the run marked clean, so a
crash anywhere before leaves the marker for the next start to see.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import orjson
import sqlalchemy
from aiohttp import web
from aiohttp.typedefs import Middleware

from parley.errors import (
    ClientError,
    InvalidRequest,
    NotFound,
    ParleyError,
    StoreError,
    StoreFull,
)
from parley.gateway.capabilities import CapabilityBook, shipped_capabilities
from parley.gateway.catalog import ModelCatalog
from parley.gateway.directory import open_directory
from parley.gateway.limits import Limiter
from parley.gateway.pricing import PriceBook, shipped_prices
from parley.gateway.router import Router
from parley.gateway.service import Gateway
from parley.metrics.prometheus import CONTENT_TYPE, PrometheusMetrics
from parley.ops.dbfile import check_database_file
from parley.ops.migrate import prepare_on_start
from parley.ops.presence import ServerPresence
from parley.ops.schedule import Scheduler, server_jobs
from parley.providers.registry import build_providers
from parley.search.embedders import Embedder
from parley.search.services import close_search, open_search
from parley.server import (
    anthropic_api,
    auth,
    chat_api,
    documents_api,
    files_api,
    http_metrics,
    identity,
    limits_api,
    metrics_api,
    openai_api,
    openapi,
    providers_api,
    search_api,
    users_api,
)
from parley.server.identity import LOCAL_MODE
from parley.server.local_guard import local_guard
from parley.server.shutdown import DRAIN, STOP, Drain, StopRequest
from parley.server.state import SERVICES, Services
from parley.settings import Settings
from parley.store import journal
from parley.store.engine import checkpoint, create_engine, is_disk_full
from parley.store.limits import LimitStore
from parley.store.writer import RecordWriter, Writer
from parley.store.writer_process import ProcessWriter

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS = web.AppKey("settings", Settings)
SCHEDULER = web.AppKey("scheduler", Scheduler)
# An embedder loaded by the caller (tests share one model); None: load the configured one.
EMBEDDER = web.AppKey("embedder", Embedder)


# Bytes in a request line (method, path, query string, version).
MAX_REQUEST_LINE = 32 * 1024


def create_app(settings: Settings, *, embedder: Embedder | None = None) -> web.Application:
    # HTTP metrics outermost: they see every answer, errors included. Local mode: no
    # credentials, so only programs on this machine (local_guard).
    middlewares: list[Middleware] = [http_metrics.middleware(settings), _errors]
    if settings.master_key is None:
        middlewares.append(local_guard)
    app = web.Application(
        middlewares=middlewares,
        # The body limit is checked again in read_body for a clear 413 in OpenAI shape.
        client_max_size=settings.max_body_bytes,
        # A request line the API's own limits allow must reach it: a 1,000-character
        # search query in 4-byte UTF-8 is 12 KB percent-encoded, over aiohttp's 8 KB
        # default, which answers in plain text before parley sees the request.
        handler_args={"max_line_size": MAX_REQUEST_LINE},
    )
    app[SETTINGS] = settings
    app[LOCAL_MODE] = settings.master_key is None
    app[DRAIN] = Drain()
    app[STOP] = StopRequest()
    if embedder is not None:
        app[EMBEDDER] = embedder
    app.cleanup_ctx.append(_lifespan)
    app.on_shutdown.append(_drain)
    # The identity repository; with a master key, the auth middleware after _errors.
    auth.install(app, settings)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.list_models)
    # Model ids are "provider/model": the id may span path segments.
    app.router.add_get("/v1/models/{model:.+}", openai_api.retrieve_model)
    app.router.add_post("/v1/embeddings", openai_api.embeddings)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    # The chat API (/api): each module registers its own routes.
    for module in (
        users_api,
        chat_api,
        files_api,
        documents_api,
        providers_api,
        metrics_api,
        limits_api,
        search_api,
        openapi,
    ):
        module.add_routes(app)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _prometheus)
    return app


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    stop = app[STOP]
    # A file that is not a parley database (another application's...) is refused before
    # the presence lock makes a file beside it; ``prepare_on_start`` checks it again.
    await asyncio.to_thread(check_database_file, settings)
    presence = ServerPresence(settings)
    await asyncio.to_thread(presence.__enter__)
    try:
        stop.check()
        await asyncio.to_thread(
            prepare_on_start,
            settings,
            previous_run_unclean=presence.previous_run_unclean,
            stop=stop.asked,
        )
        stop.check()
    except BaseException:
        # Nothing was written: a clean previous run stays clean, a crashed one stays so.
        if not presence.previous_run_unclean:
            presence.mark_clean()
        await asyncio.to_thread(presence.__exit__, None, None, None)
        raise
    try:
        async with _serving(app, settings, presence):
            yield
    finally:
        await asyncio.to_thread(presence.__exit__, None, None, None)


@asynccontextmanager
async def _serving(
    app: web.Application, settings: Settings, presence: ServerPresence
) -> AsyncIterator[None]:
    engine = create_engine(settings)
    prometheus = PrometheusMetrics()
    # Journal recording: created first, so that a process writer's child holds its owner
    # lock too (a start must not replay what a surviving child still commits).
    journaled = journal.Journal(settings.journal_dir) if settings.recording == "journal" else None
    writer: RecordWriter
    stop = app[STOP]
    if settings.writer == "process":
        writer = ProcessWriter(
            settings,
            on_commit=prometheus.observe_tallies,
            inherit_fds=() if journaled is None else (journaled.owner_fd,),
        )
    else:
        writer = Writer(
            engine, batch_max=settings.writer_batch_max, on_commit=prometheus.observe_rows
        )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None),
        # Upstream bodies are passed through byte for byte, so they are not re-encoded.
        auto_decompress=True,
    )
    stopping = threading.Event()
    scheduler = app[SCHEDULER] = Scheduler(server_jobs(settings, stopping), stopping)
    # A stop asked for while starting (stop.check: StopRequested) unwinds from the next
    # step on: the finally below stops whatever was started, the writer first of all.
    try:
        await asyncio.to_thread(writer.start)
        stop.check()
        # What a server in journal mode acknowledged and did not commit before it died
        # (whatever this server's own mode): committed before anything is answered.
        await journal.replay(settings.journal_dir, engine, writer)
        providers = build_providers(settings, session)
        # Provider configurations in the database, and users' own keys (issue 4).
        directory, user_keys = await open_directory(settings, engine, session)
        stop.check()
        capabilities = CapabilityBook(settings.capabilities, shipped_capabilities())
        gateway = Gateway(
            Router(providers, settings.aliases, directory),
            PriceBook(settings.pricing, shipped_prices()),
            settings.retry,
            capabilities,
            user_keys,
        )
        catalog = ModelCatalog(
            providers, settings.aliases, capabilities, settings.models_ttl, directory
        )
        app[SERVICES] = Services(
            settings=settings,
            engine=engine,
            gateway=gateway,
            catalog=catalog,
            writer=writer,
            started_at=time.time(),
            directory=directory,
            limiter=Limiter(LimitStore(engine)),
            prometheus=prometheus,
            journal=journaled,
        )
        # -- search (issue 7): the embedder loads here (seconds for the local model); the
        # indexer drains the outbox in the background, after reconciling on start.
        services = app[SERVICES]
        search = services.search = await asyncio.to_thread(
            open_search,
            settings,
            engine,
            remote=search_api.remote_embeddings(services),
            embedder=app.get(EMBEDDER),
            isolated=True,
        )
        stop.check()
        search.indexer.start()
        # -- end search
        scheduler.start()
        yield
    finally:
        # After on_shutdown the jobs already had their grace: do not wait twice.
        await scheduler.stop(0.0 if app[DRAIN].stopping else settings.shutdown_grace)
        search_services = app[SERVICES].search if SERVICES in app else None
        if search_services is not None:
            await search_services.indexer.stop()  # search (issue 7)
            await asyncio.to_thread(close_search, search_services)
        await session.close()
        clean = await asyncio.to_thread(_close_store, writer, engine)
        # A writer that did not stop may still commit: its segments stay locked until
        # the process exits.
        if journaled is not None and clean:
            await asyncio.sleep(0)  # the commits' callbacks, scheduled by the writer, run
            journaled.close()
        if clean:
            presence.mark_clean()


def _close_store(writer: RecordWriter, engine: sqlalchemy.Engine) -> bool:
    """Commit what is queued, empty the write-ahead log, close every connection; return
    whether all of it worked (only then may the run be marked clean)."""
    clean = True
    try:
        writer.stop(60.0)
    except StoreError as exc:
        log.error("shutdown: %s", exc.message)
        clean = False
    if clean:
        try:
            clean = checkpoint(engine)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            log.error("shutdown: the final checkpoint failed: %s", exc)
            clean = False
    engine.dispose()
    return clean


async def _drain(app: web.Application) -> None:
    """on_shutdown: runs once the listening sockets are closed (see ``server.shutdown``).
    Scheduled jobs stop meanwhile: a run in progress gets the same grace."""
    grace = app[SETTINGS].shutdown_grace
    scheduler = app.get(SCHEDULER)
    stopping = [] if scheduler is None else [scheduler.stop(grace)]
    await asyncio.gather(app[DRAIN].drain(grace), *stopping)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON in the protocol of the endpoint: Anthropic's on /v1/messages*,
    OpenAI's everywhere else. Also counts the request as in flight, for the shutdown."""
    with request.app[DRAIN].request():
        return await _answer_errors(request, handler)


async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        _refuse_nul(request)
        return await handler(request)
    except Exception as exc:
        if request.writer.output_size > 0:
            return _broken_off(request, exc)
        return _error_answer(request, exc)


def _refuse_nul(request: web.Request) -> None:
    """A NUL in the path or the query is a 400 on every route: PostgreSQL text cannot hold
    one, and SQLite would take it, so the two databases would answer it differently."""
    if "\x00" in request.path:
        raise InvalidRequest("the path may not contain a NUL character")
    if request.query_string:
        for key, value in request.query.items():
            if "\x00" in key or "\x00" in value:
                raise InvalidRequest(f"'{key}' may not contain a NUL character", key)


def _error_answer(request: web.Request, exc: Exception) -> web.Response:
    """``exc``, which ended ``request`` before any of its answer went out, answered in the
    endpoint's protocol (called while ``exc`` is being handled, for the log's traceback)."""
    if isinstance(exc, ParleyError):
        return _error_response(request, exc)
    if isinstance(exc, web.HTTPNotFound):
        return _error_response(
            request, NotFound(f"no such endpoint: {request.method} {request.path}")
        )
    if isinstance(exc, web.HTTPException):
        return _error_response(request, _HTTPError(exc.status, exc.reason))
    if is_disk_full(exc):
        # Outside the writer (chat API, uploads): the same clear 507, no traceback.
        log.error("%s %s: the disk is full: %s", request.method, request.path, exc)
        return _error_response(
            request, StoreFull("the disk is full: nothing was saved; try again later")
        )
    # The traceback goes to the log, never to the client.
    log.exception("unhandled error on %s %s", request.method, request.path)
    return _error_response(request, ParleyError("internal server error"))


def _broken_off(request: web.Request, exc: Exception) -> web.Response:
    """``exc`` ended ``request`` after part of its answer went out (a download cut by a
    read error, a client that left): an error response now would be spliced into that
    body. The connection is closed instead, so the client sees a broken answer, never a
    wrong one; the error answer returned is only what the HTTP metrics record (writing it
    to the closed connection fails quietly in aiohttp)."""
    if request.transport is not None:
        request.transport.close()
    if isinstance(exc, ConnectionError):
        error = _HTTPError(http_metrics.CLIENT_CLOSED, http_metrics.CLIENT_CLOSED_MESSAGE)
        return _error_response(request, error)
    log.error(
        "%s %s failed after its answer began (connection closed)",
        request.method,
        request.path,
        exc_info=exc,
    )
    return _error_response(request, ParleyError("the answer broke off: internal server error"))


class _HTTPError(ClientError):
    """An aiohttp refusal (405, 413...) answered in the endpoint's protocol."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_response(request: web.Request, error: ParleyError) -> web.Response:
    request[http_metrics.ERROR_KEY] = error.message
    if anthropic_api.is_anthropic_path(request.path):
        return anthropic_api.error_response(error)
    return openai_api.error_response(error)


async def _prometheus(request: web.Request) -> web.Response:
    """This process's counters and histograms in Prometheus' text format (admins)."""
    identity.admin(request)
    prometheus = request.app[SERVICES].prometheus
    if prometheus is None:
        raise NotFound("no such endpoint: GET /metrics")
    body = await asyncio.to_thread(prometheus.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _healthz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    alive = services.writer.is_alive()
    writer = services.writer
    body = {
        "status": "ok" if alive else "degraded",
        "writer": {
            "running": alive,
            "committed": writer.committed,
            "failed": writer.failed,
            "batches": writer.batches,
        },
    }
    if journaled := services.journal:
        # Acknowledged on the journal and not yet committed; of those, the ones whose
        # commit failed (replayed at the next start).
        body["journal"] = {"pending": journaled.pending + journaled.kept, "kept": journaled.kept}
    return web.Response(
        body=orjson.dumps(body), status=200 if alive else 503, content_type="application/json"
    )
