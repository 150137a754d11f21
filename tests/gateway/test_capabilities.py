"""Capabilities: the layered lookup, what a request needs, and the model catalog against
a real fake upstream (its own ``/models`` list, the TTL, a provider that is down)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from parley.domain.capabilities import Capabilities, needs_of
from parley.domain.messages import ChatRequest, Message
from parley.errors import ConfigError
from parley.gateway.capabilities import CapabilityBook, shipped_capabilities
from parley.gateway.catalog import ModelCatalog
from parley.providers.base import Provider
from parley.providers.openai import OpenAIProvider
from parley.settings import ProviderConfig, Timeouts, load_settings
from tests.fakes.openai_upstream import MODELS, FakeOpenAI
from tests.harness import free_port

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_layers_go_from_shipped_globs_to_configured_provider_model() -> None:
    book = CapabilityBook(
        configured={
            "gpt-4o*": Capabilities(context_window=1000),
            "up/gpt-4o-mini": Capabilities(vision=False),
        },
        shipped=shipped_capabilities(),
    )
    # Shipped glob gives tools and JSON; the configured glob narrows the window; the
    # provider-qualified entry takes images away for that provider only.
    assert book.of("up", "gpt-4o-mini") == Capabilities(
        vision=False, tools=True, json_mode=True, context_window=1000
    )
    assert book.of("other", "gpt-4o-mini").vision is True
    assert book.of("other", "gpt-4o-mini").context_window == 1000
    # Nobody knows this one: everything unknown, nothing refused.
    assert book.of("local", "my-finetune") == Capabilities()


def test_needs_and_unmet_reasons() -> None:
    request = ChatRequest(
        model="m",
        messages=(Message("user", ({"type": "text", "text": "x" * 600}, IMAGE)),),
        max_tokens=50,
        tools=({"type": "function", "function": {"name": "f", "parameters": {}}},),
        extra={"response_format": {"type": "json_object"}},
    )
    needs = needs_of(request)
    assert (needs.vision, needs.tools, needs.json_mode) == (True, True, True)
    assert needs.min_tokens == 600 // 6 + 50
    assert needs.unmet(Capabilities()) == []
    reasons = needs.unmet(
        Capabilities(vision=False, tools=False, json_mode=False, context_window=100)
    )
    assert len(reasons) == 4
    assert "images" in reasons[0] and "context window of 100" in reasons[3]
    plain = needs_of(ChatRequest(model="m", messages=(Message("user", "hi"),)))
    assert plain.unmet(Capabilities(vision=False, tools=False, json_mode=False)) == []


def test_config_capabilities_are_validated(tmp_path: Path) -> None:
    config = tmp_path / "parley.toml"
    config.write_text('[capabilities."up/m"]\nvision = "yes"\n')
    with pytest.raises(ConfigError, match=r"capabilities\.up/m\.vision: must be a bool"):
        load_settings(env={"PARLEY_CONFIG": str(config)}, cwd=tmp_path)
    config.write_text('[capabilities."up/m"]\nvisoin = true\n')
    with pytest.raises(ConfigError, match="unknown field"):
        load_settings(env={"PARLEY_CONFIG": str(config)}, cwd=tmp_path)
    config.write_text('[capabilities."up/m"]\ncontext_window = 8192\nvision = false\n')
    settings = load_settings(env={"PARLEY_CONFIG": str(config)}, cwd=tmp_path)
    assert settings.capabilities["up/m"] == Capabilities(vision=False, context_window=8192)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _provider(name: str, base_url: str, session: aiohttp.ClientSession) -> Provider:
    config = ProviderConfig(
        name=name,
        kind="openai",
        base_url=base_url,
        models=("configured-only",),
        timeouts=Timeouts(connect=1, first_byte=1, idle=1, total=2),
    )
    return OpenAIProvider(config, session)


async def test_catalog_merges_upstream_lists_caches_and_survives_a_dead_provider(
    session: aiohttp.ClientSession,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with FakeOpenAI() as fake:
        providers = {
            "up": _provider("up", fake.base_url, session),
            "down": _provider("down", dead, session),
        }
        catalog = ModelCatalog(
            providers,
            {"fast": ("up/gpt-4o-mini", "down/x")},
            CapabilityBook({}, shipped_capabilities()),
            ttl=60,
        )
        entries = await catalog.entries()
        ids = [e.id for e in entries]
        # Configured first, then what the upstream listed, then aliases; the dead
        # provider still shows its configured model.
        assert ids == [
            "up/configured-only",
            *(f"up/{m}" for m in MODELS),
            "down/configured-only",
            "fast",
        ]
        by_id = {e.id: e for e in entries}
        assert by_id["up/gpt-4o-mini"].source == "upstream"
        assert by_id["up/gpt-4o-mini"].capabilities.vision is True
        assert by_id["fast"].capabilities.context_window == 128000

        await asyncio.gather(catalog.entries(), catalog.entries())
        listings = [r for r in fake.received if r[0] == "/v1/models"]
        assert len(listings) == 1  # reused within the TTL

        fast = ModelCatalog(providers, {}, CapabilityBook({}, {}), ttl=0)
        await fast.entries()
        await fast.entries()
        assert len([r for r in fake.received if r[0] == "/v1/models"]) == 3
