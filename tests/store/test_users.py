"""The identity repository against a real SQLite file and the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from parley.errors import InvalidRequest
from parley.security import tokens
from parley.store.schema import metadata, web_sessions
from parley.store.users import Users

PASSWORD = "a long enough password"


@pytest.fixture
def repo(migrated_engine: sa.Engine) -> Users:
    return Users(migrated_engine)


def test_users_are_validated_unique_and_found_by_any_name(repo: Users) -> None:
    alice = repo.create_user(
        email=" Alice@Example.ORG ", username="alice", password=PASSWORD, full_name=" Alice "
    )
    assert (alice.email, alice.username, alice.full_name) == ("alice@example.org", "alice", "Alice")
    assert (alice.role, alice.is_active, alice.preferences) == ("user", True, {})
    assert alice.created_at.tzinfo is not None and alice.last_active_at is None
    for ref in ("alice", "ALICE@example.org", str(alice.public_id)):
        found = repo.find_user(ref)
        assert found is not None and found.id == alice.id, ref
    assert repo.find_user("Alice") is None  # usernames are exact

    with pytest.raises(InvalidRequest) as taken:
        repo.create_user(email="ALICE@example.org", username="alice2", password=PASSWORD)
    assert taken.value.param == "email"
    with pytest.raises(InvalidRequest) as taken:
        repo.create_user(email="other@example.org", username="alice", password=PASSWORD)
    assert taken.value.param == "username"
    bad = {
        "email": ["no-at", "a@b", "a@@b.c", "a@.b.c", "a b@c.d", "@b.c", 5],
        "username": ["ab", "with space", "x" * 65, "sla/sh", None],
        "password": ["short", 12345678, "x" * 2000],
        "role": ["root", None],
    }
    good: dict[str, object] = {"email": "ok@example.org", "username": "okay", "password": PASSWORD}
    for field, values in bad.items():
        for value in values:
            with pytest.raises(InvalidRequest) as refused:
                repo.create_user(**{**good, field: value})
            assert refused.value.param == field, (field, value)
            assert str(value) not in refused.value.message or field == "role"
    assert repo.find_user("okay") is None


def test_login_and_updates(repo: Users) -> None:
    user = repo.create_user(email="b@example.org", username="bob", password=PASSWORD)
    assert repo.check_login("bob", PASSWORD) is not None
    assert repo.check_login("B@EXAMPLE.org", PASSWORD) is not None
    assert repo.check_login("bob", PASSWORD + "!") is None
    assert repo.check_login("nobody", PASSWORD) is None

    changed = repo.update_user(
        user.id, full_name="Bob", preferences={"theme": "dark"}, role="admin"
    )
    assert changed is not None and changed.is_admin and changed.preferences == {"theme": "dark"}
    assert changed.updated_at >= user.updated_at
    with pytest.raises(InvalidRequest):
        repo.update_user(user.id, preferences=["not", "an", "object"])
    repo.update_user(user.id, password="another password")
    assert repo.check_login("bob", PASSWORD) is None
    assert repo.check_password(user.id, "another password")
    repo.update_user(user.id, is_active=False)
    assert repo.check_login("bob", "another password") is None
    assert repo.update_user(10_000, role="user") is None


def test_keys_resolve_until_revoked_expired_or_disabled(repo: Users) -> None:
    user = repo.create_user(email="c@example.org", username="carol", password=PASSWORD)
    key, plain = repo.create_key(user.id, " laptop ")
    assert plain.startswith("pk-") and len(plain) >= 43 and key.prefix == plain[:12]
    assert (
        key.name == "laptop" and key.username == "carol" and key.status(key.created_at) == "active"
    )
    principal = repo.resolve_key(tokens.digest(plain))
    assert principal is not None
    assert (principal.user_id, principal.api_key_id, principal.role) == (user.id, key.id, "user")
    assert repo.resolve_key(tokens.digest(plain + "x")) is None

    later = datetime.now(UTC) + timedelta(hours=1)
    expiring, expiring_plain = repo.create_key(user.id, "short", expires_at=later)
    assert repo.resolve_key(tokens.digest(expiring_plain)) is not None
    assert repo.resolve_key(tokens.digest(expiring_plain), now=later + timedelta(seconds=1)) is None
    assert expiring.status(later) == "expired"

    repo.update_user(user.id, is_active=False)
    assert repo.resolve_key(tokens.digest(plain)) is None
    repo.update_user(user.id, is_active=True)
    assert repo.resolve_key(tokens.digest(plain)) is not None

    revoked = repo.revoke_key(key.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert repo.resolve_key(tokens.digest(plain)) is None
    again = repo.revoke_key(key.id)
    assert again is not None and again.revoked_at == revoked.revoked_at

    other = repo.create_user(email="d@example.org", username="dave", password=PASSWORD)
    repo.create_key(other.id, "dave's")
    mine, more = repo.list_keys(user.id)
    assert [k.name for k in mine] == ["short", "laptop"] and not more
    first, more = repo.list_keys(limit=1)
    assert [k.name for k in first] == ["dave's"] and more
    rest, more = repo.list_keys(limit=5, after=first[0].public_id)
    assert [k.name for k in rest] == ["short", "laptop"] and not more
    assert repo.get_key(key.public_id) == revoked


def test_a_key_expiry_is_in_the_future_and_at_most_ten_years_ahead(repo: Users) -> None:
    user = repo.create_user(email="k@example.org", username="kim", password=PASSWORD)
    now = datetime.now(UTC)
    for moment in (
        now - timedelta(seconds=1),
        now + timedelta(days=3651),
        datetime(9999, 12, 31, 23, 59, 59),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
    ):
        with pytest.raises(InvalidRequest) as refused:
            repo.create_key(user.id, "k", expires_at=moment)
        assert refused.value.param == "expires_at", moment
    assert repo.list_keys(user.id) == ([], False)
    # A time without an offset is UTC.
    later = (now + timedelta(days=3649)).replace(tzinfo=None, microsecond=0)
    key, _plain = repo.create_key(user.id, "k", expires_at=later)
    assert key.expires_at == later.replace(tzinfo=UTC)


def test_sessions_expire_end_and_record_activity(repo: Users) -> None:
    user = repo.create_user(email="e@example.org", username="erin", password=PASSWORD)
    one = repo.create_session(user.id, hours=1)
    two = repo.create_session(user.id, hours=1)
    three = repo.create_session(user.id, hours=1)
    found = repo.resolve_session(tokens.digest(one.token))
    assert found is not None and found.csrf_token == one.csrf_token and found.session_id == one.id
    assert found.expires_at == one.expires_at
    assert repo.resolve_session(tokens.digest(one.token), now=one.expires_at) is None

    repo.delete_session(one.id)
    assert repo.resolve_session(tokens.digest(one.token)) is None
    assert repo.delete_sessions(user.id, keep=two.id) == 1
    assert repo.resolve_session(tokens.digest(two.token)) is not None
    assert repo.resolve_session(tokens.digest(three.token)) is None
    repo.update_user(user.id, password="a new password", end_sessions=True)
    assert repo.resolve_session(tokens.digest(two.token)) is None

    key, _ = repo.create_key(user.id, "k")
    four = repo.create_session(user.id, hours=1)
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    repo.touch(key_ids=[key.id], user_ids=[user.id], session_ids=[four.id], at=moment)
    touched = repo.get_user(user.id)
    assert touched is not None and touched.last_active_at == moment
    got = repo.get_key(key.public_id)
    assert got is not None and got.last_used_at == moment
    assert repo.delete_expired_sessions(now=four.expires_at + timedelta(seconds=1)) == 1


def test_a_new_session_clears_the_users_dead_ones(repo: Users, migrated_engine: sa.Engine) -> None:
    user = repo.create_user(email="g@example.org", username="gina", password=PASSWORD)
    dead = repo.create_session(user.id, hours=-1)
    assert repo.resolve_session(tokens.digest(dead.token)) is None
    live = repo.create_session(user.id, hours=1)
    with migrated_engine.connect() as conn:
        ids = conn.execute(sa.select(web_sessions.c.id)).scalars().all()
    assert ids == [live.id]


def test_user_pages(repo: Users) -> None:
    for name in ("user1", "user2", "user3"):
        repo.create_user(email=f"{name}@example.org", username=name, password=PASSWORD)
    page, more = repo.list_users(limit=2)
    assert [u.username for u in page] == ["user1", "user2"] and more
    page, more = repo.list_users(limit=2, after=page[-1].public_id)
    assert [u.username for u in page] == ["user3"] and not more


def test_only_hashes_are_stored(repo: Users, migrated_engine: sa.Engine) -> None:
    canary_password = "canary-password-for-the-store"
    user = repo.create_user(email="f@example.org", username="frank", password=canary_password)
    _, canary_key = repo.create_key(user.id, "canary")
    session = repo.create_session(user.id, hours=1)
    with migrated_engine.connect() as conn:
        dump = "\n".join(
            repr(row) for table in metadata.sorted_tables for row in conn.execute(table.select())
        )
    assert canary_password not in dump
    assert canary_key not in dump and tokens.digest(canary_key) in dump
    assert session.token not in dump and tokens.digest(session.token) in dump
    assert "$argon2id$" in dump
