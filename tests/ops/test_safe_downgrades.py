"""Downgrades never discard data unasked, on SQLite and PostgreSQL.

A downgrade that drops tables or columns holding data is refused with one line per item
and changes nothing; ``--discard-data`` goes ahead after a verified backup; one that drops
only empty tables and all-null columns needs no flag. Databases are seeded by reflection
(``seed``: three rows in every table), so new revisions are covered without editing this
file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from parley.cli.db import db
from parley.errors import ConfigError
from parley.ops import migrate
from parley.ops.backup import list_backups
from parley.ops.data_loss import Loss
from parley.settings import Settings
from parley.store.engine import create_engine
from parley.store.schema import FULL_TEXT, FullText
from tests.harness import settings_for
from tests.ops.test_safe_migrations import (
    HEAD,
    OLDER,
    ROWS,
    add_revision,
    backup_env,
    dump,
    only_backup,
    schema,
    seed,
    unwritable,
)

REFUSED = "refusing to downgrade from {before} to {target}: it drops these tables and columns"

FAILING_DOWNGRADE = '''"""Test-only revision {revision}: its downgrade fails."""

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    raise RuntimeError("downgrade of {revision} fails")
'''


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return settings_for(tmp_path, database_url, **backup_env(tmp_path))


def run_db(settings: Settings, tmp_path: Path, *args: str) -> Result:
    env = {"DATABASE_URL": settings.database_url, "PARLEY_DATA_DIR": str(settings.data_dir)}
    return CliRunner().invoke(db, list(args), env={**env, **backup_env(tmp_path)})


def stored(settings: Settings) -> dict[str, list[str]]:
    """Each table's columns that hold data of their own, read independently of the code
    under test: not the version table, the full-text index or generated columns."""
    engine = create_engine(settings)
    try:
        with engine.connect() as conn:
            full_text = FULL_TEXT.get(conn.dialect.name, FullText())
            inspector = sa.inspect(conn)
            return {
                table: [c["name"] for c in inspector.get_columns(table) if not c.get("computed")]
                for table in inspector.get_table_names()
                if table != "alembic_version"
                and not any(table == f or table.startswith(f"{f}_") for f in full_text.tables)
            }
    finally:
        engine.dispose()


def expected_losses(
    before: dict[str, list[str]], after: dict[str, list[str]], rows: dict[str, Any]
) -> list[str]:
    """The refusal's lines: dropped tables with their rows, then dropped columns of the
    tables that stay with their non-null values (counted in ``rows``: ``dump`` of the
    columns in ``before``)."""
    tables = [f"{t}: {len(rows[t])} rows" for t in sorted(before) if t not in after and rows[t]]
    columns = []
    for table in sorted(set(before) & set(after)):
        for name in sorted(set(before[table]) - set(after[table])):
            at = before[table].index(name)
            values = sum(row[at] is not None for row in rows[table])
            if values:
                columns.append(f"{table}.{name}: {values} non-null value{'s' * (values != 1)}")
    return tables + columns


def test_db_downgrade_refuses_to_drop_stored_data_and_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    migrate.upgrade(settings)
    seed(settings)
    before_schema, before_rows = schema(settings), dump(settings)

    result = run_db(settings, tmp_path, "downgrade", "base")

    assert (result.exit_code, result.stdout) == (1, "")
    header, *items = result.stderr.splitlines()
    assert header.startswith("error: " + REFUSED.format(before=HEAD, target="base"))
    assert header.endswith("(pass --discard-data to discard it, after a verified backup)")
    # Every table that holds rows, one line each, and nothing derived (full-text index).
    assert items == [f"  {table}: {ROWS} rows" for table in sorted(stored(settings))]
    assert "Traceback" not in result.output
    assert migrate.current(settings) == HEAD
    assert schema(settings) == before_schema
    assert dump(settings) == before_rows
    assert list_backups(settings) == []  # refused before any backup


def test_db_downgrade_with_discard_data_proceeds_after_a_backup(
    settings: Settings, tmp_path: Path
) -> None:
    migrate.upgrade(settings)
    seed(settings)

    result = run_db(settings, tmp_path, "downgrade", "0008", "--discard-data")

    assert result.exit_code == 0, result.output
    archive = only_backup(settings, HEAD)  # holds the discarded rows
    assert result.output == (
        f"discarded anomaly_log: {ROWS} rows\n"
        f"discarded conversations.title_message_id: {ROWS} non-null values\n"
        f"discarded responses.notice: {ROWS} non-null values\n"
        f"backup taken before migrating: {archive}\n"
        "database at 0008\n"
    )
    assert migrate.current(settings) == "0008"
    assert "anomaly_log" not in stored(settings)


@pytest.mark.parametrize("target", OLDER)
def test_a_refused_downgrade_lists_exactly_what_the_downgrade_drops(
    settings: Settings, target: str
) -> None:
    migrate.upgrade(settings)
    seed(settings)
    # Seeded NULL: self-referencing keys, so some columns hold fewer values than rows.
    layout = stored(settings)
    rows = dump(settings, only=layout)

    listed: list[str] = []
    try:
        report = migrate.downgrade(settings, target)
    except ConfigError as refused:
        header, *items = refused.message.splitlines()
        assert header.startswith(REFUSED.format(before=HEAD, target=target))
        listed = [item.strip() for item in items]
        assert migrate.current(settings) == HEAD
        assert dump(settings, only=layout) == rows
        report = migrate.downgrade(settings, target, discard_data=True)

    assert (report.before, report.after) == (HEAD, None if target == "base" else target)
    # What went for real, by reflection, is what the refusal listed, line for line (and
    # nothing when the downgrade drops nothing holding data: it ran without the flag).
    wanted = expected_losses(layout, stored(settings), rows)
    assert listed == wanted
    assert [str(loss) for loss in report.discarded] == wanted


def test_a_downgrade_over_empty_tables_and_null_columns_needs_no_flag(
    settings: Settings, tmp_path: Path
) -> None:
    migrate.upgrade(settings)
    seed(settings)
    engine = create_engine(settings)
    try:
        with engine.begin() as conn:
            # 0012, 0011, 0009 and 0008 drop conversations.title_message_id,
            # responses.notice, the anomaly log and request_log.finished_at.
            conn.exec_driver_sql("UPDATE conversations SET title_message_id = NULL")
            conn.exec_driver_sql("UPDATE responses SET notice = NULL")
            conn.exec_driver_sql("DELETE FROM anomaly_log")
            conn.exec_driver_sql("UPDATE request_log SET finished_at = NULL")
    finally:
        engine.dispose()
    rows = dump(settings)

    result = run_db(settings, tmp_path, "downgrade", "0007")

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "database at 0007"
    assert "discarded" not in result.output
    assert migrate.current(settings) == "0007"
    after = dump(settings)
    assert after["request_log"] and len(after["request_log"]) == len(rows["request_log"])
    assert after["messages"] == rows["messages"]


def test_an_empty_database_downgrades_to_base_without_the_flag(
    settings: Settings, tmp_path: Path
) -> None:
    migrate.upgrade(settings)
    result = run_db(settings, tmp_path, "downgrade", "base")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "database at base"
    assert stored(settings) == {}


def test_discarding_data_needs_a_backup_even_in_development(
    tmp_path: Path, database_url: str
) -> None:
    env = {**unwritable(tmp_path), "PARLEY_ENV": "development"}
    settings = settings_for(tmp_path, database_url, **env)
    migrate.upgrade(settings)
    seed(settings)
    rows = dump(settings)

    with pytest.raises(ConfigError) as refused:
        migrate.downgrade(settings, "0008", discard_data=True)

    assert refused.value.message.startswith(
        f"refusing to discard data by downgrading the database (at {HEAD}) without a "
        "verified backup: "
    )
    assert migrate.current(settings) == HEAD
    assert dump(settings) == rows


def test_a_failing_downgrade_fails_in_its_rehearsal_before_any_backup(
    settings: Settings, migrations: Path
) -> None:
    revision = add_revision(migrations, FAILING_DOWNGRADE)
    migrate.upgrade(settings)
    seed(settings)
    rows = dump(settings)
    with pytest.raises(ConfigError) as refused:
        migrate.downgrade(settings, HEAD)
    assert refused.value.message == (
        f"downgrade from {revision} to {HEAD} failed: RuntimeError: downgrade of {revision} "
        f"fails. It was rolled back: the database is unchanged, still at {revision}"
    )
    assert migrate.current(settings) == revision
    assert dump(settings) == rows
    assert list_backups(settings) == []


def test_each_loss_is_one_line_with_its_count() -> None:
    assert str(Loss("attachments", None, 1)) == "attachments: 1 row"
    assert str(Loss("attachments", None, 56)) == "attachments: 56 rows"
    assert str(Loss("messages", "user_id", 1)) == "messages.user_id: 1 non-null value"
    assert str(Loss("messages", "user_id", 1234)) == "messages.user_id: 1,234 non-null values"
