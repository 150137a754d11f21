"""What every ``parley`` command shares: one-line errors and the database at head.

An error of the environment is one line on stderr and exit status 1, never a traceback:
parley's own refusals (``ParleyError``), a path the system refuses (``OSError``: a data
directory that is a file, or may not be written), and a database that cannot be reached,
opened or read (SQLAlchemy's ``OperationalError``, ``InterfaceError`` and plain
``DatabaseError``, SQLite's likewise), said in the driver's words, which name host and
user but never a password. ``Commands``, the root group, turns them into that line for
every command; ``run`` does for one action, so that a command invoked on its own (as tests
do) says the same. Anything else is a bug in parley and keeps its traceback. A path the
system refuses is named with its reason (``paths.reason``: "Permission denied", or the file
in the way of a directory). The error is the last line on stderr; the log's warnings, each
a ``warning: ...`` line of its own before it, say only what the error does not.

``engine_at_head`` reads settings the way the server does and opens the database only if
it is at the schema head and matches the models, then disposes of the engine. It never
migrates: only server start and ``parley db upgrade`` do, so a command run beside a
server (or by mistake on an old database) changes no schema and takes no backup. An
empty database, one behind head, a newer, drifted or foreign one is refused with one line
saying what to run.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import click
import sqlalchemy
from sqlalchemy.exc import DatabaseError, InterfaceError, OperationalError

from parley.errors import DataWouldBeLost, ParleyError
from parley.ops.migrate import require_head
from parley.paths import reason
from parley.settings import load_settings
from parley.store.engine import create_engine, driver_message

T = TypeVar("T")

# Database errors of the environment: unreachable, locked, full, not a database or damaged
# (the bases themselves). Their other subclasses (ProgrammingError, IntegrityError...)
# are parley's own mistakes and keep their traceback.
_DATABASE_ERRORS = (OperationalError, InterfaceError, sqlite3.OperationalError)
_DATABASE_ERROR_BASES = (DatabaseError, sqlite3.DatabaseError)


def problem(exc: Exception) -> str | None:
    """The one line for an error of the environment (see the module docstring); None for
    anything else, whose traceback must show."""
    if isinstance(exc, DataWouldBeLost):
        return exc.message  # its first line, then one line per table or column lost
    if isinstance(exc, ParleyError):
        return " ".join(line.strip() for line in exc.message.splitlines())
    if isinstance(exc, OSError) and exc.errno != errno.EPIPE:  # click's, for `| head`
        why = reason(exc)
        return f"cannot use {os.fsdecode(exc.filename)}: {why}" if exc.filename else why
    if isinstance(exc, _DATABASE_ERRORS) or type(exc) in _DATABASE_ERROR_BASES:
        return f"database error: {driver_message(exc)}"
    return None


class Commands(click.Group):
    """The root ``parley`` group: every command's environment errors are one line, and
    its log's warnings are lines of their own ("warning: ..."), on stderr as it is when
    they happen. ``serve`` logs as the server does instead."""

    def invoke(self, ctx: click.Context) -> Any:
        warnings = _Warnings()
        ctx.meta[_WARNINGS] = warnings
        try:
            return run(lambda: click.Group.invoke(self, ctx))
        finally:
            logging.getLogger().removeHandler(warnings)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        warnings = ctx.meta.get(_WARNINGS)
        if warnings is not None and name != "serve":
            logging.getLogger().addHandler(warnings)
        return name, command, rest


_WARNINGS = "parley.cli.warnings"


class _Warnings(logging.Handler):
    """A command's warnings and errors from the log, one line each on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)
        except Exception:  # a logging handler never raises into the code that logs
            self.handleError(record)


def run(action: Callable[[], T]) -> T:
    """``action()``, its environment errors one line (for commands invoked on their own)."""
    try:
        return action()
    except Exception as exc:
        message = problem(exc)
        if message is None:
            raise
        fail(message)


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(1)


@contextmanager
def engine_at_head() -> Iterator[sqlalchemy.Engine]:
    settings = run(load_settings)
    run(lambda: require_head(settings))
    engine = run(lambda: create_engine(settings))
    try:
        yield engine
    finally:
        engine.dispose()
