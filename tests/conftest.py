"""Shared fixtures: real databases (a SQLite file, a fresh PostgreSQL database) and settings.

``database_url`` runs a test once per backend, with ids ``sqlite`` and ``postgresql`` (so
``-k sqlite`` selects one). PostgreSQL is the server on 127.0.0.1:5432 (user postgres,
trust auth); each test gets its own database, dropped afterwards. An unreachable server
fails the test, because a skipped backend looks like a passing one; set
``PARLEY_TEST_SKIP_PG=1`` to skip instead.

``make_settings(tmp_path, database_url, **overrides)`` builds ``Settings`` from an explicit
environment rooted in ``tmp_path``: tests never read the real environment, config file or
data directory.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from parley.ops.migrate import upgrade
from parley.settings import Settings, load_settings
from parley.store.engine import create_engine

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

MakeSettings = Callable[..., Settings]


def _make_settings(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    # No embedder unless a test asks for one (loading the model costs seconds per server).
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "PARLEY_SEARCH_EMBEDDER": "none"}
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    return load_settings(env=env, cwd=tmp_path, **overrides)


@pytest.fixture
def make_settings() -> MakeSettings:
    """``make_settings(tmp_path, database_url=None, **overrides) -> Settings``."""
    return _make_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
        return
    yield from _postgres_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to an empty PostgreSQL database, for what only PostgreSQL has."""
    yield from _postgres_database()


def _postgres_database() -> Iterator[str]:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"parley_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {exc.orig or exc}"
        if os.environ.get("PARLEY_TEST_SKIP_PG") == "1":
            pytest.skip(message)
        pytest.fail(message + " (set PARLEY_TEST_SKIP_PG=1 to skip PostgreSQL tests)")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin: sa.Engine, name: str) -> None:
    """Drop a test database. DROP DATABASE asks for a checkpoint, which fails while the
    disk-full test (on the other xdist worker) holds its tablespace full: wait that out."""
    for attempt in range(60):
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except sa.exc.DBAPIError as exc:
            if "checkpoint request failed" not in str(exc) or attempt == 59:
                raise
            time.sleep(0.5)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings on ``database_url`` with a data directory under ``tmp_path``."""
    return _make_settings(tmp_path, database_url)


@pytest.fixture
def migrated_engine(settings: Settings) -> Iterator[sa.Engine]:
    """An engine on ``database_url``, upgraded to head."""
    upgrade(settings)
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        engine.dispose()
