"""Database provider configurations and users' own keys at the gateway: a real engine
(SQLite and PostgreSQL), a real fake upstream over HTTP, the real adapters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from parley.domain.exchange import Exchange
from parley.domain.messages import ChatRequest, Message
from parley.errors import ConfigError, ModelNotFound, UpstreamHTTPError
from parley.gateway.byok import UserKeys
from parley.gateway.directory import ProviderDirectory
from parley.gateway.pricing import PriceBook
from parley.gateway.router import Router
from parley.gateway.service import Gateway
from parley.providers.registry import build_providers
from parley.security.vault import Vault
from parley.settings import ProviderConfig, RetryPolicy, Secret, Settings
from parley.store.provider_configs import ProviderConfigStore
from tests.fakes.openai_upstream import FakeOpenAI
from tests.store.test_provider_configs import add_user

CONFIGURED = "sk-canary-CONFIGURED-7f3e9a"
ADA_KEY = "sk-canary-ADA-OWN-KEY-41c2d8"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    # Accepts only Ada's own key: the configured key is refused (and echoed, like OpenAI).
    with FakeOpenAI(api_key=ADA_KEY) as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def settings_with(settings: Settings, upstream: FakeOpenAI) -> Settings:
    """``settings`` plus one config-file provider ``up`` with the configured key."""
    up = ProviderConfig(
        name="up",
        kind="openai",
        base_url=upstream.base_url,
        api_key=Secret(CONFIGURED),
        models=("gpt-4o-mini",),
    )
    return replace(settings, providers=(up,), retry=RetryPolicy(attempts=1))


def gateway_for(
    settings: Settings, engine: sa.Engine, session: aiohttp.ClientSession, vault: Vault
) -> tuple[Gateway, ProviderDirectory, ProviderConfigStore]:
    store = ProviderConfigStore(engine)
    directory = ProviderDirectory(store, vault, session, settings, ttl=0.2)
    router = Router(build_providers(settings, session), settings.aliases, directory)
    gateway = Gateway(
        router, PriceBook({}, {}), settings.retry, user_keys=UserKeys(store, vault, session)
    )
    return gateway, directory, store


async def ask(
    gateway: Gateway, model: str, user_id: int | None = None, **fields: Any
) -> tuple[str, Exchange]:
    messages = fields.pop("messages", (Message("user", "hello"),))
    request = ChatRequest(model=model, messages=tuple(messages), **fields)
    exchange = Exchange(
        model_requested=model, messages=request.messages, started_at=datetime.now(UTC)
    )
    exchange.user_id = user_id
    chunks = [chunk async for chunk in gateway.stream(request, exchange)]
    raw = chunks[-1].raw or b""
    return raw.decode(), exchange


async def test_configuration_routes_with_its_key_and_defaults(
    settings: Settings, migrated_engine: sa.Engine, session: aiohttp.ClientSession
) -> None:
    with FakeOpenAI(api_key=CONFIGURED) as upstream:
        settings = settings_with(settings, upstream)
        vault = Vault("test secret")
        gateway, directory, store = gateway_for(settings, migrated_engine, session, vault)
        store.create_config(
            {
                "name": "house",
                "kind": "openai",
                "model": "gpt-4o-mini",
                "base_url": upstream.base_url,
                "api_key_ciphertext": vault.encrypt(CONFIGURED),
                "system_prompt": "Answer in French.",
                "temperature": 0.3,
                "max_tokens": 64,
                "presence_penalty": 0.5,
                "extra": {"seed": 7},
            }
        )
        await directory.reload()

        answer, exchange = await ask(gateway, "house")
        assert "echo: hello" in answer
        [(_, headers, body)] = upstream.received
        assert headers["Authorization"] == f"Bearer {CONFIGURED}"
        assert body["model"] == "gpt-4o-mini"
        assert body["messages"][0] == {"role": "system", "content": "Answer in French."}
        assert (body["temperature"], body["max_tokens"], body["presence_penalty"]) == (
            0.3,
            64,
            0.5,
        )
        assert body["seed"] == 7
        # The record keeps what the client sent: no system message was sent by it.
        assert [m.role for m in exchange.messages] == ["user"]
        assert exchange.attempts[0].provider == "house"

        # Another model of the same configuration, and a request that sets its own.
        upstream.clear()
        await ask(
            gateway,
            "house/gpt-4o",
            messages=(Message("system", "Be terse."), Message("user", "hi")),
            temperature=1.0,
            extra={"seed": 1},
        )
        [(_, _, body)] = upstream.received
        assert body["model"] == "gpt-4o"
        assert [m["content"] for m in body["messages"]] == ["Be terse.", "hi"]
        assert body["temperature"] == 1.0 and body["seed"] == 1 and body["max_tokens"] == 64


async def test_inactive_deleted_and_clashing_configurations(
    settings: Settings, migrated_engine: sa.Engine, session: aiohttp.ClientSession
) -> None:
    with FakeOpenAI() as upstream:
        settings = settings_with(settings, upstream)
        gateway, directory, store = gateway_for(
            settings, migrated_engine, session, Vault("test secret")
        )
        config = store.create_config(
            {"name": "house", "kind": "openai", "model": "m", "base_url": upstream.base_url}
        )
        # A row named like a config-file provider (the API refuses it): the file wins.
        store.create_config({"name": "up", "kind": "ollama", "model": "llama"})
        await directory.reload()
        assert (await gateway.candidates("up/x", None))[0].provider.config.kind == "openai"
        assert [c.id for c in await gateway.candidates("house", None)] == ["house/m"]

        store.update_config(config.public_id, {"is_active": False})
        await directory.reload()
        with pytest.raises(ModelNotFound):
            await gateway.candidates("house", None)
        store.delete_config(config.public_id)
        await directory.reload()
        with pytest.raises(ModelNotFound):
            await gateway.candidates("house/m", None)


async def test_another_process_sees_a_change_within_the_ttl(
    settings: Settings, migrated_engine: sa.Engine, session: aiohttp.ClientSession
) -> None:
    with FakeOpenAI() as upstream:
        settings = settings_with(settings, upstream)
        vault = Vault("test secret")
        gateway, directory, _ = gateway_for(settings, migrated_engine, session, vault)
        await directory.reload()
        # "Another process": its own store on its own engine writes the row.
        other_engine = sa.create_engine(migrated_engine.url)
        try:
            ProviderConfigStore(other_engine).create_config(
                {"name": "late", "kind": "openai", "model": "m", "base_url": upstream.base_url}
            )
        finally:
            other_engine.dispose()
        await asyncio.sleep(0.25)  # the directory's ttl is 0.2 s
        assert [c.id for c in await gateway.candidates("late", None)] == ["late/m"]
        # Config-file traffic never asks the directory.
        assert not gateway.router.needs_directory("up/gpt-4o-mini")
        assert not gateway.router.needs_directory("gpt-4o-mini")


async def test_users_own_key_is_used_for_their_requests_only(
    settings: Settings,
    migrated_engine: sa.Engine,
    session: aiohttp.ClientSession,
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_with(settings, upstream)
    vault = Vault("test secret")
    gateway, directory, store = gateway_for(settings, migrated_engine, session, vault)
    store.create_config(
        {
            "name": "house",
            "kind": "openai",
            "model": "gpt-4o-mini",
            "base_url": upstream.base_url,
            "api_key_ciphertext": vault.encrypt(CONFIGURED),
            "system_prompt": "Be kind.",
        }
    )
    await directory.reload()
    ada, bob = add_user(migrated_engine, "ada"), add_user(migrated_engine, "bob")
    store.put_user_key(ada, "up", vault.encrypt(ADA_KEY))
    store.put_user_key(ada, "house", vault.encrypt(ADA_KEY))

    for model in ("up/gpt-4o-mini", "house"):
        upstream.clear()
        answer, _ = await ask(gateway, model, ada)
        assert "echo: hello" in answer
        [(_, headers, body)] = upstream.received
        assert headers["Authorization"] == f"Bearer {ADA_KEY}"
    # Her key keeps the configuration's defaults.
    assert body["messages"][0]["content"] == "Be kind."

    # Bob, and the master key (no user), go with the configured key: refused upstream,
    # which echoes the key it got; the error says nothing of either key.
    for user in (bob, None):
        with pytest.raises(UpstreamHTTPError) as caught:
            await ask(gateway, "up/gpt-4o-mini", user)
        assert caught.value.status_code == 401
        assert CONFIGURED not in caught.value.message and "[redacted]" in caught.value.message
        assert ADA_KEY not in caught.value.message
    assert upstream.received[-1][1]["Authorization"] == f"Bearer {CONFIGURED}"

    # A wrong key of Ada's own is scrubbed from her error too.
    wrong = ADA_KEY + "-typo"
    store.put_user_key(ada, "up", vault.encrypt(wrong))
    assert gateway.user_keys is not None
    gateway.user_keys.forget(ada)
    with pytest.raises(UpstreamHTTPError) as caught:
        await ask(gateway, "up/gpt-4o-mini", ada)
    assert wrong not in caught.value.message and ADA_KEY not in caught.value.message
    assert upstream.received[-1][1]["Authorization"] == f"Bearer {wrong}"

    # Deleted: her requests go back to the configured key.
    store.delete_user_key(ada, "up")
    gateway.user_keys.forget(ada)
    with pytest.raises(UpstreamHTTPError):
        await ask(gateway, "up/gpt-4o-mini", ada)
    assert upstream.received[-1][1]["Authorization"] == f"Bearer {CONFIGURED}"

    for secret in (CONFIGURED, ADA_KEY):
        assert secret not in caplog.text


async def test_a_changed_key_elsewhere_is_seen_within_the_ttl(
    settings: Settings,
    migrated_engine: sa.Engine,
    session: aiohttp.ClientSession,
    upstream: FakeOpenAI,
) -> None:
    settings = settings_with(settings, upstream)
    vault = Vault("test secret")
    store = ProviderConfigStore(migrated_engine)
    directory = ProviderDirectory(store, vault, session, settings)
    keys = UserKeys(store, vault, session, ttl=0.2)
    gateway = Gateway(
        Router(build_providers(settings, session), {}, directory),
        PriceBook({}, {}),
        settings.retry,
        user_keys=keys,
    )
    ada = add_user(migrated_engine, "ada")
    with pytest.raises(UpstreamHTTPError):
        await ask(gateway, "up/gpt-4o-mini", ada)
    store.put_user_key(ada, "up", vault.encrypt(ADA_KEY))  # by "another process"
    await asyncio.sleep(0.25)
    answer, _ = await ask(gateway, "up/gpt-4o-mini", ada)
    assert "echo: hello" in answer


async def test_a_key_from_another_master_secret_fails_with_the_cause(
    settings: Settings, migrated_engine: sa.Engine, session: aiohttp.ClientSession
) -> None:
    with FakeOpenAI() as upstream:
        settings = settings_with(settings, upstream)
        old = Vault("the old secret")
        gateway, directory, store = gateway_for(
            settings, migrated_engine, session, Vault("a new secret")
        )
        store.create_config(
            {
                "name": "house",
                "kind": "openai",
                "model": "m",
                "base_url": upstream.base_url,
                "api_key_ciphertext": old.encrypt(CONFIGURED),
            }
        )
        await directory.reload()
        with pytest.raises(ConfigError, match="another master secret") as caught:
            await ask(gateway, "house")
        assert CONFIGURED not in caught.value.message
        assert upstream.received == []
        # The config-file provider is untouched by it.
        answer, _ = await ask(gateway, "up/gpt-4o-mini")
        assert "echo: hello" in answer
