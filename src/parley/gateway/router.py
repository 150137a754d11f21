"""Routing: a model id the client sent becomes an ordered list of upstream candidates.

Ids are ``provider/model`` (split on the first ``/``, so ``openrouter/meta/llama`` goes
to provider ``openrouter`` with model ``meta/llama``), an alias from config (its ordered
fallback list), a bare model name that exactly one provider lists (``Qwen/Qwen2.5-7B``
too, when no provider is called ``Qwen``), or the bare name of an
active database configuration (its own model, see ``gateway.directory``). Unlisted model
names still pass through when the provider is named. Anything else is ``ModelNotFound``.

Config-file providers, aliases and listed models come first: the directory of database
configurations is asked only for names they do not cover (``needs_directory``), so their
traffic never depends on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parley.errors import ModelNotFound
from parley.providers.base import Provider

if TYPE_CHECKING:
    from parley.gateway.directory import ProviderDirectory


@dataclass(frozen=True, slots=True)
class Candidate:
    provider_name: str
    provider: Provider
    model: str

    @property
    def id(self) -> str:
        return f"{self.provider_name}/{self.model}"


class Router:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        aliases: Mapping[str, tuple[str, ...]],
        directory: ProviderDirectory | None = None,
    ) -> None:
        self._providers = dict(providers)
        self._aliases = dict(aliases)
        self.directory = directory
        listed: dict[str, list[str]] = {}
        for name, provider in self._providers.items():
            for model in provider.config.models:
                listed.setdefault(model, []).append(name)
        self._listed = listed

    def resolve(self, model: str) -> list[Candidate]:
        """The candidates for ``model``, in the order to try them."""
        targets = self._aliases.get(model)
        if targets is not None:
            return [self._one(target) for target in targets]
        provider_name, slash, _ = model.partition("/")
        if slash and (provider_name in self._providers or model not in self._listed):
            return [self._one(model)]
        owners = self._listed.get(model, [])
        if len(owners) == 1:
            return [Candidate(owners[0], self._providers[owners[0]], model)]
        if len(owners) > 1:
            raise ModelNotFound(
                f"model '{model}' is offered by several providers ({', '.join(owners)}); "
                f"use 'provider/{model}'"
            )
        configured = self.directory.provider(model) if self.directory is not None else None
        if configured is not None:
            return [Candidate(model, configured, configured.defaults.model)]
        raise ModelNotFound(
            f"The model '{model}' does not exist: use 'provider/model' or a configured alias"
        )

    def needs_directory(self, model: str) -> bool:
        """Whether resolving ``model`` may ask the directory of database configurations."""
        if self.directory is None or model in self._aliases:
            return False
        provider_name, slash, _ = model.partition("/")
        if slash and provider_name in self._providers:
            return False
        return model not in self._listed

    def provider_names(self) -> list[str]:
        """The config-file providers' names."""
        return list(self._providers)

    def _one(self, target: str) -> Candidate:
        provider_name, _, upstream_model = target.partition("/")
        provider = self._providers.get(provider_name)
        if provider is None and self.directory is not None:
            provider = self.directory.provider(provider_name)
        if provider is None:
            raise ModelNotFound(f"unknown provider '{provider_name}' in model '{target}'")
        if not upstream_model:
            raise ModelNotFound(f"model '{target}' names no model after the provider")
        return Candidate(provider_name, provider, upstream_model)
