"""Every command that uses the data directory or the database, where it cannot: one line
naming the problem, exit status 1, no traceback, no password from ``DATABASE_URL``.

The matrix runs in-process through ``parley``'s root group, as the shell reaches it: an
exception escaping a command is what prints a traceback, so the run must end in the
``SystemExit`` of a one-line refusal. A few cases run ``python -m parley`` to read the real
stderr, among them a data directory the user may not write to, which needs a user the
permission bits stop (root without CAP_DAC_OVERRIDE, through ``setpriv``).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from parley.cli.main import cli
from parley.ops.backup import create_backup
from parley.ops.migrate import upgrade
from parley.settings import load_settings
from parley.store.engine import create_engine

SECRET = "pw-canary-4711"
NEWER = "ffff_from_a_newer_parley"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


@dataclass(frozen=True)
class Templates:
    archive: Path  # a good backup, for `parley restore`
    newer: Path  # a SQLite database at a revision this parley does not know
    history: Path  # a file for `parley import`


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    root = tmp_path_factory.mktemp("templates")
    settings = load_settings(
        env={"PARLEY_DATA_DIR": str(root / "data"), "PARLEY_SEARCH_EMBEDDER": "none"}, cwd=root
    )
    upgrade(settings)
    archive = create_backup(settings, root / "archives").path
    engine = create_engine(settings)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{NEWER}'")
    engine.dispose()
    history = root / "history.json"
    history.write_text("[]")
    return Templates(archive, root / "data" / "parley.db", history)


# Every command that reads the data directory or the database (not `db history`, `backup
# list|verify|prune`, which need neither, nor `serve`, see tests/cli/test_serve_cli.py).
COMMANDS: dict[str, Callable[[Templates], list[str]]] = {
    "db upgrade": lambda t: ["db", "upgrade"],
    "db downgrade": lambda t: ["db", "downgrade", "base"],
    "db current": lambda t: ["db", "current"],
    "db check": lambda t: ["db", "check"],
    "backup": lambda t: ["backup"],
    "restore": lambda t: ["restore", str(t.archive), "--yes"],
    "maintenance": lambda t: ["maintenance"],
    "maintenance --no-vacuum": lambda t: ["maintenance", "--no-vacuum"],
    "retention": lambda t: ["retention"],
    "users create": lambda t: [
        *("users", "create", "--email", "a@example.org", "--username", "alice"),
        "--password-stdin",
    ],
    "users list": lambda t: ["users", "list"],
    "users set-role": lambda t: ["users", "set-role", "alice", "admin"],
    "users disable": lambda t: ["users", "disable", "alice"],
    "users enable": lambda t: ["users", "enable", "alice"],
    "users reset-password": lambda t: ["users", "reset-password", "alice", "--password-stdin"],
    "users unlock": lambda t: ["users", "unlock", "alice"],
    "stats": lambda t: ["stats"],
    "limits list": lambda t: ["limits", "list"],
    "limits set": lambda t: ["limits", "set", "--user", "alice", "--rpm", "5"],
    "limits clear": lambda t: ["limits", "clear", "--user", "alice"],
    "export": lambda t: ["export"],
    "import": lambda t: ["import", str(t.history)],
    "search": lambda t: ["search", "hello"],
    "reindex": lambda t: ["reindex"],
}
# The commands that need the schema at head.
AT_HEAD = [c for c in COMMANDS if c.split()[0] in ("users", "stats", "limits", "export")] + [
    "import",
    "search",
    "reindex",
]
# Those that work at any revision this parley knows, and `db check`.
ANY_KNOWN = ["db check", "maintenance", "maintenance --no-vacuum", "retention"]


@dataclass(frozen=True)
class Environment:
    """Sets a bad environment up in ``tmp_path``: the variables, and a pattern the error
    line must match to name the problem."""

    prepare: Callable[[Path, Templates], tuple[dict[str, str], str]]
    commands: list[str]


def _data_dir_is_a_file(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    (tmp_path / "data").write_text("not a directory")
    return {"PARLEY_DATA_DIR": str(tmp_path / "data")}, re.escape(str(tmp_path / "data"))


def _data_dir_under_a_file(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    (tmp_path / "file").write_text("not a directory")
    return {"PARLEY_DATA_DIR": str(tmp_path / "file" / "data")}, re.escape(str(tmp_path / "file"))


def _postgres_unreachable(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    url = f"postgresql://parley:{SECRET}@127.0.0.1:1/parley"
    return {"DATABASE_URL": url}, 'connection to server at "127.0.0.1", port 1 failed'


def _malformed_url(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    url = f"postgresql://parley:{SECRET}@127.0.0.1:port/parley"
    return {"DATABASE_URL": url}, "DATABASE_URL is not a database URL"


def _not_a_database(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "parley.db").write_bytes(os.urandom(8192))
    # Refused before it is opened (parley reads the header), or in SQLite's words.
    return {}, r"is not an SQLite database|file is not a database"


def _no_schema(tmp_path: Path, _t: Templates) -> tuple[dict[str, str], str]:
    (tmp_path / "data").mkdir()
    database = tmp_path / "data" / "parley.db"
    database.touch(mode=0o600)
    conn = sqlite3.connect(database)  # a real SQLite file, with no table in it
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("DROP TABLE t")
    finally:
        conn.close()
    return {}, r"no parley schema( yet)?: run `parley db upgrade` first"


def _newer_schema(tmp_path: Path, t: Templates) -> tuple[dict[str, str], str]:
    (tmp_path / "data").mkdir()
    shutil.copy(t.newer, tmp_path / "data" / "parley.db")
    return {}, f"at revision {NEWER}, which this version of parley does not know"


ENVIRONMENTS = {
    "data dir is a file": Environment(_data_dir_is_a_file, list(COMMANDS)),
    "data dir under a file": Environment(_data_dir_under_a_file, list(COMMANDS)),
    "postgresql unreachable": Environment(_postgres_unreachable, list(COMMANDS)),
    "malformed DATABASE_URL": Environment(_malformed_url, list(COMMANDS)),
    "not a database": Environment(_not_a_database, list(COMMANDS)),
    "no schema yet": Environment(_no_schema, AT_HEAD + ANY_KNOWN),
    "newer schema": Environment(
        _newer_schema, [*AT_HEAD, *ANY_KNOWN, "db upgrade", "db downgrade", "db current"]
    ),
}

CASES = [
    pytest.param(environment, command, id=f"{environment}-{command}")
    for environment, setup in ENVIRONMENTS.items()
    for command in setup.commands
]


def base_env(tmp_path: Path, command: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": "",
        "PARLEY_DATA_DIR": str(tmp_path / "data"),
        "PARLEY_BACKUP_DIR": "",
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
        "PARLEY_SEARCH_EMBEDDER": "none",
    }
    if command == "reindex":  # past its "no embedder" refusal, to the database
        env |= {"PARLEY_SEARCH_EMBEDDER": "remote", "PARLEY_SEARCH_MODEL": "nowhere/model"}
    return env


@pytest.mark.parametrize(("environment", "command"), CASES)
def test_one_line_names_the_problem(
    tmp_path: Path, templates: Templates, environment: str, command: str
) -> None:
    overrides, problem = ENVIRONMENTS[environment].prepare(tmp_path, templates)
    env = base_env(tmp_path, command) | overrides
    result = CliRunner().invoke(
        cli, COMMANDS[command](templates), env=env, input="a new password\n"
    )
    # Anything but SystemExit escaped the command: the shell would show a traceback.
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert re.search(problem, result.stderr), result.stderr
    assert SECRET not in result.output


def test_the_known_cases_say_which_directory(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    env = base_env(tmp_path, "") | {"PARLEY_DATA_DIR": str(tmp_path / "data")}
    for argv in (["db", "current"], ["stats"]):
        result = CliRunner().invoke(cli, argv, env=env)
        assert (result.exit_code, result.stdout, result.stderr) == (
            1,
            "",
            f"error: cannot use the database's directory {tmp_path / 'data'}: "
            "it is a file, not a directory\n",
        )


def test_retention_maintenance_and_check_refuse_what_they_cannot_know(
    tmp_path: Path, database_url: str
) -> None:
    """On either database: no schema says to run `parley db upgrade`; a newer one is
    refused, not pruned, maintained or called free of drift."""
    env = base_env(tmp_path, "") | {"DATABASE_URL": database_url}
    commands = (["retention"], ["maintenance"], ["db", "check"])
    settings = load_settings(env=env, cwd=tmp_path)
    engine = create_engine(settings)
    with engine.begin() as conn:  # a database that has been used, with no table in it
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("DROP TABLE t")
    for argv in commands:
        result = CliRunner().invoke(cli, argv, env=env)
        assert (result.exit_code, result.stdout) == (1, ""), result.output
        assert result.stderr.startswith("error: the database has no parley schema")
        assert result.stderr.endswith(": run `parley db upgrade` first\n")
    upgrade(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
    engine.dispose()
    for argv in commands:
        result = CliRunner().invoke(cli, argv, env=env)
        assert (result.exit_code, result.stdout) == (1, ""), result.output
        assert result.stderr.startswith(f"error: database schema is at revision {NEWER},")


def _parley(tmp_path: Path, env: dict[str, str], *args: str, as_user: bool = False) -> str:
    """``python -m parley *args``'s stderr; it must fail with status 1. ``as_user``: as a
    user the permission bits stop (root drops the capability that lets it pass them)."""
    done = _process(tmp_path, env, *args, as_user=as_user)
    assert done.returncode == 1, done.stderr
    return done.stderr


def _process(
    tmp_path: Path, env: dict[str, str], *args: str, as_user: bool = False, reads: bool = False
) -> subprocess.CompletedProcess[str]:
    """``reads``: as a user the permission bits stop from reading too."""
    command = [sys.executable, "-m", "parley", *args]
    if as_user and os.geteuid() == 0:
        command = [*(DROP_READ if reads else DROP_OVERRIDE), *command]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


DROP_OVERRIDE = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override", "--"]
DROP_READ = [*DROP_OVERRIDE[:2], "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_the_real_stderr_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    env = base_env(tmp_path, "")
    for args in (("db", "current"), ("stats",)):
        stderr = _parley(tmp_path, env, *args)
        assert stderr == (
            f"error: cannot use the database's directory {tmp_path / 'data'}: "
            "it is a file, not a directory\n"
        )


def _permission_bits_apply(tmp_path: Path) -> bool:
    """Whether a directory without write permission stops us (as root: through setpriv)."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o500)
    command = ["touch", str(probe / "x")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            return False
        command = [*DROP_OVERRIDE, *command]
    refused = subprocess.run(command, capture_output=True).returncode != 0
    probe.chmod(0o700)
    return refused and not (probe / "x").exists()


def test_a_data_directory_without_write_permission(tmp_path: Path, templates: Templates) -> None:
    if not _permission_bits_apply(tmp_path):
        pytest.skip("permission bits do not stop this user, and setpriv cannot drop that")
    data = tmp_path / "data"
    data.mkdir(mode=0o500)
    env = base_env(tmp_path, "")
    try:
        restore = _parley(tmp_path, env, "restore", str(templates.archive), "--yes", as_user=True)
        listing = _parley(tmp_path, env, "users", "list", as_user=True)
    finally:
        data.chmod(0o700)
    assert restore == f"error: cannot use the database's directory {data}: Permission denied\n"
    assert listing == (
        f"error: cannot open the database file {data / 'parley.db'}: unable to open database file\n"
    )


def test_db_current_says_a_newer_revision_is_not_this_parleys(
    tmp_path: Path, database_url: str
) -> None:
    """The revision found is printed, and on stderr that this parley does not know it;
    upgrade and downgrade refuse that database; history lists this parley's revisions."""
    env = base_env(tmp_path, "") | {"DATABASE_URL": database_url}
    settings = load_settings(env=env, cwd=tmp_path)
    upgrade(settings)
    engine = create_engine(settings)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": NEWER})
    engine.dispose()
    result = CliRunner().invoke(cli, ["db", "current"], env=env)
    assert (result.exit_code, result.stdout) == (1, f"{NEWER}\n")
    assert result.stderr == (
        f"error: database schema is at revision {NEWER}, which this version of parley does "
        "not know (a newer parley migrated it): refusing to use it; run that newer parley, "
        "or restore a backup taken before it\n"
    )
    for argv in (["db", "upgrade"], ["db", "downgrade", "base"]):
        result = CliRunner().invoke(cli, argv, env=env)
        assert (result.exit_code, result.stdout) == (1, ""), argv
        assert result.stderr.startswith(f"error: database schema is at revision {NEWER},")
    history = CliRunner().invoke(cli, ["db", "history"], env=env)
    assert history.exit_code == 0 and NEWER not in history.output


def test_backup_says_which_destination_failed_and_why(tmp_path: Path, database_url: str) -> None:
    """Each destination with the system's reason, in one line; the fallback's warning only
    once the backup is in it (as a real process prints them: the log included)."""
    env = base_env(tmp_path, "") | {"DATABASE_URL": database_url}
    upgrade(load_settings(env=env, cwd=tmp_path))
    file = tmp_path / "file"
    file.write_text("not a directory")
    stderr = _parley(tmp_path, env, "backup", "--to", str(file / "sub"))
    assert stderr == (
        f"error: cannot write the backup into {file / 'sub'}: {file} is a file, not a directory\n"
    )
    both = env | {"PARLEY_BACKUP_DIR": str(file), "PARLEY_BACKUP_FALLBACK_DIR": str(file / "x")}
    assert _parley(tmp_path, both, "backup") == (
        f"error: no backup directory could be written: {file}: it is a file, not a directory; "
        f"{file / 'x'}: {file} is a file, not a directory\n"
    )
    done = _process(tmp_path, env | {"PARLEY_BACKUP_DIR": str(file)}, "backup")
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"warning: backup directory {file} is not writable (it is a file, not a directory); "
        f"the backup went to {tmp_path / 'fallback'}\n"
    )
    if _permission_bits_apply(tmp_path):
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o500)
        stderr = _parley(tmp_path, env, "backup", "--to", str(closed / "x"), as_user=True)
        assert stderr == f"error: cannot write the backup into {closed / 'x'}: Permission denied\n"


def test_archives_and_directories_named_with_the_reason(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a directory")
    env = base_env(tmp_path, "")
    cases = {
        ("restore", str(file / "a.tar.gz"), "--yes"): (
            f"cannot read the backup archive {file / 'a.tar.gz'}: {file} is a file, not a directory"
        ),
        ("backup", "verify", str(file / "a.tar.gz")): (
            f"cannot read {file / 'a.tar.gz'}: {file} is a file, not a directory"
        ),
        ("backup", "list", "--dir", str(tmp_path / "missing")): (
            f"cannot list {tmp_path / 'missing'}: No such file or directory"
        ),
        ("backup", "prune", "--dir", str(file / "x")): (
            f"cannot list {file / 'x'}: {file} is a file, not a directory"
        ),
    }
    upgrade(load_settings(env=env, cwd=tmp_path))  # export and import need the schema
    cases |= {
        ("export", "--out", str(file / "out.json")): (
            f"cannot write {file / 'out.json'}: {file} is a file, not a directory"
        ),
        ("import", str(file / "in.json")): (
            f"cannot read {file / 'in.json'}: {file} is a file, not a directory"
        ),
    }
    for argv, message in cases.items():
        result = CliRunner().invoke(cli, list(argv), env=env)
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"error: {message}\n")


@pytest.mark.parametrize("mode", ["semantic", "hybrid"])
def test_search_names_a_vector_store_that_cannot_be_a_directory(tmp_path: Path, mode: str) -> None:
    env = base_env(tmp_path, "reindex")
    upgrade(load_settings(env=env, cwd=tmp_path))
    (tmp_path / "file").write_text("not a directory")
    store = tmp_path / "file" / "vectors"
    result = CliRunner().invoke(
        cli, ["search", "hello", "--mode", mode], env=env | {"PARLEY_VECTOR_URI": str(store)}
    )
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        "",
        f"error: cannot use the vector store {store}: {tmp_path / 'file'} is a file, "
        "not a directory\n",
    )


def test_search_names_a_vector_store_it_may_not_read(tmp_path: Path) -> None:
    if not _permission_bits_apply(tmp_path):
        pytest.skip("permission bits do not stop this user, and setpriv cannot drop that")
    store = tmp_path / "vectors"
    store.mkdir(mode=0o000)
    env = base_env(tmp_path, "reindex") | {"PARLEY_VECTOR_URI": str(store)}
    upgrade(load_settings(env=env, cwd=tmp_path))
    try:
        for args in (("search", "hello", "--mode", "semantic"), ("reindex",)):
            done = _process(tmp_path, env, *args, as_user=True, reads=True)
            assert (done.returncode, done.stdout, done.stderr) == (
                1,
                "",
                f"error: cannot use the vector store {store}: Permission denied\n",
            ), args
    finally:
        store.chmod(0o700)


@pytest.mark.parametrize("command", ["maintenance", "retention"])
def test_no_warning_or_log_line_before_the_error(tmp_path: Path, command: str) -> None:
    """A file that is not a database, readable by others: refused before it is opened (so
    its mode is left alone) and before any step logs its own failure: one line."""
    (tmp_path / "data").mkdir()
    junk = tmp_path / "data" / "parley.db"
    junk.write_bytes(os.urandom(8192))
    junk.chmod(0o644)
    stderr = _parley(tmp_path, base_env(tmp_path, ""), command)
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: the database file {junk} is not an SQLite database")
    assert junk.stat().st_mode & 0o777 == 0o644
