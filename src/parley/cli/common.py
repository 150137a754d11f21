"""What every ``parley`` command shares: one-line errors and the prepared database.

A ``ParleyError`` becomes one line on stderr and exit status 1, never a traceback.
``prepared_engine`` reads settings the way the server does and prepares the database the
way server start does (an empty one is migrated), then disposes of the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import click
import sqlalchemy

from parley.errors import ParleyError
from parley.ops.migrate import prepare_on_start
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
def prepared_engine() -> Iterator[sqlalchemy.Engine]:
    settings = run(load_settings)
    run(lambda: prepare_on_start(settings))
    engine = run(lambda: create_engine(settings))
    try:
        yield engine
    finally:
        engine.dispose()
