"""The one registry of provider adapters: provider ``kind`` -> adapter factory.

Adding a provider family is one new adapter module plus one line in ``_adapters``.
``ADAPTERS`` is a read-only view built once by that function; nothing here changes after
import. ``build_providers`` turns the configured providers into adapters over the shared
HTTP session, and refuses to start (``ConfigError``) when a configured kind has no adapter
yet, so a typo or an unsupported family is caught at start, never on a request.
``build_provider`` builds one adapter: the gateway also makes them for database
configurations and for users' own keys (BYOK), always through this one table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import aiohttp

from parley.errors import ConfigError
from parley.providers.anthropic import AnthropicProvider
from parley.providers.base import Provider
from parley.providers.gemini import GeminiProvider
from parley.providers.ollama import OllamaProvider
from parley.providers.openai import OpenAIProvider
from parley.settings import ProviderConfig, Settings

ProviderFactory = Callable[[ProviderConfig, aiohttp.ClientSession], Provider]


def _adapters() -> Mapping[str, ProviderFactory]:
    return MappingProxyType(
        {
            "openai": OpenAIProvider,
            "anthropic": AnthropicProvider,
            "gemini": GeminiProvider,
            "ollama": OllamaProvider,
            # HF TGI and Inference Endpoints serve the OpenAI chat route.
            "huggingface": OpenAIProvider,
        }
    )


ADAPTERS: Mapping[str, ProviderFactory] = _adapters()


def build_providers(settings: Settings, session: aiohttp.ClientSession) -> dict[str, Provider]:
    """One adapter per configured provider, keyed by provider name."""
    return {config.name: build_provider(config, session) for config in settings.providers}


def build_provider(config: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    """The adapter for one provider: config-file ones at start, database configurations
    when they are loaded, and one per user key for a user who brought their own."""
    factory = ADAPTERS.get(config.kind)
    if factory is None:
        raise ConfigError(
            f"provider {config.name}: kind {config.kind!r} is not supported "
            f"(supported kinds: {', '.join(sorted(ADAPTERS))})"
        )
    return factory(config, session)
