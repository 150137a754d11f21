"""``parley users``: manage users from the shell, a thin client of ``parley.store.users``.

This is how the first admin is made (``parley users create --admin``); the other way is
the master key over HTTP (``POST /api/admin/users``). Commands read settings the way the
server does and need the database at the schema head: they never migrate it, an empty one
included (``parley db upgrade`` or server start creates the schema). A password is never
an argument (it would land in the shell history and the process list): it is prompted
for twice, or read from stdin with ``--password-stdin``.
Errors are one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import click
import sqlalchemy

from parley.cli.common import engine_at_head
from parley.cli.common import run as _run
from parley.domain.users import User
from parley.server.login_throttle import subject_of
from parley.store.limits import LimitStore
from parley.store.users import Users


@contextmanager
def _repository() -> Iterator[Users]:
    with engine_at_head() as engine:
        yield Users(engine)


def _unlock(engine: sqlalchemy.Engine, user: User) -> None:
    """Forget the login attempts counted against the user's names (the login throttle)."""
    store = LimitStore(engine)
    for name in (user.username, user.email):
        store.forget(subject_of(name))


def _find(users: Users, ref: str) -> User:
    user = users.find_user(ref)
    if user is None:
        click.echo(f"error: no user {ref!r} (give a username or an email)", err=True)
        raise SystemExit(1)
    return user


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@click.group()
def users() -> None:
    """Users: create them, list them, change roles, disable them, reset passwords, let
    them log in again after failed logins."""


@users.command()
@click.option("--email", required=True, help="Email address (stored lower-cased).")
@click.option("--username", required=True, help="3 to 64 letters, digits, '_', '.' or '-'.")
@click.option("--full-name", default=None, help="Display name.")
@click.option("--admin", is_flag=True, help="Make the user an admin.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin instead of a prompt."
)
def create(
    email: str, username: str, full_name: str | None, admin: bool, password_stdin: bool
) -> None:
    """Create a user; the password is prompted for (twice) or read from stdin."""
    with _repository() as repo:
        password = _password(password_stdin)
        user = _run(
            lambda: repo.create_user(
                email=email,
                username=username,
                password=password,
                full_name=full_name,
                role="admin" if admin else "user",
            )
        )
    click.echo(f"created {user.role} {user.username} <{user.email}> (id {user.public_id})")


@users.command("list")
def list_users() -> None:
    """List every user: username, email, role, state, creation and last activity."""
    with _repository() as repo:
        everyone: list[User] = []
        after = None
        while True:
            page, more = repo.list_users(limit=200, after=after)
            everyone.extend(page)
            if not more:
                break
            after = page[-1].public_id
    if not everyone:
        click.echo("no users yet: create one with `parley users create --admin`")
        return
    header = ("USERNAME", "EMAIL", "ROLE", "STATE", "CREATED", "LAST ACTIVE")
    table = [header] + [
        (
            u.username,
            u.email,
            u.role,
            "active" if u.is_active else "disabled",
            _when(u.created_at),
            _when(u.last_active_at),
        )
        for u in everyone
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@users.command("set-role")
@click.argument("user")
@click.argument("role", type=click.Choice(["admin", "user"]))
def set_role(user: str, role: str) -> None:
    """Make USER (username or email) an admin or a plain user."""
    with _repository() as repo:
        found = _find(repo, user)
        _run(lambda: repo.update_user(found.id, role=role))
    click.echo(f"{found.username} is now {'an admin' if role == 'admin' else 'a user'}")


@users.command()
@click.argument("user")
def disable(user: str) -> None:
    """Disable USER: their logins, sessions (ended now) and API keys stop working."""
    with _repository() as repo:
        found = _find(repo, user)
        _run(lambda: repo.update_user(found.id, is_active=False, end_sessions=True))
    click.echo(f"{found.username} is disabled; their sessions are ended")


@users.command()
@click.argument("user")
def enable(user: str) -> None:
    """Enable USER again (their API keys that are not revoked work again)."""
    with _repository() as repo:
        found = _find(repo, user)
        _run(lambda: repo.update_user(found.id, is_active=True))
    click.echo(f"{found.username} is enabled")


@users.command("reset-password")
@click.argument("user")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin instead of a prompt."
)
def reset_password(user: str, password_stdin: bool) -> None:
    """Set a new password for USER; their web sessions end (API keys keep working) and
    failed logins no longer hold them back."""
    with engine_at_head() as engine:
        repo = Users(engine)
        found = _find(repo, user)
        password = _password(password_stdin)
        _run(lambda: repo.update_user(found.id, password=password, end_sessions=True))
        _run(lambda: _unlock(engine, found))
    click.echo(f"password of {found.username} changed; their sessions are ended")


@users.command()
@click.argument("user")
def unlock(user: str) -> None:
    """Let USER log in now, though failed logins made the login throttle refuse them."""
    with engine_at_head() as engine:
        found = _find(Users(engine), user)
        _run(lambda: _unlock(engine, found))
    click.echo(f"{found.username} may log in again")


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"
