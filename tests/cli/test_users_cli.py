"""``parley users`` end to end through click, against a real database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from parley.cli.main import cli
from parley.ops.migrate import upgrade
from parley.security import tokens
from parley.server.login_throttle import MAX_FAILURES, WINDOW, subject_of
from parley.settings import Settings, load_settings
from parley.store.engine import create_engine
from parley.store.limits import LimitStore
from parley.store.users import Users
from tests.harness import rows

COMMANDS = ("create", "list", "set-role", "disable", "enable", "reset-password", "unlock")
PASSWORD = "the admin's password"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


def run(tmp_path: Path, database_url: str, *args: str, stdin: str | None = None) -> Result:
    env = {"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    return CliRunner().invoke(cli, ["users", *args], env=env, input=stdin)


@contextmanager
def repository(tmp_path: Path, database_url: str) -> Iterator[Users]:
    """The repository the CLI writes to, to check what the commands did."""
    env = {"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    engine = create_engine(load_settings(env=env, cwd=tmp_path))
    try:
        yield Users(engine)
    finally:
        engine.dispose()


def test_create_list_set_role_disable_enable(tmp_path: Path, database_url: str) -> None:
    # A new install: the commands never create the schema, they say how to.
    result = run(tmp_path, database_url, "list")
    assert (result.exit_code, result.stderr) == (
        1,
        "error: the database has no parley schema yet: run `parley db upgrade` first\n",
    )
    env = {"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    assert CliRunner().invoke(cli, ["db", "upgrade"], env=env).exit_code == 0
    result = run(tmp_path, database_url, "list")
    assert (result.exit_code, result.output) == (
        0,
        "no users yet: create one with `parley users create --admin`\n",
    )
    result = run(
        tmp_path,
        database_url,
        "create",
        "--email",
        "Root@Example.org",
        "--username",
        "root",
        "--full-name",
        "The Root",
        "--admin",
        stdin=f"{PASSWORD}\n{PASSWORD}\n",
    )
    assert result.exit_code == 0, result.output
    assert "created admin root <root@example.org>" in result.output
    assert PASSWORD not in result.output  # the prompt hides what is typed
    result = run(
        tmp_path,
        database_url,
        "create",
        "--email",
        "u@example.org",
        "--username",
        "someone",
        "--password-stdin",
        stdin="someone's password\n",
    )
    assert result.exit_code == 0 and "created user someone" in result.output

    listed = run(tmp_path, database_url, "list").output.splitlines()
    assert listed[0].split() == ["USERNAME", "EMAIL", "ROLE", "STATE", "CREATED", "LAST", "ACTIVE"]
    assert [line.split()[:4] for line in listed[1:]] == [
        ["root", "root@example.org", "admin", "active"],
        ["someone", "u@example.org", "user", "active"],
    ]

    assert run(tmp_path, database_url, "set-role", "someone", "admin").exit_code == 0
    assert run(tmp_path, database_url, "set-role", "root@example.org", "user").exit_code == 0
    found = rows(database_url, "SELECT username, role FROM users ORDER BY id")
    assert [(r["username"], r["role"]) for r in found] == [("root", "user"), ("someone", "admin")]

    with repository(tmp_path, database_url) as repo:
        check_disable_and_enable(tmp_path, database_url, repo)


def check_disable_and_enable(tmp_path: Path, database_url: str, repo: Users) -> None:
    user = repo.find_user("someone")
    assert user is not None
    session = repo.create_session(user.id, hours=1)
    _, key = repo.create_key(user.id, "k")
    result = run(tmp_path, database_url, "disable", "someone")
    assert result.exit_code == 0 and "disabled" in result.output
    assert repo.resolve_session(tokens.digest(session.token)) is None
    assert repo.resolve_key(tokens.digest(key)) is None
    assert repo.check_login("someone", "someone's password") is None
    assert "disabled" in run(tmp_path, database_url, "list").output
    assert run(tmp_path, database_url, "enable", "someone").exit_code == 0
    assert repo.resolve_key(tokens.digest(key)) is not None
    assert repo.check_login("someone", "someone's password") is not None


def test_reset_password(tmp_path: Path, database_url: str, settings: Settings) -> None:
    upgrade(settings)
    args = ("create", "--email", "a@example.org", "--username", "ann", "--password-stdin")
    assert run(tmp_path, database_url, *args, stdin="first password\n").exit_code == 0
    with repository(tmp_path, database_url) as repo:
        check_reset_password(tmp_path, database_url, repo)


def check_reset_password(tmp_path: Path, database_url: str, repo: Users) -> None:
    user = repo.find_user("ann")
    assert user is not None
    session = repo.create_session(user.id, hours=1)

    result = run(tmp_path, database_url, "reset-password", "ann", stdin="second pw\nsecond pw\n")
    assert result.exit_code == 0 and "password of ann changed" in result.output
    assert repo.check_login("ann", "first password") is None
    assert repo.check_login("ann", "second pw") is not None
    assert repo.resolve_session(tokens.digest(session.token)) is None
    mismatch = run(tmp_path, database_url, "reset-password", "ann", stdin="third pw1\nthird pw2\n")
    assert mismatch.exit_code != 0
    assert repo.check_login("ann", "second pw") is not None
    by_stdin = run(
        tmp_path, database_url, "reset-password", "a@example.org", "--password-stdin", stdin="x" * 9
    )
    assert by_stdin.exit_code == 0 and repo.check_login("ann", "x" * 9) is not None


def test_unlock_and_reset_password_forget_failed_logins(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    upgrade(settings)
    args = ("create", "--email", "Cy@Example.org", "--username", "cyd", "--password-stdin")
    assert run(tmp_path, database_url, *args, stdin="cy's password\n").exit_code == 0
    engine = create_engine(settings)
    store = LimitStore(engine)
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    since = minute - WINDOW

    def count_failures() -> None:
        for name in ("cyd", "CY@example.org ", "someone-else"):
            for _ in range(MAX_FAILURES + 1):
                store.count_request(subject_of(name), minute)

    def held(name: str) -> bool:
        return sum(count for _, count in store.counts_since(subject_of(name), since)) > MAX_FAILURES

    try:
        for command in (
            ("unlock", "cy@example.org"),
            ("reset-password", "cyd", "--password-stdin"),
        ):
            count_failures()
            assert held("cyd") and held("cy@example.org") and held("someone-else")
            result = run(tmp_path, database_url, *command, stdin="a new password\n")
            assert result.exit_code == 0, result.output
            assert not held("cyd") and not held("cy@example.org"), command
            assert held("someone-else")
        assert "cyd may log in again" in run(tmp_path, database_url, "unlock", "cyd").output
        missing = run(tmp_path, database_url, "unlock", "nobody")
        assert (missing.exit_code, missing.stderr) == (
            1,
            "error: no user 'nobody' (give a username or an email)\n",
        )
    finally:
        engine.dispose()


def test_errors_are_one_line_without_traceback(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    upgrade(settings)
    create = ("create", "--email", "b@example.org", "--username", "bea", "--password-stdin")
    short = run(tmp_path, database_url, *create, stdin="short\n")
    assert (short.exit_code, short.stderr) == (
        1,
        "error: 'password' must be at least 8 characters long\n",
    )
    assert run(tmp_path, database_url, *create, stdin="long enough\n").exit_code == 0
    again = run(tmp_path, database_url, *create, stdin="long enough\n")
    assert (again.exit_code, again.stderr) == (1, "error: a user with this email already exists\n")
    for args in (("disable", "nobody"), ("set-role", "nobody", "admin"), ("enable", "x@y.z")):
        missing = run(tmp_path, database_url, *args)
        assert missing.exit_code == 1, args
        assert missing.stderr.startswith("error: no user ") and missing.stderr.count("\n") == 1
        assert "Traceback" not in missing.output
    bad_email = run(
        tmp_path,
        database_url,
        "create",
        "--email",
        "nope",
        "--username",
        "bob",
        "--password-stdin",
        stdin="long enough\n",
    )
    assert bad_email.stderr == "error: 'email' is not a valid email address\n"
    bad_role = run(tmp_path, database_url, "set-role", "bea", "root")
    assert bad_role.exit_code == 2  # click's usage error names the choices
    unreachable = CliRunner().invoke(
        cli, ["users", "list"], env={"DATABASE_URL": "mysql://nobody@localhost/parley"}
    )
    assert unreachable.exit_code == 1 and unreachable.stderr.startswith("error: unsupported")


def test_password_is_never_an_argument() -> None:
    result = CliRunner().invoke(cli, ["users", "create", "--help"])
    assert "--password-stdin" in result.output
    assert "--password " not in result.output and "--password=" not in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented(command: str) -> None:
    result = CliRunner().invoke(cli, ["users", command, "--help"])
    assert result.exit_code == 0
    summary = result.output.split("\n\n")[1].strip()
    assert len(summary) > 20, f"`parley users {command}` has no help text"
