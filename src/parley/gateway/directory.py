"""The providers configured in the database, as adapters the router can use.

``ProviderDirectory`` holds a snapshot of the ``provider_configs`` table: each active
configuration named N is a provider N (a ``ConfiguredProvider``: an adapter with the
configuration's defaults) whose default model is the configuration's ``model``. The
snapshot is reloaded from the database when a request needs it and it is older than
``ttl`` seconds (concurrent requests share one load), and at once after this process
changed a configuration; so other processes see a change within ``ttl`` seconds, and
traffic for config-file providers never waits on the database (the router asks the
directory only for names the config file does not have).

Invariants:
- config-file providers win on a name clash; the admin API refuses such names
  (``reserved``), and a configuration that slipped in anyway is ignored with a warning;
- an adapter is rebuilt only when its row changed, so a reload costs one small query;
- a configuration whose key cannot be decrypted (the master secret changed) or whose kind
  has no adapter stays listed but answers every request with that ``ConfigError``: the
  message names the cause and never holds the key;
- a failed reload keeps the last snapshot (logged) and is retried after ``ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import sqlalchemy

from parley.errors import ConfigError
from parley.gateway.byok import UserKeys
from parley.gateway.configured import ConfiguredProvider, Defaults, configured
from parley.providers.registry import build_provider
from parley.security.vault import Vault
from parley.settings import KIND_DEFAULTS, ProviderConfig, Secret, Settings
from parley.store.provider_configs import ProviderConfigStore, StoredConfig

log = logging.getLogger(__name__)

# How stale another process's change may be when a request arrives.
RELOAD_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class _Entry:
    stored: StoredConfig
    provider: ConfiguredProvider | None
    error: ConfigError | None


async def open_directory(
    settings: Settings, engine: sqlalchemy.Engine, session: aiohttp.ClientSession
) -> tuple[ProviderDirectory, UserKeys]:
    """The directory (loaded) and the users' keys, over one vault: what the app's lifespan
    builds. Raises ``ConfigError`` when the master secret's key file is unsafe."""
    vault = await asyncio.to_thread(Vault.from_settings, settings)
    store = ProviderConfigStore(engine)
    directory = ProviderDirectory(store, vault, session, settings)
    await directory.reload()
    return directory, UserKeys(store, vault, session)


class ProviderDirectory:
    """The database's provider configurations; see the module docstring."""

    def __init__(
        self,
        store: ProviderConfigStore,
        vault: Vault,
        session: aiohttp.ClientSession,
        settings: Settings,
        ttl: float = RELOAD_SECONDS,
    ) -> None:
        self.store = store
        self.vault = vault
        self.session = session
        self._settings = settings
        self._ttl = ttl
        self._entries: dict[str, _Entry] = {}
        self._loaded_at = -math.inf
        self._loading: asyncio.Task[None] | None = None
        # Names a configuration may not take: the config file's providers, aliases and
        # listed models (a bare model id resolves to those first).
        self.reserved: frozenset[str] = frozenset(
            {p.name for p in settings.providers}
            | set(settings.aliases)
            | {model for p in settings.providers for model in p.models}
        )

    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self._ttl

    def provider(self, name: str) -> ConfiguredProvider | None:
        """The active configuration named ``name`` as a provider, or None; raises the
        configuration's ``ConfigError`` when it cannot be used."""
        entry = self._entries.get(name)
        if entry is None or not entry.stored.is_active:
            return None
        if entry.error is not None:
            raise entry.error
        return entry.provider

    def names(self) -> list[str]:
        """Every configuration's name, active or not (as of the last load)."""
        return list(self._entries)

    async def refresh(self) -> None:
        """Reload when the snapshot is older than ``ttl``; callers share one load."""
        if self.stale():
            await self._shared_load()

    async def reload(self) -> None:
        """Reload now (after this process changed a configuration)."""
        if self._loading is not None:
            # A load already running may have read the table before the change.
            await asyncio.shield(self._loading)
        await self._shared_load()

    async def _shared_load(self) -> None:
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load())
            self._loading.add_done_callback(self._loaded)
        # Shielded: a caller that goes away does not cancel the others' load.
        await asyncio.shield(self._loading)

    def _loaded(self, task: asyncio.Task[None]) -> None:
        if self._loading is task:
            self._loading = None

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            rows = await asyncio.to_thread(self.store.list_configs)
        except Exception as exc:
            log.warning(
                "could not reload provider configurations (keeping the last ones): %s: %s",
                type(exc).__name__,
                exc,
            )
            self._loaded_at = started
            return
        self._entries = self._build(rows, self._entries)
        self._loaded_at = started

    def _build(self, rows: list[StoredConfig], old: Mapping[str, _Entry]) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for stored in rows:
            if stored.name in self.reserved:
                log.warning(
                    "provider configuration %s is ignored: the config file has that name",
                    stored.name,
                )
                continue
            previous = old.get(stored.name)
            if previous is not None and previous.stored == stored:
                entries[stored.name] = previous
                continue
            try:
                provider = configured(
                    build_provider(self.provider_config(stored), self.session),
                    defaults_of(stored),
                )
            except Exception as exc:
                # One bad row must not take the others down: it answers with its error.
                error = (
                    exc
                    if isinstance(exc, ConfigError)
                    else ConfigError(
                        f"provider configuration {stored.name} could not be set up "
                        f"({type(exc).__name__})"
                    )
                )
                log.error("provider configuration %s is unusable: %s", stored.name, error.message)
                entries[stored.name] = _Entry(stored, None, error)
                continue
            entries[stored.name] = _Entry(stored, provider, None)
        return entries

    def provider_config(self, stored: StoredConfig) -> ProviderConfig:
        """The adapter configuration of a row (its key decrypted: ``VaultError`` if the
        master secret is not the one it was encrypted with)."""
        key = (
            self.vault.decrypt(stored.api_key_ciphertext)
            if stored.api_key_ciphertext is not None
            else None
        )
        return ProviderConfig(
            name=stored.name,
            kind=stored.kind,
            base_url=effective_base_url(stored.kind, stored.base_url),
            api_key=Secret(key) if key else None,
            models=(stored.model,),
            timeouts=self._settings.timeouts,
            list_models=False,
        )


def effective_base_url(kind: str, base_url: str | None) -> str:
    """The configured base URL, or the kind's public endpoint."""
    if base_url:
        return base_url.rstrip("/")
    default = KIND_DEFAULTS.get(kind)
    if default is None:
        raise ConfigError(f"provider kind {kind!r} is not supported")
    return default[0]


def defaults_of(stored: StoredConfig) -> Defaults:
    return Defaults(
        model=stored.model,
        system_prompt=stored.system_prompt,
        temperature=stored.temperature,
        max_tokens=stored.max_tokens,
        top_p=stored.top_p,
        frequency_penalty=stored.frequency_penalty,
        presence_penalty=stored.presence_penalty,
        extra=stored.extra,
    )
