"""``parley search`` and ``parley reindex``: search the history and rebuild its vectors
from the shell; thin clients of ``store.search`` and ``parley.search``.

``search`` is the operator's: without ``--user`` it searches every user's history, with it
one user's (by username or email); ``--mode`` is the API's (hybrid by default, keyword
when no embedder is configured, which it says on stderr). ``reindex`` reconciles the vector
store with the database (rows without vectors embedded, vectors without rows deleted) and
drains the outbox; ``--full`` re-embeds everything. Both read settings the way the server
does and need the database at the schema head, which they never migrate
(``cli.common.engine_at_head``); errors are one line on stderr and exit status 1.
A remote embedder is reached through a provider of the config file named in
``[search] model`` ("provider/model"); the server also knows aliases and database providers.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import aiohttp
import click
import orjson
import sqlalchemy

from parley.cli.common import engine_at_head, fail, run
from parley.errors import ParleyError
from parley.paths import not_a_directory, reason
from parley.providers.registry import build_providers
from parley.search.embedders import RemoteCall, vectors_of
from parley.search.hybrid import Results
from parley.search.indexer import Reconciled
from parley.search.services import SearchServices, open_search
from parley.search.vector_lock import local_path
from parley.settings import Settings, load_settings
from parley.store.search import MARK_END, MARK_START, MAX_LIMIT, Hit, Scope
from parley.store.users import Users

T = TypeVar("T")


@click.command("search")
@click.argument("query")
@click.option("--user", help="Search this user's history only (username or email).")
@click.option("--conversation", help="Search this conversation only (its id).")
@click.option(
    "--mode",
    type=click.Choice(["hybrid", "keyword", "semantic"]),
    default="hybrid",
    show_default=True,
    help="By words, by meaning, or both (reciprocal rank fusion).",
)
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, MAX_LIMIT), help="Results."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search(
    query: str,
    user: str | None,
    conversation: str | None,
    mode: str,
    limit: int,
    as_json: bool,
) -> None:
    """Find messages and conversation titles matching QUERY (the same search as
    GET /api/search), best first."""
    conversation_id: uuid.UUID | None = None
    if conversation is not None:
        try:
            conversation_id = uuid.UUID(conversation)
        except ValueError:
            fail(f"--conversation {conversation!r} is not a conversation id")
    settings = run(load_settings)
    if mode == "keyword":
        settings = _without_embedder(settings)
    with engine_at_head() as engine:
        scope = Scope(None, everyone=True)
        if user is not None:
            found = run(lambda: Users(engine).find_user(user))
            if found is None:
                fail(f"no user {user!r}")
                return
            scope = Scope(found.id)

        async def work(services: SearchServices) -> Results:
            return await services.searcher.search(
                query, scope, mode=mode, conversation=conversation_id, limit=limit
            )

        results = _with_search(settings, engine, work)
    hits = results.hits
    if as_json:
        click.echo(orjson.dumps([_json(hit) for hit in hits], option=orjson.OPT_INDENT_2))
        return
    if results.notice:
        click.echo(f"note: {results.notice}", err=True)
    if not hits:
        click.echo("no results")
    for hit in hits:
        where = f"{hit.conversation_title or '(untitled)'}  {hit.conversation_id}"
        what = "title" if hit.message_id is None else f"{hit.role} {hit.message_id}"
        click.echo(f"{hit.created_at:%Y-%m-%d %H:%M}  {where}  {what}  score {hit.score:.3f}")
        click.echo("    " + _plain(hit))


@click.command("reindex")
@click.option("--full", is_flag=True, help="Drop every vector and embed everything again.")
def reindex(full: bool) -> None:
    """Bring the vector store in line with the database: embed the messages and document
    chunks that have no vector, delete the vectors whose row is gone, and drain the
    outbox. Safe while the server runs (writes are idempotent)."""
    settings = run(load_settings)
    if settings.search.embedder == "none":
        fail("no embedder is configured ([search] embedder = 'none'): nothing to index")
    with engine_at_head() as engine:

        async def work(services: SearchServices) -> tuple[bool, Reconciled, int, float]:
            if services.embedder is None:
                raise ParleyError(
                    "the embedder could not be loaded (is the 'embeddings' extra installed?)"
                )
            clock = time.monotonic()
            emptied = await services.indexer.prepare(full=full)
            done = await services.indexer.reconcile()
            handled = await services.indexer.run_once()
            return emptied, done, handled, time.monotonic() - clock

        emptied, done, handled, seconds = _with_search(settings, engine, work)
    if emptied:
        click.echo("the vector store was emptied for the model: everything is embedded again")
    click.echo(
        f"{done.messages_queued} message(s) and {done.chunks_queued} chunk(s) without a vector "
        f"queued; {done.messages_deleted} message and {done.chunks_deleted} chunk vector(s) "
        f"without a row deleted; {handled} outbox item(s) handled in {seconds:.1f} s"
    )


def _with_search(
    settings: Settings,
    engine: sqlalchemy.Engine,
    work: Callable[[SearchServices], Awaitable[T]],
) -> T:
    store = local_path(settings.vector_uri)
    if store is not None and settings.search.embedder != "none":
        blocked = _unusable(store)
        if blocked is not None:  # before LanceDB, whose own words would not name the path
            fail(f"cannot use the vector store {store}: {blocked}")

    async def main() -> T:
        async with aiohttp.ClientSession() as session:
            remote = _remote(settings, session)
            services = await asyncio.to_thread(open_search, settings, engine, remote=remote)
            return await work(services)

    return run(lambda: asyncio.run(main()))


def _unusable(store: Path) -> str | None:
    """Why the local vector store's directory cannot be used (None: it can, or it is not
    made yet)."""
    blocked = not_a_directory(store)
    if blocked is None and store.is_dir():
        try:
            os.listdir(store)
        except OSError as exc:
            blocked = reason(exc, store)
    return blocked


def _remote(settings: Settings, session: aiohttp.ClientSession) -> RemoteCall | None:
    if settings.search.embedder != "remote" or settings.search.model is None:
        return None
    name, _, model = settings.search.model.partition("/")
    provider = build_providers(settings, session).get(name)
    if provider is None or not model:
        fail(
            f"[search] model {settings.search.model!r} does not name a provider of the config "
            "file as 'provider/model'"
        )

    async def call(texts: list[str]) -> list[list[float]]:
        result = await provider.embeddings({"model": model, "input": texts}, model)
        return vectors_of(orjson.loads(result.raw))

    return call


def _without_embedder(settings: Settings) -> Settings:
    return replace(settings, search=replace(settings.search, embedder="none"))


def _plain(hit: Hit) -> str:
    return hit.snippet.replace(MARK_START, "[").replace(MARK_END, "]")


def _json(hit: Hit) -> dict[str, object]:
    return {
        "type": hit.kind,
        "score": hit.score,
        "snippet": _plain(hit),
        "conversation_id": hit.conversation_id,
        "conversation_title": hit.conversation_title,
        "message_id": hit.message_id,
        "role": hit.role,
        "created_at": hit.created_at,
    }
