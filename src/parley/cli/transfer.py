"""``parley export`` and ``parley import``: a thin client of ``parley.chat.history``.

Both read settings the way the server does (``DATABASE_URL``, the config file) and act on
the database the server would use; the database must be at the schema head (``parley db
upgrade``). The CLI is the operator: ``--user`` picks whose history, and without it the
history with no owner (local mode's) is meant. Errors are one line on stderr and exit
status 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import click
import sqlalchemy

from parley.chat import history
from parley.cli.common import run as _run
from parley.errors import ConfigError, InvalidRequest, NotFound
from parley.ops import migrate
from parley.settings import Settings, load_settings
from parley.store.engine import create_engine


@contextlib.contextmanager
def _engine() -> Iterator[sqlalchemy.Engine]:
    settings = _run(load_settings)
    _run(lambda: _check_head(settings))
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        engine.dispose()


def _check_head(settings: Settings) -> None:
    revision = migrate.current(settings)
    if revision not in migrate.heads():
        raise ConfigError(
            f"the database is at {revision or 'no schema revision'}, not at the schema head: "
            "run `parley db upgrade` first"
        )


@click.command("export")
@click.option(
    "--user", "user", metavar="USER", help="Username or email: export that user's history."
)
@click.option(
    "--conversation",
    "conversation",
    metavar="ID",
    help="Export only this conversation (its id, as the API shows it).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(history.EXPORT_FORMATS),
    default="json",
    show_default=True,
    help="json: parley's format, every branch; jsonl: one OpenAI-messages line per "
    "conversation, along its active branch.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write here (created with mode 0600) instead of standard output.",
)
def export_command(user: str | None, conversation: str | None, fmt: str, out: Path | None) -> None:
    """Export conversations with their messages.

    Without --user or --conversation: the history that has no owner (local mode's).
    """
    with _engine() as engine:
        owner = _run(lambda: history.user_id_by_name(engine, user)) if user else None
        if conversation is not None:
            public_id = _run(lambda: _uuid(conversation))
            may_see = (lambda o: o == owner) if user else (lambda _o: True)
            ids = [_run(lambda: history.conversation_id(engine, public_id, may_see))]
        else:
            ids = _run(lambda: history.user_conversations(engine, owner))
        body = _run(lambda: history.export(engine, ids, fmt))
    if out is None:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    else:
        # The history is private: never readable by other local users, even briefly.
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
        click.echo(f"exported {len(ids)} conversation(s) to {out}", err=True)


@click.command("import")
@click.argument(
    "file", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
)
@click.option("--user", "user", metavar="USER", help="Username or email: import for that user.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(history.IMPORT_FORMATS),
    default=None,
    help="parley (an export of parley's) or chatgpt (conversations.json, or the export's "
    ".zip); detected when not given.",
)
def import_command(file: Path, user: str | None, fmt: str | None) -> None:
    """Import conversations from FILE ("-": standard input), in one transaction."""
    raw = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    raw = _run(lambda: _unzip(raw))
    with _engine() as engine:
        owner = _run(lambda: history.user_id_by_name(engine, user)) if user else None
        ids = _run(lambda: history.import_document(engine, raw, fmt, owner))
    for public_id in ids:
        click.echo(str(public_id))
    click.echo(f"imported {len(ids)} conversation(s)", err=True)


def _unzip(raw: bytes) -> bytes:
    """``conversations.json`` out of a ChatGPT data export's zip; other bytes unchanged."""
    if not raw.startswith(b"PK\x03\x04"):
        return raw
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "conversations.json"]
            if not names:
                raise InvalidRequest("the zip file holds no conversations.json")
            return archive.read(min(names, key=len))
    except zipfile.BadZipFile as exc:
        raise InvalidRequest(f"the zip file cannot be read: {exc}") from None


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such conversation: {value}") from None
