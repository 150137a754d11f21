"""The provider repository on SQLite and PostgreSQL: configurations, users' own keys, and
history that survives deleting a configuration."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from parley.errors import InvalidRequest
from parley.security.vault import Vault
from parley.store.bulk import new_public_id
from parley.store.provider_configs import ProviderConfigStore
from parley.store.schema import conversations, metadata, users

CANARY = "sk-canary-STORE-5f0c1a2b3c4d"


def add_user(engine: sa.Engine, name: str) -> int:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        return int(
            conn.execute(
                sa.insert(users)
                .values(
                    public_id=new_public_id(),
                    email=f"{name}@example.com",
                    username=name,
                    password_hash="not-a-real-hash",
                    role="user",
                    is_active=True,
                    preferences="{}",
                    created_at=now,
                    updated_at=now,
                )
                .returning(users.c.id)
            ).scalar_one()
        )


def dump(engine: sa.Engine) -> str:
    """Every row of every table, as one string."""
    out: list[str] = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            out.extend(repr(tuple(row)) for row in conn.execute(sa.select(table)))
    return "\n".join(out)


def test_configuration_crud(migrated_engine: sa.Engine) -> None:
    store = ProviderConfigStore(migrated_engine)
    vault = Vault("test secret")
    created = store.create_config(
        {
            "name": "house",
            "kind": "openai",
            "model": "gpt-4o-mini",
            "system_prompt": "Answer in French.",
            "temperature": 0.2,
            "api_key_ciphertext": vault.encrypt(CANARY),
            "extra": {"seed": 7},
        }
    )
    assert created.is_active and created.has_api_key
    assert created.extra == {"seed": 7} and created.created_at.tzinfo is not None
    assert CANARY not in repr(created)
    assert store.get_config(created.public_id) == created
    assert store.get_by_name("house") == created
    assert [c.name for c in store.list_configs()] == ["house"]

    updated = store.update_config(
        created.public_id, {"temperature": None, "api_key_ciphertext": None, "is_active": False}
    )
    assert updated is not None
    assert updated.temperature is None and not updated.has_api_key and not updated.is_active
    assert updated.updated_at >= created.updated_at
    assert store.update_config(uuid.uuid4(), {"model": "x"}) is None

    assert store.delete_config(created.public_id)
    assert store.get_config(created.public_id) is None
    assert not store.delete_config(created.public_id)


def test_names_are_unique_whatever_the_path(migrated_engine: sa.Engine) -> None:
    store = ProviderConfigStore(migrated_engine)
    store.create_config({"name": "a", "kind": "openai", "model": "m"})
    other = store.create_config({"name": "b", "kind": "openai", "model": "m"})
    with pytest.raises(InvalidRequest, match="named 'a' already exists"):
        store.create_config({"name": "a", "kind": "ollama", "model": "m"})
    with pytest.raises(InvalidRequest, match="named 'a' already exists"):
        store.update_config(other.public_id, {"name": "a"})
    assert [c.name for c in store.list_configs()] == ["a", "b"]


def test_the_key_is_stored_only_as_ciphertext(migrated_engine: sa.Engine) -> None:
    store = ProviderConfigStore(migrated_engine)
    vault = Vault("test secret")
    user = add_user(migrated_engine, "ada")
    config = store.create_config(
        {
            "name": "house",
            "kind": "openai",
            "model": "m",
            "api_key_ciphertext": vault.encrypt(CANARY),
        }
    )
    store.put_user_key(user, "house", vault.encrypt(CANARY + "-byok"))
    rows = dump(migrated_engine)
    assert CANARY not in rows
    stored = store.get_config(config.public_id)
    assert stored is not None and stored.api_key_ciphertext is not None
    assert vault.decrypt(stored.api_key_ciphertext) == CANARY
    [key] = store.user_keys(user)
    assert vault.decrypt(key.ciphertext) == CANARY + "-byok"


def test_deleting_a_configuration_keeps_the_conversations_that_used_it(
    migrated_engine: sa.Engine,
) -> None:
    store = ProviderConfigStore(migrated_engine)
    config = store.create_config({"name": "house", "kind": "openai", "model": "m"})
    now = datetime.now(UTC)
    with migrated_engine.begin() as conn:
        conversation = conn.execute(
            sa.insert(conversations)
            .values(
                public_id=new_public_id(),
                created_at=now,
                updated_at=now,
                title="kept",
                source="api",
                default_model="house",
                provider_config_id=config.id,
            )
            .returning(conversations.c.id)
        ).scalar_one()

    assert store.delete_config(config.public_id)

    with migrated_engine.connect() as conn:
        row = conn.execute(sa.select(conversations).where(conversations.c.id == conversation)).one()
    assert row.title == "kept" and row.provider_config_id is None


def test_user_keys_replace_rename_and_go_with_their_configuration(
    migrated_engine: sa.Engine,
) -> None:
    store = ProviderConfigStore(migrated_engine)
    ada, bob = add_user(migrated_engine, "ada"), add_user(migrated_engine, "bob")
    config = store.create_config({"name": "house", "kind": "openai", "model": "m"})

    first = store.put_user_key(ada, "house", "ciphertext-1")
    again = store.put_user_key(ada, "house", "ciphertext-2")
    assert again.created_at == first.created_at and again.updated_at >= first.updated_at
    assert [(k.provider, k.ciphertext) for k in store.user_keys(ada)] == [("house", "ciphertext-2")]
    store.put_user_key(ada, "config-file-provider", "ciphertext-3")
    store.put_user_key(bob, "house", "ciphertext-4")
    assert "ciphertext" not in repr(store.user_keys(ada))

    # A rename takes the users' keys along.
    store.update_config(config.public_id, {"name": "home"})
    assert [k.provider for k in store.user_keys(ada)] == ["config-file-provider", "home"]

    # A delete takes them away: a later "home" may point somewhere else.
    store.delete_config(config.public_id)
    assert [k.provider for k in store.user_keys(ada)] == ["config-file-provider"]
    assert store.user_keys(bob) == []

    assert store.delete_user_key(ada, "config-file-provider")
    assert not store.delete_user_key(ada, "config-file-provider")
    assert store.user_keys(ada) == []
