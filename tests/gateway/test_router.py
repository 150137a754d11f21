"""Routing a model id to its candidates, with the real adapters (no upstream is called)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from parley.errors import ModelNotFound
from parley.gateway.router import Router
from parley.providers.registry import build_provider
from parley.settings import ProviderConfig

HF_NAME = "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    async with aiohttp.ClientSession() as session:
        configs = [
            ProviderConfig("vllm", "openai", "http://127.0.0.1:9/v1", models=(HF_NAME,)),
            ProviderConfig("meta", "openai", "http://127.0.0.1:9/v1"),
        ]
        providers = {c.name: build_provider(c, session) for c in configs}
        yield Router(providers, {"fast": ("vllm/small", "meta/big")})


def ids(router: Router, model: str) -> list[str]:
    return [candidate.id for candidate in router.resolve(model)]


async def test_provider_ids_aliases_and_listed_names(router: Router) -> None:
    assert ids(router, "meta/llama") == ["meta/llama"]
    assert ids(router, "vllm/meta/llama") == ["vllm/meta/llama"]
    assert ids(router, "fast") == ["vllm/small", "meta/big"]


async def test_a_listed_name_with_a_slash_goes_to_the_provider_that_lists_it(
    router: Router,
) -> None:
    # Hugging Face names carry their organisation; no provider is called "Qwen".
    assert ids(router, HF_NAME) == [f"vllm/{HF_NAME}"]
    assert ids(router, f"vllm/{HF_NAME}") == [f"vllm/{HF_NAME}"]
    with pytest.raises(ModelNotFound, match="unknown provider 'Qwen'"):
        router.resolve("Qwen/other-model")
