"""The model catalog behind ``/v1/models``: configured models, each provider's own list,
aliases, and what each model can take.

A provider's own list (OpenAI-compatible ``/models``, Ollama tags, ...) is fetched on
demand and reused for ``models_ttl`` seconds; concurrent callers share one fetch. A
provider that is down or slow never breaks the listing: its configured models are listed
and its last good list is kept (asked again after ``_RETRY_FAILED`` seconds), and each
fetch is bounded by ``_FETCH_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from parley.domain.capabilities import Capabilities
from parley.errors import ParleyError
from parley.gateway.capabilities import CapabilityBook
from parley.gateway.directory import ProviderDirectory
from parley.providers.base import Provider

log = logging.getLogger(__name__)

_FETCH_TIMEOUT = 5.0
_RETRY_FAILED = 30.0


@dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    owned_by: str
    # "config" (declared in parley.toml), "upstream" (the provider listed it), "alias",
    # "configuration" (a provider configuration in the database: its default model).
    source: str
    capabilities: Capabilities


@dataclass(slots=True)
class _Listing:
    models: tuple[str, ...] = ()
    fresh_until: float = 0.0


class ModelCatalog:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        aliases: Mapping[str, tuple[str, ...]],
        capabilities: CapabilityBook,
        ttl: float,
        directory: ProviderDirectory | None = None,
    ) -> None:
        self._providers = dict(providers)
        self._aliases = dict(aliases)
        self._capabilities = capabilities
        self._ttl = ttl
        self._directory = directory
        self._listings = {name: _Listing() for name in self._providers}
        self._locks = {name: asyncio.Lock() for name in self._providers}

    async def entries(self) -> list[ModelEntry]:
        """Every model id a client may send, configured ones first, then aliases."""
        listed = await asyncio.gather(*(self._listed(name) for name in self._providers))
        out: list[ModelEntry] = []
        seen: set[str] = set()
        for (name, provider), upstream in zip(self._providers.items(), listed, strict=True):
            for source, models in (("config", provider.config.models), ("upstream", upstream)):
                for model in models:
                    model_id = f"{name}/{model}"
                    if model_id not in seen:
                        seen.add(model_id)
                        out.append(
                            ModelEntry(model_id, name, source, self._capabilities.of(name, model))
                        )
        for alias, targets in self._aliases.items():
            first, _, model = targets[0].partition("/")
            out.append(ModelEntry(alias, "parley", "alias", self._capabilities.of(first, model)))
        out.extend(await self._configurations())
        return out

    async def _configurations(self) -> list[ModelEntry]:
        directory = self._directory
        if directory is None:
            return []
        if directory.stale():
            await directory.refresh()
        out = []
        for name in directory.names():
            try:
                provider = directory.provider(name)
            except ParleyError:
                continue  # unusable (e.g. its key cannot be decrypted): not offered
            if provider is not None:
                model = provider.defaults.model
                out.append(
                    ModelEntry(name, "parley", "configuration", self._capabilities.of(name, model))
                )
        return out

    async def _listed(self, name: str) -> tuple[str, ...]:
        provider = self._providers[name]
        listing = self._listings[name]
        if not provider.config.list_models or time.monotonic() < listing.fresh_until:
            return listing.models
        async with self._locks[name]:
            if time.monotonic() < listing.fresh_until:
                return listing.models  # fetched while we waited
            try:
                async with asyncio.timeout(_FETCH_TIMEOUT):
                    models = await provider.list_models()
            except (ParleyError, TimeoutError) as exc:
                why = exc.message if isinstance(exc, ParleyError) else "timed out"
                log.warning("provider %s could not list its models: %s", name, why)
                listing.fresh_until = time.monotonic() + min(self._ttl, _RETRY_FAILED)
                return listing.models
            listing.models = tuple(models)
            listing.fresh_until = time.monotonic() + self._ttl
            return listing.models
