"""Alembic environment for parley's migrations; run through ``parley.ops.migrate`` only.

Invariants: a whole upgrade or downgrade is one transaction (DDL included: SQLite gets
SQLAlchemy's BEGIN, see ``store.engine``, and ``transactional_ddl`` is forced on), so a
failed migration leaves the schema as it was. Revisions must not end that transaction
(no COMMIT, no ``autocommit_block``): ``ops.migrate`` refuses it, because a revision
that committed half its work would leave a half-migrated database. The connection comes from
``config.attributes["connection"]`` when the caller holds one (``ops.migrate`` does, and
validates the result before committing); otherwise an engine is built from
``config.attributes["settings"]``. SQLite runs ALTERs as batch (copy-and-move)
operations. Offline (``--sql``) mode is not supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alembic import context
from sqlalchemy import Connection

from parley.errors import ConfigError
from parley.store.engine import create_engine, migration_transaction
from parley.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        transactional_ddl=True,
    )
    # Alembic's autocommit_block commits the work done so far; refuse it in words (on
    # this run's context only) rather than with Alembic's bare AssertionError.
    context.get_context().autocommit_block = _no_autocommit  # type: ignore[method-assign]
    with context.begin_transaction():
        context.run_migrations()


@contextmanager
def _no_autocommit() -> Iterator[None]:
    raise ConfigError(
        "a migration used autocommit_block: revisions must not end the migration transaction"
    )
    yield  # a generator, so that this is a context manager like the method it replaces


def _main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("parley migrations run against a database, not as --sql")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    settings = context.config.attributes.get("settings")
    if settings is None:
        raise RuntimeError("run migrations through parley.ops.migrate (`parley db ...`)")
    engine = create_engine(settings)
    try:
        with migration_transaction(engine) as connection:
            _run(connection)
    finally:
        engine.dispose()


_main()
