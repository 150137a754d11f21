"""The identity repository: users, their API keys and their web sessions (all of its SQL).

Invariants:
- a password hash never leaves this module: callers get ``User`` values (no hash) and ask
  ``check_login`` / ``check_password``; hashing happens before a write transaction opens,
  so no transaction holds the SQLite write lock for an argon2 computation;
- a plain API key or session token exists only in the return value of the call that made
  it; rows keep SHA-256 digests (``parley.security.tokens``);
- ``resolve_key`` answers only for a key that is neither revoked nor expired, of an active
  user; ``resolve_session`` only for an unexpired session of an active user. Each is one
  indexed lookup with no cache, so a revoke, an expiry or a disabled user takes effect on
  the very next request in every process;
- emails are stored lower-cased (unique whatever the case typed); usernames as typed;
- every time is UTC (SQLite keeps no offset: values read back are made aware again).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
import sqlalchemy
from sqlalchemy import Connection, Row, bindparam, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from parley.domain.times import utc, utc_or_none
from parley.domain.users import (
    ApiKey,
    NewSession,
    Principal,
    User,
    check_full_name,
    check_key_expiry,
    check_key_name,
    check_role,
    check_username,
    normalise_email,
)
from parley.errors import InvalidRequest
from parley.security import passwords, tokens
from parley.store.bulk import new_public_id
from parley.store.engine import IMMEDIATE
from parley.store.schema import TS, api_keys, users, web_sessions


class _Keep:
    """Marks an ``update_user`` field that is left as it is."""


KEEP: Final = _Keep()


class Users:
    """Users, API keys and web sessions on one engine. Every method is blocking: call it
    from the event loop through ``asyncio.to_thread``."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    # -- users ---------------------------------------------------------------------------

    def create_user(
        self,
        *,
        email: object,
        username: object,
        password: object,
        full_name: object = None,
        role: object = "user",
    ) -> User:
        """A new active user; ``InvalidRequest`` for bad values or a taken email/username."""
        email_value = normalise_email(email)
        username_value = check_username(username)
        row = {
            "email": email_value,
            "username": username_value,
            "full_name": check_full_name(full_name),
            "role": check_role(role),
        }
        password_hash = passwords.hash_password(passwords.check_password(password))
        now = datetime.now(UTC)
        values = {
            **row,
            "public_id": new_public_id(),
            "password_hash": password_hash,
            "is_active": True,
            "preferences": "{}",
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self._writing() as conn:
                self._refuse_taken(conn, email_value, username_value)
                user_id = conn.execute(
                    insert(users).values(values).returning(users.c.id)
                ).scalar_one()
        except IntegrityError:
            # Another process took the name between the check and the insert.
            raise InvalidRequest("a user with this email or username already exists") from None
        user = self.get_user(user_id)
        assert user is not None
        return user

    def get_user(self, user_id: int) -> User | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(*_USER_COLUMNS).where(users.c.id == user_id)).first()
        return _user(row) if row is not None else None

    def find_user(self, ref: str) -> User | None:
        """The user named by ``ref``: a username, an email or a public id."""
        ref = ref.strip()
        if "@" in ref:
            condition = users.c.email == ref.lower()
        else:
            try:
                public_id = uuid.UUID(ref)
            except ValueError:
                condition = users.c.username == ref
            else:
                condition = or_(users.c.username == ref, users.c.public_id == public_id)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(*_USER_COLUMNS).where(condition).order_by(users.c.id).limit(1)
            ).first()
        return _user(row) if row is not None else None

    def get_by_public_id(self, public_id: uuid.UUID) -> User | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(*_USER_COLUMNS).where(users.c.public_id == public_id)).first()
        return _user(row) if row is not None else None

    def list_users(
        self, *, limit: int = 50, after: uuid.UUID | None = None
    ) -> tuple[list[User], bool]:
        """A page of users in creation order, after the user ``after``; and whether more
        follow."""
        query = select(*_USER_COLUMNS).order_by(users.c.id).limit(limit + 1)
        if after is not None:
            anchor = select(users.c.id).where(users.c.public_id == after).scalar_subquery()
            # An unknown ``after`` compares with NULL: an empty page, as for keys.
            query = query.where(users.c.id > anchor)
        with self._engine.connect() as conn:
            found = [_user(row) for row in conn.execute(query)]
        return found[:limit], len(found) > limit

    def update_user(
        self,
        user_id: int,
        *,
        full_name: object = KEEP,
        preferences: object = KEEP,
        role: object = KEEP,
        is_active: object = KEEP,
        password: object = KEEP,
        end_sessions: bool = False,
        keep_session: int | None = None,
    ) -> User | None:
        """Change the given fields (None if there is no such user). ``end_sessions`` also
        deletes the user's web sessions, except ``keep_session``."""
        values: dict[str, Any] = {}
        if not isinstance(full_name, _Keep):
            values["full_name"] = check_full_name(full_name)
        if not isinstance(preferences, _Keep):
            if not isinstance(preferences, dict):
                raise InvalidRequest("'preferences' must be a JSON object", "preferences")
            values["preferences"] = orjson.dumps(preferences).decode()
        if not isinstance(role, _Keep):
            values["role"] = check_role(role)
        if not isinstance(is_active, _Keep):
            if not isinstance(is_active, bool):
                raise InvalidRequest("'is_active' must be true or false", "is_active")
            values["is_active"] = is_active
        if not isinstance(password, _Keep):
            values["password_hash"] = passwords.hash_password(passwords.check_password(password))
        values["updated_at"] = datetime.now(UTC)
        with self._writing() as conn:
            changed = conn.execute(update(users).where(users.c.id == user_id).values(values))
            if changed.rowcount == 0:
                return None
            if end_sessions:
                _delete_sessions(conn, user_id, keep_session)
        return self.get_user(user_id)

    def check_login(self, login: str, password: str) -> User | None:
        """The active user whose email or username is ``login`` and whose password is
        ``password``; None otherwise, after the same work whatever the reason."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(*_LOGIN_COLUMNS)
                .where(or_(users.c.email == login.strip().lower(), users.c.username == login))
                .order_by(users.c.id)
                .limit(1)
            ).first()
        if row is None:
            passwords.burn(password)
            return None
        if not passwords.verify(row.password_hash, password) or not row.is_active:
            return None
        if passwords.needs_rehash(row.password_hash):
            rehashed = passwords.hash_password(password)
            with self._writing() as conn:
                conn.execute(
                    update(users).where(users.c.id == row.id).values(password_hash=rehashed)
                )
        return _user(row)

    def check_password(self, user_id: int, password: str) -> bool:
        """Whether ``password`` is the user's current password."""
        with self._engine.connect() as conn:
            stored = conn.execute(
                select(users.c.password_hash).where(users.c.id == user_id)
            ).scalar_one_or_none()
        if stored is None:
            passwords.burn(password)
            return False
        return passwords.verify(stored, password)

    # -- API keys ------------------------------------------------------------------------

    def create_key(
        self, user_id: int, name: object, expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        """A new key for the user: its description and the plain key (returned only here).
        ``expires_at`` (None: never) must pass ``check_key_expiry``."""
        plain = tokens.new_api_key()
        now = datetime.now(UTC)
        values = {
            "public_id": new_public_id(),
            "user_id": user_id,
            "name": check_key_name(name),
            "prefix": tokens.display_prefix(plain),
            "key_hash": tokens.digest(plain),
            "created_at": now,
            "expires_at": check_key_expiry(expires_at, now),
        }
        with self._writing() as conn:
            key_id = conn.execute(
                insert(api_keys).values(values).returning(api_keys.c.id)
            ).scalar_one()
        key = self._key_where(api_keys.c.id == key_id)
        assert key is not None
        return key, plain

    def list_keys(
        self, user_id: int | None = None, *, limit: int = 100, after: uuid.UUID | None = None
    ) -> tuple[list[ApiKey], bool]:
        """Keys newest first (a user's, or everybody's), after the key ``after``."""
        query = _key_query().order_by(api_keys.c.id.desc()).limit(limit + 1)
        if user_id is not None:
            query = query.where(api_keys.c.user_id == user_id)
        if after is not None:
            # The anchor must be one of the listed keys: anchored on anyone's, a page
            # would tell whether another user's key id exists.
            anchor_query = select(api_keys.c.id).where(api_keys.c.public_id == after)
            if user_id is not None:
                anchor_query = anchor_query.where(api_keys.c.user_id == user_id)
            query = query.where(api_keys.c.id < anchor_query.scalar_subquery())
        with self._engine.connect() as conn:
            found = [_key(row) for row in conn.execute(query)]
        return found[:limit], len(found) > limit

    def get_key(self, public_id: uuid.UUID) -> ApiKey | None:
        return self._key_where(api_keys.c.public_id == public_id)

    def revoke_key(self, key_id: int) -> ApiKey | None:
        """Revoke the key (once: a second revoke keeps the first time)."""
        with self._writing() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        return self._key_where(api_keys.c.id == key_id)

    def resolve_key(self, key_hash: str, now: datetime | None = None) -> Principal | None:
        """Who the key with digest ``key_hash`` stands for, if it may be used now."""
        params = {"key_hash": key_hash, "now": now or datetime.now(UTC)}
        with self._engine.connect() as conn:
            row = conn.execute(_RESOLVE_KEY, params).first()
        if row is None:
            return None
        return Principal(user_id=row.user_id, role=row.role, api_key_id=row.id)

    def _key_where(self, condition: Any) -> ApiKey | None:
        with self._engine.connect() as conn:
            row = conn.execute(_key_query().where(condition)).first()
        return _key(row) if row is not None else None

    # -- web sessions --------------------------------------------------------------------

    def create_session(self, user_id: int, hours: float) -> NewSession:
        token = tokens.new_session_token()
        csrf = tokens.new_csrf_token()
        now = datetime.now(UTC)
        expires_at = now + timedelta(hours=hours)
        with self._writing() as conn:
            # The user's dead sessions go here, so rows cannot pile up (indexed by user).
            conn.execute(
                delete(web_sessions).where(
                    web_sessions.c.user_id == user_id, web_sessions.c.expires_at <= now
                )
            )
            session_id = conn.execute(
                insert(web_sessions)
                .values(
                    token_hash=tokens.digest(token),
                    csrf_token=csrf,
                    user_id=user_id,
                    created_at=now,
                    expires_at=expires_at,
                    last_seen_at=now,
                )
                .returning(web_sessions.c.id)
            ).scalar_one()
        return NewSession(id=session_id, token=token, csrf_token=csrf, expires_at=expires_at)

    def resolve_session(self, token_hash: str, now: datetime | None = None) -> Principal | None:
        """Who the session with digest ``token_hash`` stands for, if it has not expired."""
        params = {"token_hash": token_hash, "now": now or datetime.now(UTC)}
        with self._engine.connect() as conn:
            row = conn.execute(_RESOLVE_SESSION, params).first()
        if row is None:
            return None
        return Principal(
            user_id=row.user_id,
            role=row.role,
            session_id=row.id,
            csrf_token=row.csrf_token,
            expires_at=utc(row.expires_at),
        )

    def delete_session(self, session_id: int) -> None:
        with self._writing() as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.id == session_id))

    def delete_sessions(self, user_id: int, keep: int | None = None) -> int:
        """Delete every session of the user (except ``keep``); how many were deleted."""
        with self._writing() as conn:
            return _delete_sessions(conn, user_id, keep)

    def delete_expired_sessions(self, now: datetime | None = None) -> int:
        with self._writing() as conn:
            result = conn.execute(
                delete(web_sessions).where(web_sessions.c.expires_at <= (now or datetime.now(UTC)))
            )
            return result.rowcount

    # -- activity ------------------------------------------------------------------------

    def touch(
        self,
        *,
        key_ids: Iterable[int] = (),
        user_ids: Iterable[int] = (),
        session_ids: Iterable[int] = (),
        at: datetime | None = None,
    ) -> None:
        """Record use: ``last_used_at`` of keys, ``last_active_at`` of users,
        ``last_seen_at`` of sessions, all in one transaction."""
        moment = at or datetime.now(UTC)
        plan = (
            (api_keys, api_keys.c.last_used_at, sorted(set(key_ids))),
            (users, users.c.last_active_at, sorted(set(user_ids))),
            (web_sessions, web_sessions.c.last_seen_at, sorted(set(session_ids))),
        )
        if not any(ids for _, _, ids in plan):
            return
        with self._writing() as conn:
            for table, column, ids in plan:
                if ids:
                    conn.execute(
                        update(table).where(table.c.id.in_(ids)).values({column.name: moment})
                    )

    # -- helpers -------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        # BEGIN IMMEDIATE on SQLite: take the write lock up front, waiting for the busy
        # timeout, rather than failing when a read lock cannot be upgraded.
        with self._engine.connect() as conn:
            conn = conn.execution_options(**{IMMEDIATE: True})
            with conn.begin():
                yield conn

    @staticmethod
    def _refuse_taken(conn: Connection, email: str, username: str) -> None:
        taken = conn.execute(
            select(users.c.email, users.c.username).where(
                or_(users.c.email == email, users.c.username == username)
            )
        ).first()
        if taken is None:
            return
        if taken.email == email:
            raise InvalidRequest("a user with this email already exists", "email")
        raise InvalidRequest("a user with this username already exists", "username")


_USER_COLUMNS: tuple[ColumnElement[Any], ...] = (
    users.c.id,
    users.c.public_id,
    users.c.email,
    users.c.username,
    users.c.full_name,
    users.c.role,
    users.c.is_active,
    users.c.preferences,
    users.c.created_at,
    users.c.updated_at,
    users.c.last_active_at,
)
_LOGIN_COLUMNS: tuple[ColumnElement[Any], ...] = (*_USER_COLUMNS, users.c.password_hash)


# The two lookups every authenticated request makes, built once (immutable statements):
# SQLAlchemy then finds their compiled form in its cache without rebuilding them.
_RESOLVE_KEY = (
    select(api_keys.c.id, users.c.id.label("user_id"), users.c.role)
    .join(users, users.c.id == api_keys.c.user_id)
    .where(
        api_keys.c.key_hash == bindparam("key_hash"),
        api_keys.c.revoked_at.is_(None),
        or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > bindparam("now", type_=TS)),
        users.c.is_active.is_(True),
    )
)
_RESOLVE_SESSION = (
    select(
        web_sessions.c.id,
        web_sessions.c.csrf_token,
        web_sessions.c.expires_at,
        users.c.id.label("user_id"),
        users.c.role,
    )
    .join(users, users.c.id == web_sessions.c.user_id)
    .where(
        web_sessions.c.token_hash == bindparam("token_hash"),
        web_sessions.c.expires_at > bindparam("now", type_=TS),
        users.c.is_active.is_(True),
    )
)


def _key_query() -> sqlalchemy.Select[Any]:
    return select(
        api_keys.c.id,
        api_keys.c.public_id,
        api_keys.c.user_id,
        users.c.public_id.label("user_public_id"),
        users.c.username,
        api_keys.c.name,
        api_keys.c.prefix,
        api_keys.c.created_at,
        api_keys.c.expires_at,
        api_keys.c.revoked_at,
        api_keys.c.last_used_at,
    ).join(users, users.c.id == api_keys.c.user_id)


def _delete_sessions(conn: Connection, user_id: int, keep: int | None) -> int:
    query = delete(web_sessions).where(web_sessions.c.user_id == user_id)
    if keep is not None:
        query = query.where(web_sessions.c.id != keep)
    return conn.execute(query).rowcount


def _user(row: Row[Any]) -> User:
    preferences = orjson.loads(row.preferences)
    return User(
        id=row.id,
        public_id=row.public_id,
        email=row.email,
        username=row.username,
        full_name=row.full_name,
        role=row.role,
        is_active=bool(row.is_active),
        preferences=preferences if isinstance(preferences, dict) else {},
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
        last_active_at=utc_or_none(row.last_active_at),
    )


def _key(row: Row[Any]) -> ApiKey:
    data = row._mapping
    return ApiKey(
        id=data["id"],
        public_id=data["public_id"],
        user_id=data["user_id"],
        user_public_id=data["user_public_id"],
        username=data["username"],
        name=data["name"],
        prefix=data["prefix"],
        created_at=utc(data["created_at"]),
        expires_at=utc_or_none(data["expires_at"]),
        revoked_at=utc_or_none(data["revoked_at"]),
        last_used_at=utc_or_none(data["last_used_at"]),
    )
