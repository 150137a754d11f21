"""Migrations and the engine, on SQLite and PostgreSQL: what an operator relies on at start."""

from __future__ import annotations

import shutil
import stat
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from parley.errors import ConfigError
from parley.ops import migrate, revisions
from parley.ops.backup import list_backups
from parley.settings import Settings
from parley.store.engine import create_engine, writer_connection
from parley.store.history_rows import insert_conversations
from tests.harness import settings_for

MakeSettings = Callable[..., Settings]

HEAD = migrate.heads()[0]

EXTRA_REVISION = '''"""Test-only revision {revision}: adds a table{failing}."""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("extra_{revision}", sa.Column("id", sa.Integer(), primary_key=True))
    if {fail}:
        raise RuntimeError("migration {revision} fails half way")


def downgrade() -> None:
    op.drop_table("extra_{revision}")
'''


RECREATE_REVISION = '''"""Test-only revision 0900: rebuilds conversations (copy, drop, rename)."""

from alembic import op

revision = "0900"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations", recreate="always"):
        pass
    # Dropping the old table dropped its full-text triggers (0004; since 0006 there is
    # none on insert): a rebuild makes them again, or the schema check refuses the upgrade.
    for sql in (
        "CREATE TRIGGER conversations_fts_delete AFTER DELETE ON conversations BEGIN "
        "INSERT INTO conversations_fts(conversations_fts, rowid, title) "
        "VALUES ('delete', old.id, old.title); END",
        "CREATE TRIGGER conversations_fts_update AFTER UPDATE OF title ON conversations BEGIN "
        "INSERT INTO conversations_fts(conversations_fts, rowid, title) "
        "VALUES ('delete', old.id, old.title); "
        "INSERT INTO conversations_fts(rowid, title) VALUES (new.id, new.title); END",
    ):
        op.execute(sql)


def downgrade() -> None:
    pass
'''


def tables(settings: Settings) -> set[str]:
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def execute(settings: Settings, sql: str) -> None:
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    finally:
        engine.dispose()


def backup_env(tmp_path: Path) -> dict[str, str]:
    # Upgrades and downgrades of a database holding a schema back it up first: keep the
    # archives (and the fallback location) inside the test's directory.
    return {
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
    }


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return settings_for(tmp_path, database_url, **backup_env(tmp_path))


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return settings_for(
        tmp_path, f"sqlite:///{tmp_path / 'data' / 'parley.db'}", **backup_env(tmp_path)
    )


@pytest.fixture
def extra_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped migrations; tests add revisions after the head to it."""
    location = tmp_path / "migrations"
    shutil.copytree(
        migrate.script_location(), location, ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setattr(revisions, "script_location", lambda: str(location))
    return location


def add_revision(location: Path, revision: str, *, fail: bool = False) -> None:
    text = EXTRA_REVISION.format(
        revision=revision, down=HEAD, fail=fail, failing=" and fails" if fail else ""
    )
    (location / "versions" / f"{revision}_extra.py").write_text(text)


def test_upgrade_downgrade_upgrade_round_trip(settings: Settings) -> None:
    assert migrate.current(settings) is None
    migrate.upgrade(settings)
    assert migrate.current(settings) == HEAD
    assert migrate.check(settings) == []
    assert {"request_log", "conversations", "messages", "responses"} <= tables(settings)

    migrate.downgrade(settings, "base")
    assert migrate.current(settings) is None
    assert tables(settings) <= {"alembic_version"}

    migrate.upgrade(settings)
    assert migrate.current(settings) == HEAD
    assert migrate.check(settings) == []


def test_heads_and_history_name_every_revision() -> None:
    assert migrate.heads() == [HEAD]
    history = migrate.history()
    assert [(revision, down) for revision, down, _doc in history] == [
        ("0012", "0011"),
        ("0011", "0010"),
        ("0010", "0009"),
        ("0009", "0008"),
        ("0008", "0007"),
        ("0007", "0006"),
        ("0006", "0005"),
        ("0005", "0004"),
        ("0004", "0003"),
        ("0003", "0002"),
        ("0002", "0001"),
        ("0001", None),
    ]
    docs = {revision: doc for revision, _down, doc in history}
    assert docs["0001"].startswith("Initial schema")
    assert docs["0002"].startswith("Users, API keys")
    assert docs["0003"].startswith("Rollups of the request log")
    assert docs["0004"].startswith("Full-text search")
    assert docs["0005"].startswith("The search outbox")
    assert docs["0006"].startswith("SQLite: new messages and conversations")
    assert docs["0007"].startswith("The request log says when its tokens are")
    assert docs["0008"].startswith("The request log says when each attempt finished")
    assert docs["0009"].startswith("Anomaly episodes logged, shared by every process")
    assert docs["0010"].startswith("The chain-key index holds only messages a request can")
    assert docs["0011"].startswith("An answer keeps the notice it was given with")
    assert docs["0012"].startswith("A generated title knows the message it was made from")


def test_check_names_a_missing_outbox_trigger(settings: Settings) -> None:
    migrate.upgrade(settings)
    if settings.is_sqlite:
        execute(settings, "DROP TRIGGER search_outbox_message_delete")
        name = "search_outbox_message_delete"
    else:
        execute(settings, "DROP TRIGGER search_outbox_message ON messages")
        name = "search_outbox_message"
    assert migrate.check(settings) == [f"search outbox trigger {name} is missing from the database"]


def test_check_names_a_missing_index(settings: Settings) -> None:
    migrate.upgrade(settings)
    execute(settings, "DROP INDEX ix_messages_chain_key")
    drift = migrate.check(settings)
    assert drift == ["index ix_messages_chain_key on messages is missing from the database"]


def test_check_names_a_missing_full_text_object(settings: Settings) -> None:
    migrate.upgrade(settings)
    if settings.is_sqlite:
        execute(settings, "DROP TRIGGER messages_fts_delete")
        wanted = "full-text trigger messages_fts_delete is missing from the database"
    else:
        execute(settings, "DROP INDEX ix_messages_search")
        wanted = "full-text index ix_messages_search is missing from the database"
    assert migrate.check(settings) == [wanted]


def test_sqlite_insert_triggers_go_at_0006_and_come_back_on_downgrade(
    sqlite_settings: Settings,
) -> None:
    settings = sqlite_settings
    inserts = {"messages_fts_insert", "conversations_fts_insert", "search_outbox_message_insert"}

    def triggers() -> set[str]:
        engine = create_engine(settings)
        try:
            with engine.connect() as conn:
                sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                return set(conn.exec_driver_sql(sql).scalars())
        finally:
            engine.dispose()

    migrate.upgrade(settings)
    assert not inserts & triggers()
    migrate.downgrade(settings, "0005")
    assert inserts <= triggers()
    migrate.upgrade(settings)
    assert not inserts & triggers()
    assert migrate.check(settings) == []


def test_sqlite_rows_without_search_entries_can_be_deleted_after_a_downgrade_to_0005(
    sqlite_settings: Settings,
) -> None:
    """Since 0006 an untitled conversation (most gateway ones) has no full-text entry;
    0005's unguarded delete trigger then made its delete fail as a corrupt database."""
    settings = sqlite_settings
    migrate.upgrade(settings)
    engine = create_engine(settings)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            insert_conversations(
                conn,
                [
                    {"id": i, "public_id": uuid.uuid4(), "created_at": now, "updated_at": now,
                     "title": title, "source": "gateway", "default_model": "up/m",
                     "archived": False, "pinned": False, "is_active": True}
                    for i, title in ((1, None), (2, "named"))
                ],
            )  # fmt: skip
    finally:
        engine.dispose()
    migrate.downgrade(settings, "0005")
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM conversations")
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        engine.dispose()


def test_downgrade_from_full_text_search_removes_its_objects(settings: Settings) -> None:
    migrate.upgrade(settings)
    migrate.downgrade(settings, "0003")
    assert not {name for name in tables(settings) if "_fts" in name}
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            for table in ("messages", "conversations"):
                columns = {c["name"] for c in inspector.get_columns(table)}
                assert "search_vector" not in columns
                assert "ix_messages_search" not in {i["name"] for i in inspector.get_indexes(table)}
    finally:
        engine.dispose()
    migrate.upgrade(settings)
    assert migrate.check(settings) == []


def test_prepare_on_start_creates_an_empty_database(settings: Settings) -> None:
    assert migrate.prepare_on_start(settings) == HEAD
    assert migrate.current(settings) == HEAD
    # A second start finds it at head and leaves it alone.
    assert migrate.prepare_on_start(settings) == HEAD


def test_prepare_on_start_migrates_a_database_behind_head_after_a_backup(
    settings: Settings,
) -> None:
    migrate.upgrade(settings, "0001")
    assert list_backups(settings) == []
    assert migrate.prepare_on_start(settings) == HEAD
    assert migrate.current(settings) == HEAD
    [backup] = list_backups(settings)
    assert backup.manifest["schema_revision"] == "0001"


def test_prepare_on_start_and_upgrade_refuse_a_newer_database(settings: Settings) -> None:
    migrate.upgrade(settings)
    execute(settings, "UPDATE alembic_version SET version_num = '0099_future'")
    for attempt in (migrate.prepare_on_start, migrate.upgrade):
        with pytest.raises(ConfigError, match=r"at revision 0099_future, which this version"):
            attempt(settings)
    assert migrate.current(settings) == "0099_future"


def test_prepare_on_start_refuses_a_database_that_is_not_parleys(settings: Settings) -> None:
    execute(settings, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    with pytest.raises(ConfigError, match=r"has tables \(invoices\) but no parley schema"):
        migrate.prepare_on_start(settings)
    assert tables(settings) == {"invoices"}


def test_prepare_on_start_refuses_drift(settings: Settings) -> None:
    migrate.upgrade(settings)
    execute(settings, "DROP INDEX ix_request_log_chain_id")
    with pytest.raises(ConfigError, match="ix_request_log_chain_id on request_log is missing"):
        migrate.prepare_on_start(settings)


def test_a_failing_migration_leaves_nothing_behind(
    settings: Settings, extra_revision: Path
) -> None:
    add_revision(extra_revision, "0900", fail=True)
    with pytest.raises(ConfigError) as refused:
        migrate.upgrade(settings)
    assert refused.value.message == (
        "upgrade from base to 0900 failed: RuntimeError: migration 0900 fails half way. "
        "It was rolled back: the database is unchanged, still at base"
    )
    # All revisions ran in one transaction: the tables of 0001 are gone too.
    assert migrate.current(settings) is None
    assert tables(settings) <= {"alembic_version"}


def test_an_upgrade_that_drifts_from_the_models_is_rolled_back(
    settings: Settings, extra_revision: Path
) -> None:
    add_revision(extra_revision, "0900")  # creates a table the models do not have
    migrate.upgrade(settings, HEAD)
    with pytest.raises(ConfigError, match="table extra_0900 is in the database but not in"):
        migrate.upgrade(settings)
    assert len(list_backups(settings)) == 1  # taken before the attempt
    assert migrate.current(settings) == HEAD
    assert "extra_0900" not in tables(settings)


def test_sqlite_rebuilding_a_parent_table_keeps_its_children(
    sqlite_settings: Settings, extra_revision: Path
) -> None:
    # With foreign keys on, SQLite's DROP of the old table would cascade into messages.
    settings = sqlite_settings
    # Rows written at 0001, then 0002 (which rebuilds conversations and messages on
    # SQLite to add columns) and a test revision that rebuilds conversations again.
    migrate.upgrade(settings, "0001")
    execute(
        settings,
        "INSERT INTO conversations (id, public_id, created_at, updated_at, source)"
        " VALUES (1, '00000000000000000000000000000001', '2026-01-01', '2026-01-01', 'api')",
    )
    execute(
        settings,
        "INSERT INTO messages (id, public_id, conversation_id, role, content,"
        " payload, content_hash, chain_hash, chain_key, created_at) VALUES (1, "
        "'00000000000000000000000000000002', 1, 'user', 'hi', '{}', 'h', 'c', 7,"
        " '2026-01-01')",
    )
    (extra_revision / "versions" / "0900_recreate.py").write_text(
        RECREATE_REVISION.format(down=HEAD)
    )
    migrate.upgrade(settings)
    assert migrate.current(settings) == "0900"
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_unreachable_database_is_a_config_error(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings(
        tmp_path, "postgresql+psycopg://postgres@127.0.0.1:1/nothing_listens_here"
    )
    with pytest.raises(ConfigError, match="cannot connect to the database"):
        migrate.prepare_on_start(settings)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_sqlite_connections_carry_the_pragmas(
    make_settings: MakeSettings, tmp_path: Path, synchronous: str
) -> None:
    settings = make_settings(tmp_path, sqlite_synchronous=synchronous)
    engine = create_engine(settings)
    try:
        for conn in (engine.connect(), writer_connection(engine)):
            with conn:
                pragma = {
                    name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "foreign_keys", "synchronous", "busy_timeout")
                }
                assert pragma == {
                    "journal_mode": "wal",
                    "foreign_keys": 1,
                    "synchronous": {"FULL": 2, "NORMAL": 1}[synchronous],
                    "busy_timeout": 5000,
                }
        with writer_connection(engine) as conn:
            # The writer's own tuning (see store.engine.writer_connection).
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -65536
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    finally:
        engine.dispose()
    data_dir = tmp_path / "data"
    assert data_dir.is_dir()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_sqlite_ddl_rolls_back(make_settings: MakeSettings, tmp_path: Path) -> None:
    # Without the BEGIN recipe, sqlite3 commits before DDL and this table would survive.
    engine = create_engine(make_settings(tmp_path))
    try:
        with engine.connect() as conn:
            transaction = conn.begin()
            conn.exec_driver_sql("CREATE TABLE doomed (id INTEGER)")
            transaction.rollback()
            assert "doomed" not in sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
