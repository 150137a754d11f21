"""``parley search`` on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import orjson
from click.testing import CliRunner

from parley.cli.main import cli
from parley.domain.messages import Message
from parley.ops.migrate import upgrade
from parley.settings import load_settings
from parley.store.engine import create_engine
from parley.store.users import Users
from tests.cli.test_stats_cli import _env, run
from tests.store.test_exchanges import chat, write


def test_search_finds_words_for_everyone_or_one_user(tmp_path: Path, database_url: str) -> None:
    settings = load_settings(env=_env(tmp_path, database_url), cwd=tmp_path)
    upgrade(settings)
    engine = create_engine(settings)
    try:
        gail = Users(engine).create_user(
            email="g@example.org", username="gail", password="pw-long-enough"
        )
        write(
            engine,
            chat([Message("user", "the narwhal question")], ["a narwhal answer"], user_id=gail.id),
            chat([Message("user", "another narwhal")], ["sure"], user_id=None),
        )
    finally:
        engine.dispose()
    everyone = run(tmp_path, database_url, "search", "narwhal", "--json")
    assert everyone.exit_code == 0, everyone.output
    assert len(orjson.loads(everyone.output)) == 3
    gails = orjson.loads(
        run(tmp_path, database_url, "search", "narwhal", "--user", "gail", "--json").output
    )
    assert {hit["role"] for hit in gails} == {"user", "assistant"}
    assert all("[narwhal]" in hit["snippet"] for hit in gails)
    table = run(tmp_path, database_url, "search", "narwhal", "--limit", "1")
    assert table.exit_code == 0 and "[narwhal]" in table.output
    assert "no results" in run(tmp_path, database_url, "search", "walrus").output
    assert run(tmp_path, database_url, "search", "narwhal", "--user", "nobody").exit_code == 1
    empty = run(tmp_path, database_url, "search", " ")
    assert empty.exit_code == 1 and "must not be empty" in empty.output


def test_search_explains_itself() -> None:
    result = CliRunner().invoke(cli, ["search", "--help"])
    assert result.exit_code == 0 and "--conversation" in result.output
