"""The aiohttp application: ``create_app(settings)`` and its lifespan.

The lifespan prepares the database (an empty one is migrated), opens the engine, starts
the group-commit writer and one pooled upstream HTTP session, and builds the gateway. On
shutdown aiohttp first lets in-flight requests finish, then the session is closed and the
writer commits everything queued before the engine is disposed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from parley.errors import ClientError, NotFound, ParleyError
from parley.gateway.capabilities import CapabilityBook, shipped_capabilities
from parley.gateway.catalog import ModelCatalog
from parley.gateway.directory import open_directory
from parley.gateway.pricing import PriceBook, shipped_prices
from parley.gateway.router import Router
from parley.gateway.service import Gateway
from parley.ops.migrate import prepare_on_start
from parley.providers.registry import build_providers
from parley.server import (
    anthropic_api,
    auth,
    chat_api,
    files_api,
    openai_api,
    openapi,
    providers_api,
    users_api,
)
from parley.server.identity import LOCAL_MODE
from parley.server.local_guard import local_guard
from parley.server.state import SERVICES, Services
from parley.settings import Settings
from parley.store.engine import create_engine
from parley.store.writer import Writer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SETTINGS = web.AppKey("settings", Settings)


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        # Local mode: no credentials, so only programs on this machine (local_guard).
        middlewares=[_errors] if settings.master_key is not None else [_errors, local_guard],
        # The body limit is checked again in read_body for a clear 413 in OpenAI shape.
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[LOCAL_MODE] = settings.master_key is None
    app.cleanup_ctx.append(_lifespan)
    # The identity repository; with a master key, the auth middleware after _errors.
    auth.install(app, settings)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_post("/v1/embeddings", openai_api.embeddings)
    app.router.add_post("/v1/messages", anthropic_api.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_api.count_tokens)
    # The chat API (/api): each module registers its own routes.
    for module in (users_api, chat_api, files_api, providers_api, openapi):
        module.add_routes(app)
    app.router.add_get("/healthz", _healthz)
    return app


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    await asyncio.to_thread(prepare_on_start, settings)
    engine = create_engine(settings)
    writer = Writer(engine, batch_max=settings.writer_batch_max)
    writer.start()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None),
        # Upstream bodies are passed through byte for byte, so they are not re-encoded.
        auto_decompress=True,
    )
    try:
        providers = build_providers(settings, session)
        # Provider configurations in the database, and users' own keys (issue 4).
        directory, user_keys = await open_directory(settings, engine, session)
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
        )
        yield
    finally:
        await session.close()
        await asyncio.to_thread(writer.stop, 60.0)
        engine.dispose()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON in the protocol of the endpoint: Anthropic's on /v1/messages*,
    OpenAI's everywhere else."""
    try:
        return await handler(request)
    except ParleyError as exc:
        return _error_response(request, exc)
    except web.HTTPNotFound:
        return _error_response(
            request, NotFound(f"no such endpoint: {request.method} {request.path}")
        )
    except web.HTTPException as exc:
        return _error_response(request, _HTTPError(exc.status, exc.reason))
    except Exception:
        # The traceback goes to the log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error_response(request, ParleyError("internal server error"))


class _HTTPError(ClientError):
    """An aiohttp refusal (405, 413...) answered in the endpoint's protocol."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_response(request: web.Request, error: ParleyError) -> web.Response:
    if anthropic_api.is_anthropic_path(request.path):
        return anthropic_api.error_response(error)
    return openai_api.error_response(error)


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
    return web.Response(
        body=orjson.dumps(body), status=200 if alive else 503, content_type="application/json"
    )
