"""Safe migrations on SQLite and PostgreSQL: what an operator relies on when upgrading.

Every test runs on a real database (``database_url``: a SQLite file under ``tmp_path`` and
a fresh PostgreSQL database), with the backup directory and its fallback under
``tmp_path``. Databases are seeded through reflection, one row set per table of whatever
schema the revision has, so new revisions are covered without editing this file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from parley.cli.db import db
from parley.errors import ConfigError
from parley.ops import migrate
from parley.ops.backup import list_backups, verify_backup
from parley.settings import Settings
from parley.store import engine as engine_module
from parley.store.engine import create_engine
from parley.store.schema import FULL_TEXT, FullText
from tests.harness import free_port, settings_for

HEAD = migrate.heads()[0]
# Every revision older than head, oldest first: each is a starting point to upgrade from.
OLDER = [revision for revision, _down, _doc in reversed(migrate.history()) if revision != HEAD]
ROWS = 3
T0 = datetime(2026, 1, 1, tzinfo=UTC)

FAILING_REVISION = '''"""Test-only revision {revision}: changes schema and data, fails ({how})."""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("extra_{revision}", sa.Column("id", sa.Integer(), primary_key=True))
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("extra", sa.Integer(), nullable=True))
    op.execute("DELETE FROM conversations")
    {end}
    raise RuntimeError("revision {revision} fails half way")


def downgrade() -> None:
    pass
'''

# How the injected revision misbehaves before it raises.
ENDINGS = {
    "raises": "pass",
    "runs-commit": 'op.execute("COMMIT")',
    "commits-connection": "op.get_bind().commit()",
    "autocommit-block": 'with op.get_context().autocommit_block(): op.execute("SELECT 1")',
}

SLOW_REVISION = '''"""Test-only revision {revision}: slow, and changes no schema."""

import time

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    time.sleep(1.5)


def downgrade() -> None:
    pass
'''


def backup_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
    }


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return settings_for(tmp_path, database_url, **backup_env(tmp_path))


def add_revision(location: Path, template: str, **values: str) -> str:
    revision = f"{int(HEAD[:4]) + 1:04d}"
    text = template.format(revision=revision, down=HEAD, **values)
    (location / "versions" / f"{revision}_test.py").write_text(text)
    return revision


# --- seeding and comparing, by reflection -------------------------------------------


def _tables(conn: sa.Connection) -> list[sa.Table]:
    """Every parley table but the full-text index's (FTS5 tables and their shadow tables:
    the database fills them from the rows)."""
    meta = sa.MetaData()
    meta.reflect(conn)
    full_text = FULL_TEXT.get(conn.dialect.name, FullText()).tables
    return [
        t
        for t in meta.sorted_tables
        if t.name != "alembic_version"
        and not any(t.name == fts or t.name.startswith(f"{fts}_") for fts in full_text)
    ]


def _value(table: sa.Table, column: sa.Column[Any], i: int) -> Any:
    for fk in column.foreign_keys:
        if fk.column.table is table and column.nullable:
            return None
        return _value(fk.column.table, fk.column, i)
    try:
        kind: type = column.type.python_type
    except NotImplementedError:
        kind = str
    name = uuid.uuid5(uuid.NAMESPACE_URL, f"{table.name}.{column.name}.{i}")
    if kind is bool:
        return i % 2 == 0
    if kind is int:
        return i
    if kind is float:
        return i + 0.5
    if kind is Decimal:
        return Decimal(i)
    if kind is datetime:
        return T0 + timedelta(minutes=i)
    if kind is date:
        return (T0 + timedelta(days=i)).date()
    if kind is uuid.UUID:
        return name
    if kind is bytes:
        return name.bytes
    if kind in (dict, list):
        return {"row": i}
    length = getattr(column.type, "length", None)
    return name.hex[:length] if length else f"{column.name} {i}: {name.hex}"


def seed(settings: Settings) -> None:
    """``ROWS`` rows in every table of the database's current schema."""
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            # The outbox last: its triggers (0005) queue rows for the messages and chunks
            # seeded before it, which go, so that it holds its own ``ROWS`` rows too.
            tables = sorted(_tables(conn), key=lambda t: t.name == "search_outbox")
            for table in tables:
                rows = [
                    # Generated columns (PostgreSQL's search vectors) are the database's, and
                    # so are the outbox's ids: its triggers insert rows from the sequence.
                    {
                        c.name: _value(table, c, i)
                        for c in table.columns
                        if c.computed is None and (table.name, c.name) != ("search_outbox", "id")
                    }
                    for i in range(1, ROWS + 1)
                ]
                if table.name == "search_outbox":
                    conn.execute(table.delete())
                conn.execute(table.insert(), rows)
    finally:
        engine.dispose()


def dump(settings: Settings, only: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Every table's rows (of the columns in ``only``, when given), in key order."""
    engine = create_engine(settings)
    out: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            for table in _tables(conn):
                if only is not None and table.name not in only:
                    continue
                names = only[table.name] if only is not None else [c.name for c in table.columns]
                order = [sa.column(c.name) for c in table.primary_key.columns]
                query = sa.select(*[sa.column(n) for n in names]).select_from(sa.table(table.name))
                out[table.name] = [tuple(r) for r in conn.execute(query.order_by(*order))]
    finally:
        engine.dispose()
    return out


def columns(settings: Settings) -> dict[str, list[str]]:
    """Each table's column names, to read the same columns back after a migration."""
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            return {t.name: [c.name for c in t.columns] for t in _tables(conn)}
    finally:
        engine.dispose()


def schema(settings: Settings) -> Any:
    """Tables, columns, indexes, keys and constraints, as the database reports them."""
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            found: dict[str, Any] = {}
            for name in sorted(inspector.get_table_names()):
                found[name] = (
                    [
                        (c["name"], str(c["type"]), c["nullable"])
                        for c in inspector.get_columns(name)
                    ],
                    sorted(str(sorted(_index(i).items())) for i in inspector.get_indexes(name)),
                    inspector.get_pk_constraint(name),
                    sorted(str(sorted(f.items())) for f in inspector.get_foreign_keys(name)),
                    sorted(str(sorted(u.items())) for u in inspector.get_unique_constraints(name)),
                )
            if conn.dialect.name == "sqlite":
                found["sqlite_master"] = conn.exec_driver_sql(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"
                ).all()
            return found
    finally:
        engine.dispose()


def _index(index: Any) -> dict[str, Any]:
    """A reflected index as plain values: SQLite reflects a partial index's WHERE as a
    SQL expression object (compared by identity), here its text."""
    options = {key: str(value) for key, value in index.get("dialect_options", {}).items()}
    return {**index, "dialect_options": options}


def only_backup(settings: Settings, revision: str | None) -> Path:
    """The one archive in the backup directory: it verifies and holds ``revision``."""
    found = list_backups(settings)
    assert len(found) == 1, found
    assert found[0].path.parent == settings.backup.dir
    manifest = verify_backup(found[0].path, settings)
    assert manifest["schema_revision"] == revision
    return found[0].path


# --- the tests -----------------------------------------------------------------------


def test_blank_to_head_equals_the_models_without_a_backup(settings: Settings) -> None:
    report = migrate.upgrade(settings)
    assert (report.before, report.after, report.backup) == (None, HEAD, None)
    assert migrate.check(settings) == []
    assert list_backups(settings) == []  # nothing in it yet: nothing to back up


@pytest.mark.parametrize("start", OLDER)
def test_every_older_revision_upgrades_at_start_with_its_rows_intact(
    settings: Settings, start: str
) -> None:
    migrate.upgrade(settings, start)
    seed(settings)
    before, shape = dump(settings), columns(settings)
    assert all(len(rows) == ROWS for rows in before.values()) and before

    assert migrate.prepare_on_start(settings) == HEAD

    assert migrate.current(settings) == HEAD
    assert migrate.check(settings) == []
    assert dump(settings, only=shape) == before
    only_backup(settings, start)


def test_db_upgrade_reports_the_backup_it_took(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate.upgrade(settings, OLDER[-1])
    seed(settings)
    monkeypatch.chdir(tmp_path)
    env = {"DATABASE_URL": settings.database_url, "PARLEY_DATA_DIR": str(settings.data_dir)}
    result = CliRunner().invoke(db, ["upgrade"], env={**env, **backup_env(tmp_path)})
    assert result.exit_code == 0, result.output
    archive = only_backup(settings, OLDER[-1])
    assert result.output == f"backup taken before migrating: {archive}\ndatabase at {HEAD}\n"


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_revision_failing_half_way_changes_nothing_and_start_refuses(
    settings: Settings, migrations: Path, ending: str
) -> None:
    migrate.upgrade(settings)
    seed(settings)
    before_schema, before_rows = schema(settings), dump(settings)
    revision = add_revision(migrations, FAILING_REVISION, how=ending, end=ENDINGS[ending])

    with pytest.raises(ConfigError) as refused:
        migrate.prepare_on_start(settings)

    assert migrate.current(settings) == HEAD
    assert schema(settings) == before_schema
    assert dump(settings) == before_rows
    archive = only_backup(settings, HEAD)
    message = refused.value.message
    assert message.startswith(f"upgrade from {HEAD} to {revision} failed: ")
    if ending == "raises":
        assert f"RuntimeError: revision {revision} fails half way" in message
    else:
        assert "revisions must not end the migration transaction" in message, message
    assert message.endswith(
        f"It was rolled back: the database is unchanged, still at {HEAD}; "
        f"the backup taken before migrating is {archive}"
    )
    # A second start refuses the same way, after a second backup.
    with pytest.raises(ConfigError, match="It was rolled back"):
        migrate.prepare_on_start(settings)
    assert dump(settings) == before_rows


def test_a_revision_failing_half_way_stops_a_real_server(tmp_path: Path, migrations: Path) -> None:
    env = {"PARLEY_DATA_DIR": str(tmp_path / "data"), **backup_env(tmp_path)}
    settings = settings_for(tmp_path, f"sqlite:///{tmp_path / 'data' / 'parley.db'}", **env)
    migrate.upgrade(settings)
    seed(settings)
    rows = dump(settings)
    revision = add_revision(migrations, FAILING_REVISION, how="raises", end="pass")
    script = textwrap.dedent(
        """
        import sys
        from parley.ops import revisions
        revisions.script_location = lambda: sys.argv[1]
        from parley.cli.main import cli
        cli(["serve", "--port", sys.argv[2]])
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script, str(migrations), str(free_port())],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert process.returncode == 1
    stderr = process.stderr.decode()
    assert "Traceback" not in stderr
    archive = only_backup(settings, HEAD)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"parley: upgrade from {HEAD} to {revision} failed: RuntimeError")
    assert last.endswith(f"the backup taken before migrating is {archive}")
    assert migrate.current(settings) == HEAD
    assert dump(settings) == rows


def unwritable(tmp_path: Path) -> dict[str, str]:
    """Backup locations that cannot be created (under a regular file; root ignores modes)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return {
        "PARLEY_BACKUP_DIR": str(blocker / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(blocker / "fallback"),
    }


def test_production_refuses_to_migrate_without_a_backup(tmp_path: Path, database_url: str) -> None:
    settings = settings_for(tmp_path, database_url, **unwritable(tmp_path))
    assert settings.environment == "production"
    migrate.upgrade(settings, OLDER[-1])
    seed(settings)
    rows = dump(settings)
    with pytest.raises(ConfigError) as refused:
        migrate.prepare_on_start(settings)
    message = refused.value.message
    assert message.startswith(
        f"refusing to migrate the database (at {OLDER[-1]}) without a verified backup: "
    )
    assert "PARLEY_ENV=development" in message and str(settings.backup.fallback_dir) in message
    assert migrate.current(settings) == OLDER[-1]
    assert dump(settings) == rows


def test_development_migrates_without_a_backup_and_says_so(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = {**unwritable(tmp_path), "PARLEY_ENV": "development"}
    settings = settings_for(tmp_path, database_url, **env)
    migrate.upgrade(settings, OLDER[-1])
    seed(settings)
    rows, shape = dump(settings), columns(settings)
    with caplog.at_level(logging.WARNING, logger="parley.ops.migrate"):
        report = migrate.upgrade(settings)
    assert (report.before, report.after, report.backup) == (OLDER[-1], HEAD, None)
    assert any("migrating without a backup" in r.getMessage() for r in caplog.records)
    assert dump(settings, only=shape) == rows


def test_the_fallback_location_takes_the_backup_when_the_primary_cannot(
    tmp_path: Path, database_url: str
) -> None:
    env = {**unwritable(tmp_path), "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback")}
    settings = settings_for(tmp_path, database_url, **env)
    migrate.upgrade(settings, OLDER[-1])
    seed(settings)
    report = migrate.upgrade(settings)
    assert report.backup is not None and report.backup.parent == tmp_path / "fallback"
    assert verify_backup(report.backup, settings)["schema_revision"] == OLDER[-1]
    assert migrate.current(settings) == HEAD


STARTER = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    from parley.ops import migrate, revisions
    from parley.settings import load_settings

    location, go, env, cwd = sys.argv[1:5]
    revisions.script_location = lambda: location
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    settings = load_settings(env=json.loads(env), cwd=Path(cwd))
    while not Path(go).exists():
        time.sleep(0.005)
    started = time.time()
    revision = migrate.prepare_on_start(settings)
    print(json.dumps([revision, started, time.time()]))
    """
)


@pytest.mark.slow
def test_two_processes_starting_at_once_migrate_once(
    settings: Settings, tmp_path: Path, migrations: Path
) -> None:
    migrate.upgrade(settings, OLDER[0])
    seed(settings)
    rows, shape = dump(settings), columns(settings)
    revision = add_revision(migrations, SLOW_REVISION)
    go = tmp_path / "go"
    env = {
        "DATABASE_URL": settings.database_url,
        "PARLEY_DATA_DIR": str(settings.data_dir),
        **backup_env(tmp_path),
    }
    args = [str(migrations), str(go), json.dumps(env), str(tmp_path)]
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    go.touch()
    outputs = [process.communicate(timeout=120) for process in starters]
    spans = []
    for process, (out, err) in zip(starters, outputs, strict=True):
        assert process.returncode == 0, err.decode()
        reached, started, ended = json.loads(out)
        assert reached == revision
        spans.append((started, ended))
    # They really ran at the same time: each started before the other finished.
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    logs = "".join(err.decode() for _out, err in outputs)
    assert logs.count(f"migrating the database from {OLDER[0]} to {revision}") == 1
    only_backup(settings, OLDER[0])
    assert migrate.current(settings) == revision
    assert dump(settings, only=shape) == rows


def test_db_check_reports_drift_and_exits_1(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate.upgrade(settings)
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE conversations ADD COLUMN stray INTEGER")
    finally:
        engine.dispose()
    monkeypatch.chdir(tmp_path)
    env = {"DATABASE_URL": settings.database_url, "PARLEY_DATA_DIR": str(settings.data_dir)}
    result = CliRunner().invoke(db, ["check"], env=env)
    assert result.exit_code == 1
    assert result.output == (
        "column conversations.stray is in the database but not in the models\n"
    )
    with pytest.raises(ConfigError, match=r"conversations\.stray is in the database"):
        migrate.prepare_on_start(settings)


def hold_write_lock(database: Path, seconds: float) -> threading.Thread:
    """Another connection holding SQLite's write lock for ``seconds``, as a migrating
    process (or a long write) does."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(database, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10)
    return thread


@pytest.fixture
def sqlite_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # Each BEGIN IMMEDIATE gives up after the busy timeout: make that short, so that the
    # wait beyond it (ops.migrate retrying) is what these tests exercise.
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_MS", 100)
    url = f"sqlite:///{tmp_path / 'data' / 'parley.db'}"
    return settings_for(tmp_path, url, **backup_env(tmp_path))


def test_start_waits_beyond_the_busy_timeout_for_another_migration(
    sqlite_settings: Settings,
) -> None:
    settings = sqlite_settings
    migrate.upgrade(settings, OLDER[-1])
    holder = hold_write_lock(Path(settings.data_dir) / "parley.db", 1.0)
    started = time.monotonic()
    try:
        assert migrate.prepare_on_start(settings) == HEAD
    finally:
        holder.join()
    assert time.monotonic() - started >= 0.9
    only_backup(settings, OLDER[-1])


def test_start_gives_up_waiting_for_the_lock_with_a_clear_message(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sqlite_settings
    migrate.upgrade(settings, OLDER[-1])
    monkeypatch.setattr(migrate, "LOCK_WAIT_SECONDS", 0.3)
    holder = hold_write_lock(Path(settings.data_dir) / "parley.db", 1.5)
    try:
        with pytest.raises(ConfigError, match=r"held the database's write lock for over 0\.3 s"):
            migrate.prepare_on_start(settings)
    finally:
        holder.join()
    assert migrate.current(settings) == OLDER[-1]


def test_start_gives_up_waiting_for_postgresqls_migration_lock_with_a_clear_message(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path, postgres_url, **backup_env(tmp_path))
    migrate.upgrade(settings, OLDER[-1])
    monkeypatch.setattr(migrate, "LOCK_WAIT_SECONDS", 0.3)
    holder = sa.create_engine(postgres_url, poolclass=sa.NullPool)
    try:
        # Another process migrating holds the lock until its transaction ends.
        with holder.connect() as conn, conn.begin():
            conn.exec_driver_sql(
                f"SELECT pg_advisory_xact_lock({engine_module._PG_MIGRATION_LOCK})"
            )
            started = time.monotonic()
            with pytest.raises(ConfigError, match=r"database's migration lock for over 0\.3 s"):
                migrate.prepare_on_start(settings)
            assert time.monotonic() - started < 5
    finally:
        holder.dispose()
    assert migrate.current(settings) == OLDER[-1]
