"""``parley export`` and ``parley import``: a thin client of ``parley.chat.history``.

Both read settings the way the server does (``DATABASE_URL``, the config file) and act on
the database the server would use; the database must be at the schema head (``parley db
upgrade``), never migrated here (``cli.common.engine_at_head``). The CLI is the operator:
``--user`` picks whose history, and without it the history with no owner (local mode's)
is meant. An export written to a file is private: the file has mode 0600 before any of it
is written, whether or not it existed. Errors, a file that cannot be read or written
included, are one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import uuid
import zipfile
from pathlib import Path

import click

from parley.chat import history
from parley.cli.common import engine_at_head, fail
from parley.cli.common import run as _run
from parley.errors import InvalidRequest, NotFound
from parley.paths import reason


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
    type=click.Path(path_type=Path),
    help="Write here instead of standard output, with mode 0600 (an existing file is made "
    "0600 before anything is written to it).",
)
def export_command(user: str | None, conversation: str | None, fmt: str, out: Path | None) -> None:
    """Export conversations with their messages.

    Without --user or --conversation: the history that has no owner (local mode's).
    """
    with engine_at_head() as engine:
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
        _write_private(out, body)
        click.echo(f"exported {len(ids)} conversation(s) to {out}", err=True)


def _write_private(out: Path, body: bytes) -> None:
    """Write ``body`` to ``out`` with mode 0600, whether the file is new or not.

    The history is private: never readable by other local users, even briefly. Opening an
    existing file keeps its mode, so the mode is set first, and only then is the file
    emptied and written; when the mode cannot be set, the file is left as it was. A device
    or pipe (``/dev/stdout``) is written to as it is, its mode untouched.
    """
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        fail(f"cannot write {out}: {reason(exc, out)}")
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                fail(f"cannot make {out} private (mode 0600), left unchanged: {reason(exc, out)}")
        try:
            if regular:
                os.ftruncate(fd, 0)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            fail(f"cannot write {out}: {reason(exc, out)}")
    finally:
        os.close(fd)


def _read(file: Path) -> bytes:
    if str(file) == "-":
        return sys.stdin.buffer.read()
    try:
        return file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {reason(exc, file)}")


@click.command("import")
@click.argument("file", type=click.Path(allow_dash=True, path_type=Path))
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
    raw = _run(lambda: _unzip(_read(file)))
    with engine_at_head() as engine:
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
