"""The provider repository: provider configurations and users' own provider keys (BYOK).

Invariants:
- an API key reaches this module only as ciphertext (``parley.security.vault``) and leaves
  it only as ciphertext; values carry it with ``repr=False`` so no log line shows even that;
- configuration names are unique (the table's constraint decides, so two processes cannot
  both create one name); a taken name is an ``InvalidRequest``;
- deleting a configuration keeps history: conversations that used it keep their rows with
  ``provider_config_id`` NULL (the foreign key's ``ON DELETE SET NULL``), and the request
  log names providers as text. The users' keys for it go with it: a later configuration
  of the same name may point elsewhere, and a key is sent only where its owner put it.
  Renaming moves the users' keys to the new name in the same transaction;
- one key per user and provider name; setting it again replaces it;
- every time is UTC (SQLite keeps no offset: values read back are made aware again).

Every method blocks: call it through ``asyncio.to_thread`` from the event loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy
from sqlalchemy import Connection, Row, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from parley.domain.times import utc
from parley.errors import InvalidRequest, StoreError
from parley.store.bulk import new_public_id
from parley.store.engine import IMMEDIATE
from parley.store.schema import provider_configs, provider_keys

# Columns a caller may set; ``api_key_ciphertext`` is the only form a key takes here.
FIELDS = frozenset(
    {
        "name",
        "kind",
        "model",
        "system_prompt",
        "temperature",
        "max_tokens",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "is_active",
        "base_url",
        "api_key_ciphertext",
        "extra",
    }
)


@dataclass(frozen=True, slots=True)
class StoredConfig:
    """One provider configuration row. ``base_url`` None means the kind's default."""

    id: int
    public_id: uuid.UUID
    name: str
    kind: str
    model: str
    system_prompt: str | None
    temperature: float | None
    max_tokens: int | None
    top_p: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    is_active: bool
    base_url: str | None
    api_key_ciphertext: str | None = field(repr=False)
    extra: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def has_api_key(self) -> bool:
        return self.api_key_ciphertext is not None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A user's own key for one provider (by provider name)."""

    user_id: int
    provider: str
    ciphertext: str = field(repr=False)
    created_at: datetime
    updated_at: datetime


class ProviderConfigStore:
    """Provider configurations and BYOK keys on one engine."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self._engine = engine

    # -- configurations ---------------------------------------------------------------

    def list_configs(self) -> list[StoredConfig]:
        """Every configuration, by name."""
        with self._engine.connect() as conn:
            query = select(provider_configs).order_by(provider_configs.c.name)
            return [_config(row) for row in conn.execute(query)]

    def get_config(self, public_id: uuid.UUID) -> StoredConfig | None:
        with self._engine.connect() as conn:
            return _one_config(conn, provider_configs.c.public_id == public_id)

    def get_by_name(self, name: str) -> StoredConfig | None:
        with self._engine.connect() as conn:
            return _one_config(conn, provider_configs.c.name == name)

    def create_config(self, values: Mapping[str, Any]) -> StoredConfig:
        """Insert a configuration (``values``: keys of ``FIELDS``; name, kind and model
        required); ``InvalidRequest`` when the name is taken."""
        _check_fields(values)
        now = datetime.now(UTC)
        row: dict[str, Any] = {
            "public_id": new_public_id(),
            "is_active": True,
            "extra": {},
            **values,
            "created_at": now,
            "updated_at": now,
        }
        row["extra"] = _json(row["extra"])
        try:
            with self._writing() as conn:
                conn.execute(insert(provider_configs).values(row))
                created = _one_config(conn, provider_configs.c.public_id == row["public_id"])
        except IntegrityError:
            raise _name_taken(str(values.get("name"))) from None
        assert created is not None
        return created

    def update_config(
        self, public_id: uuid.UUID, changes: Mapping[str, Any]
    ) -> StoredConfig | None:
        """Apply ``changes`` (keys of ``FIELDS``); None when there is no such row."""
        _check_fields(changes)
        values = dict(changes)
        if "extra" in values:
            values["extra"] = _json(values["extra"])
        values["updated_at"] = datetime.now(UTC)
        where = provider_configs.c.public_id == public_id
        try:
            with self._writing() as conn:
                before = _one_config(conn, where)
                if before is None:
                    return None
                conn.execute(update(provider_configs).where(where).values(values))
                new_name = values.get("name", before.name)
                if new_name != before.name:
                    conn.execute(
                        update(provider_keys)
                        .where(provider_keys.c.provider == before.name)
                        .values(provider=new_name)
                    )
                return _one_config(conn, where)
        except IntegrityError:
            raise _name_taken(str(values.get("name"))) from None

    def delete_config(self, public_id: uuid.UUID) -> bool:
        """Delete a configuration and the users' keys for it; False when there is none."""
        where = provider_configs.c.public_id == public_id
        with self._writing() as conn:
            found = _one_config(conn, where)
            if found is None:
                return False
            conn.execute(delete(provider_keys).where(provider_keys.c.provider == found.name))
            conn.execute(delete(provider_configs).where(where))
        return True

    # -- users' own keys --------------------------------------------------------------

    def user_keys(self, user_id: int) -> list[StoredKey]:
        """The user's keys, by provider name."""
        query = (
            select(provider_keys)
            .where(provider_keys.c.user_id == user_id)
            .order_by(provider_keys.c.provider)
        )
        with self._engine.connect() as conn:
            return [_key(row) for row in conn.execute(query)]

    def put_user_key(self, user_id: int, provider: str, ciphertext: str) -> StoredKey:
        """Set (or replace) the user's key for ``provider``."""
        where = (provider_keys.c.user_id == user_id) & (provider_keys.c.provider == provider)
        for last_try in (False, True):
            now = datetime.now(UTC)
            try:
                with self._writing() as conn:
                    changed = conn.execute(
                        update(provider_keys)
                        .where(where)
                        .values(ciphertext=ciphertext, updated_at=now)
                    ).rowcount
                    if not changed:
                        conn.execute(
                            insert(provider_keys).values(
                                user_id=user_id,
                                provider=provider,
                                ciphertext=ciphertext,
                                created_at=now,
                                updated_at=now,
                            )
                        )
                    stored = conn.execute(select(provider_keys).where(where)).one()
                return _key(stored)
            except IntegrityError:
                # A concurrent first PUT inserted the row: update it instead (once).
                if last_try:
                    raise
        raise AssertionError("unreachable")

    def delete_user_key(self, user_id: int, provider: str) -> bool:
        """Remove the user's key for ``provider``; False when there was none."""
        where = (provider_keys.c.user_id == user_id) & (provider_keys.c.provider == provider)
        with self._writing() as conn:
            return bool(conn.execute(delete(provider_keys).where(where)).rowcount)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        # BEGIN IMMEDIATE on SQLite: take the write lock up front, waiting for the busy
        # timeout, rather than failing when a read lock cannot be upgraded.
        with self._engine.connect() as conn:
            conn = conn.execution_options(**{IMMEDIATE: True})
            with conn.begin():
                yield conn


def _check_fields(values: Mapping[str, Any]) -> None:
    unknown = set(values) - FIELDS
    if unknown:
        raise ValueError(f"not provider configuration fields: {', '.join(sorted(unknown))}")


def _name_taken(name: str) -> InvalidRequest:
    return InvalidRequest(f"a provider configuration named '{name}' already exists", "name")


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _one_config(conn: Connection, where: Any) -> StoredConfig | None:
    row = conn.execute(select(provider_configs).where(where)).first()
    return _config(row) if row is not None else None


def _config(row: Row[Any]) -> StoredConfig:
    data = row._mapping
    extra = orjson.loads(data["extra"])
    if not isinstance(extra, dict):
        raise StoreError(f"provider configuration {data['name']}: extra is not a JSON object")
    return StoredConfig(
        id=data["id"],
        public_id=data["public_id"],
        name=data["name"],
        kind=data["kind"],
        model=data["model"],
        system_prompt=data["system_prompt"],
        temperature=data["temperature"],
        max_tokens=data["max_tokens"],
        top_p=data["top_p"],
        frequency_penalty=data["frequency_penalty"],
        presence_penalty=data["presence_penalty"],
        is_active=bool(data["is_active"]),
        base_url=data["base_url"],
        api_key_ciphertext=data["api_key_ciphertext"],
        extra=extra,
        created_at=utc(data["created_at"]),
        updated_at=utc(data["updated_at"]),
    )


def _key(row: Row[Any]) -> StoredKey:
    data = row._mapping
    return StoredKey(
        user_id=data["user_id"],
        provider=data["provider"],
        ciphertext=data["ciphertext"],
        created_at=utc(data["created_at"]),
        updated_at=utc(data["updated_at"]),
    )
