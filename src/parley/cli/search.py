"""``parley search``: keyword search of the history from the shell; a thin client of
``store.search``.

The command is the operator's: without ``--user`` it searches every user's history, with
it one user's (by username or email). It reads settings and prepares the database the
way server start does; errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import uuid

import click
import orjson

from parley.cli.common import fail, prepared_engine, run
from parley.store.search import MARK_END, MARK_START, MAX_LIMIT, Hit, Scope, Search
from parley.store.users import Users


@click.command("search")
@click.argument("query")
@click.option("--user", help="Search this user's history only (username or email).")
@click.option("--conversation", help="Search this conversation only (its id).")
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, MAX_LIMIT), help="Results."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search(
    query: str, user: str | None, conversation: str | None, limit: int, as_json: bool
) -> None:
    """Find messages and conversation titles holding every word of QUERY (the same
    search as GET /api/search?mode=keyword), best first."""
    conversation_id: uuid.UUID | None = None
    if conversation is not None:
        try:
            conversation_id = uuid.UUID(conversation)
        except ValueError:
            fail(f"--conversation {conversation!r} is not a conversation id")
    with prepared_engine() as engine:
        scope = Scope(None, everyone=True)
        if user is not None:
            found = run(lambda: Users(engine).find_user(user))
            if found is None:
                fail(f"no user {user!r}")
                return
            scope = Scope(found.id)
        hits = run(
            lambda: Search(engine).keyword(query, scope, conversation=conversation_id, limit=limit)
        )
    if as_json:
        click.echo(orjson.dumps([_json(hit) for hit in hits], option=orjson.OPT_INDENT_2))
        return
    if not hits:
        click.echo("no results")
    for hit in hits:
        where = f"{hit.conversation_title or '(untitled)'}  {hit.conversation_id}"
        what = "title" if hit.message_id is None else f"{hit.role} {hit.message_id}"
        click.echo(f"{hit.created_at:%Y-%m-%d %H:%M}  {where}  {what}  score {hit.score:.3f}")
        click.echo("    " + _plain(hit))


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
