"""What every ``parley`` command shares: one-line errors and the database at head.

A ``ParleyError`` becomes one line on stderr and exit status 1, never a traceback.
``engine_at_head`` reads settings the way the server does and opens the database only if
it is at the schema head and matches the models, then disposes of the engine. It never
migrates: only server start and ``parley db upgrade`` do, so a command run beside a
server (or by mistake on an old database) changes no schema and takes no backup. An
empty database, one behind head, a newer, drifted or foreign one is refused with one line
saying what to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import click
import sqlalchemy

from parley.errors import ParleyError
from parley.ops.migrate import require_head
from parley.settings import load_settings
from parley.store.engine import create_engine

T = TypeVar("T")


def run(action: Callable[[], T]) -> T:
    try:
        return action()
    except ParleyError as exc:
        fail(exc.message)


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
