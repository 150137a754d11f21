"""``parley stats`` and ``parley limits`` on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import sqlalchemy
from click.testing import CliRunner, Result

from parley.cli.main import cli
from parley.domain.messages import Message
from parley.domain.users import User
from parley.ops.migrate import upgrade
from parley.settings import load_settings
from parley.store.engine import create_engine
from parley.store.users import Users
from tests.store.test_exchanges import attempt, chat, write


def _env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_SEARCH_EMBEDDER": "none",
    }


def run(tmp_path: Path, database_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=_env(tmp_path, database_url))


@contextmanager
def _database(tmp_path: Path, database_url: str) -> Iterator[sqlalchemy.Engine]:
    """The CLI's database at the schema head, with an engine to fill it before the run."""
    settings = load_settings(env=_env(tmp_path, database_url), cwd=tmp_path)
    upgrade(settings)
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        engine.dispose()


def _user(engine: sqlalchemy.Engine, name: str) -> User:
    return Users(engine).create_user(
        email=f"{name}@example.org", username=name, password="pw-long-enough"
    )


def test_stats_reports_the_recorded_traffic(tmp_path: Path, database_url: str) -> None:
    with _database(tmp_path, database_url) as engine:
        write(
            engine,
            *[
                chat([Message("user", f"q{i}")], attempts=[attempt(model_used="m-a")])
                for i in range(3)
            ],
            chat(
                [Message("user", "x")],
                attempts=[attempt(ok=False, model_used="m-b", error_type="timeout")],
            ),
        )
        user = _user(engine, "gail")
    result = run(tmp_path, database_url, "stats", "--json", "--group-by", "model")
    assert result.exit_code == 0, result.output
    data = {e["group"]["model"]: e for e in orjson.loads(result.output)["data"]}
    assert data["m-a"]["requests"] == 3 and data["m-b"]["errors_by_type"] == {"timeout": 1}
    table = run(tmp_path, database_url, "stats")
    assert table.exit_code == 0 and "model=m-a" in table.output
    assert run(tmp_path, database_url, "stats", "--group-by", "secret").exit_code == 1

    assert (
        run(tmp_path, database_url, "limits", "set", "--user", "gail", "--rpm", "10").exit_code == 0
    )
    listed = run(tmp_path, database_url, "limits", "list")
    assert f"user {user.public_id}: requests_per_minute=10" in listed.output
    assert run(tmp_path, database_url, "limits", "clear", "--user", "gail").exit_code == 0
    again = run(tmp_path, database_url, "limits", "clear", "--user", "gail")
    assert again.exit_code == 1 and "no limits" in again.output
    both = run(tmp_path, database_url, "limits", "set", "--rpm", "1")
    assert both.exit_code == 1 and "exactly one" in both.output


def test_limits_set_changes_only_the_limits_given_and_clear_can_remove_one(
    tmp_path: Path, database_url: str
) -> None:
    with _database(tmp_path, database_url) as engine:
        user = _user(engine, "ida")

    def limits(*args: str) -> Result:
        result = run(tmp_path, database_url, "limits", *args)
        assert result.exit_code == 0, (args, result.output)
        return result

    limits("set", "--user", "ida", "--rpm", "10")
    # Before: the tpm replaced the whole set, and the rpm was gone.
    limits("set", "--user", "ida", "--tpm", "500", "--usd-day", "2.5")
    listed = limits("list").output
    assert (
        f"user {user.public_id}: requests_per_minute=10, tokens_per_minute=500, usd_per_day=2.5"
        in listed
    )
    limits("set", "--user", "ida", "--rpm", "20")
    assert "requests_per_minute=20, tokens_per_minute=500" in limits("list").output

    cleared = limits("clear", "--user", "ida", "--tpm", "--usd-day")
    assert "left: requests_per_minute=20" in cleared.output
    assert limits("list").output == f"user {user.public_id}: requests_per_minute=20\n"
    limits("clear", "--user", "ida")
    assert limits("list").output == ""
    # Nothing to clear, and a set with nothing to set, are errors (nothing is created).
    missing = run(tmp_path, database_url, "limits", "clear", "--user", "ida", "--rpm")
    assert missing.exit_code == 1 and "no limits" in missing.output
    empty = run(tmp_path, database_url, "limits", "set", "--user", "ida")
    assert empty.exit_code == 1 and "at least one" in empty.output
    assert limits("list").output == ""
    helped = run(tmp_path, database_url, "limits", "set", "--help").output
    assert "other limits stay" in " ".join(helped.split())


def test_limits_set_refuses_values_the_database_cannot_hold(
    tmp_path: Path, database_url: str
) -> None:
    with _database(tmp_path, database_url) as engine:
        _user(engine, "hank")
    for option, value in (
        ("--rpm", "2147483648"),
        ("--tpm", "9223372036854775808"),
        ("--usd-day", "inf"),
        ("--usd-month", "nan"),
    ):
        result = run(tmp_path, database_url, "limits", "set", "--user", "hank", option, value)
        assert result.exit_code == 2, (option, result.output)
        assert f"Invalid value for '{option}'" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert run(tmp_path, database_url, "limits", "list").output == ""
    largest = run(tmp_path, database_url, "limits", "set", "--user", "hank", "--rpm", "2147483647")
    assert largest.exit_code == 0, largest.output
    assert "requests_per_minute=2147483647" in run(tmp_path, database_url, "limits", "list").output


def test_stats_counts_exactly_its_window_and_prints_it(tmp_path: Path, database_url: str) -> None:
    now = datetime.now(UTC)
    with _database(tmp_path, database_url) as engine:
        write(
            engine,
            *[
                chat([Message("user", f"q{minutes}")], attempts=[attempt(started_at=at)])
                for minutes in (100, 80, 10)
                for at in [now - timedelta(minutes=minutes)]
            ],
        )
    result = run(tmp_path, database_url, "stats", "--window", "90m", "--group-by", "")
    assert result.exit_code == 0, result.output
    first, _header, total = result.output.splitlines()
    since, _to, until = first.split()
    counted = datetime.fromisoformat(until) - datetime.fromisoformat(since)
    assert abs(counted - timedelta(minutes=90)) <= timedelta(seconds=1), first
    # Before: rounded out to whole hours, the request 100 minutes ago was counted too.
    assert total.split()[1] == "2", result.output
    data = orjson.loads(run(tmp_path, database_url, "stats", "--window", "90m", "--json").output)
    assert data["data"][0]["requests"] == 2
    span = datetime.fromisoformat(data["until"]) - datetime.fromisoformat(data["since"])
    assert span == timedelta(minutes=90)


def test_stats_refuses_a_window_the_api_would_refuse(tmp_path: Path, database_url: str) -> None:
    for window, reason in (
        ("99999999d", "at most ten years"),
        ("3661d", "at most ten years"),
        ("0m", "positive duration"),
        ("week", "positive duration"),
    ):
        result = run(tmp_path, database_url, "stats", "--window", window)
        assert result.exit_code == 1, (window, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0] and "--window" in lines[0], lines


def test_stats_names_users_by_their_public_ids(tmp_path: Path, database_url: str) -> None:
    with _database(tmp_path, database_url) as engine:
        user = _user(engine, "hal")
        write(engine, chat([Message("user", "q")], user_id=user.id))
    result = run(tmp_path, database_url, "stats", "--json", "--group-by", "user")
    assert result.exit_code == 0, result.output
    [entry] = orjson.loads(result.output)["data"]
    # As the API and `parley limits list` name them; the row id is internal.
    assert entry["group"] == {"user": str(user.public_id)}
    table = run(tmp_path, database_url, "stats", "--group-by", "user")
    assert f"user={user.public_id}" in table.output
