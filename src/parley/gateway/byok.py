"""Bring your own key: a user's request to a provider they have a key for uses that key.

``UserKeys.personal(user_id, candidates)`` swaps, in the candidates of one request, the
provider of every candidate the user has a key for with an adapter built with that key
(the same configuration, defaults included, only the key differs). The adapter's own
scrubber then knows the user's key, so an upstream that echoes it (a 401 naming the wrong
key) never shows it to anyone.

Invariants:
- a key is used only for its owner's requests: adapters are cached per (user, provider)
  and looked up by the caller's ``user_id``, which only authentication sets;
- a user's keys are read from the database on the user's first request and then at most
  every ``ttl`` seconds (a change made in this process is seen at once: ``forget``);
  requests without a user (master key, local mode) never touch the database here;
- an adapter is rebuilt when the key changes (its ciphertext differs: every encryption
  is new) or when the provider it was built from was rebuilt (its configuration changed),
  and dropped when the key is deleted or its user falls out of the cache;
- a key that cannot be decrypted fails the request with the vault's error (it names the
  likely cause, never the key); the configured key is not used in its place.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import aiohttp

from parley.errors import StoreUnavailable
from parley.gateway.configured import ConfiguredProvider, configured
from parley.gateway.router import Candidate
from parley.providers.base import Provider
from parley.providers.registry import build_provider
from parley.security.vault import Vault
from parley.settings import Secret
from parley.store.provider_configs import ProviderConfigStore, StoredKey

log = logging.getLogger(__name__)

RELOAD_SECONDS = 5.0
MAX_USERS = 4096


@dataclass(slots=True)
class _Built:
    version: str
    base: Provider
    adapter: Provider


@dataclass(slots=True)
class _UserEntry:
    fetched_at: float
    keys: dict[str, StoredKey]
    adapters: dict[str, _Built] = field(default_factory=dict)


class UserKeys:
    """Users' own provider keys, cached per user; see the module docstring."""

    def __init__(
        self,
        store: ProviderConfigStore,
        vault: Vault,
        session: aiohttp.ClientSession,
        ttl: float = RELOAD_SECONDS,
        max_users: int = MAX_USERS,
    ) -> None:
        self.store = store
        self.vault = vault
        self._session = session
        self._ttl = ttl
        self._max_users = max_users
        self._users: OrderedDict[int, _UserEntry] = OrderedDict()
        self._loading: dict[int, asyncio.Task[list[StoredKey]]] = {}
        # Bumped by ``forget``: a read that began before a change is not cached.
        self._epoch = 0

    async def personal(self, user_id: int | None, candidates: list[Candidate]) -> list[Candidate]:
        """``candidates`` with the user's own key wherever they have one."""
        if user_id is None or not candidates:
            return candidates
        entry = await self._entry(user_id)
        if not entry.keys:
            return candidates
        return [
            candidate
            if candidate.provider_name not in entry.keys
            else Candidate(
                candidate.provider_name,
                self._adapter(entry, candidate.provider_name, candidate.provider),
                candidate.model,
            )
            for candidate in candidates
        ]

    def forget(self, user_id: int) -> None:
        """Drop what is cached for the user (their keys changed in this process)."""
        self._users.pop(user_id, None)
        self._loading.pop(user_id, None)
        self._epoch += 1

    def forget_all(self) -> None:
        """Drop everything cached (a configuration was renamed or deleted: the keys of
        its name moved or went with it)."""
        self._users.clear()
        self._loading.clear()
        self._epoch += 1

    async def _entry(self, user_id: int) -> _UserEntry:
        entry = self._users.get(user_id)
        if entry is not None:
            self._users.move_to_end(user_id)
            if time.monotonic() - entry.fetched_at < self._ttl:
                return entry
        started = time.monotonic()
        epoch = self._epoch
        try:
            keys = await self._fetch(user_id)
        except Exception as exc:
            if entry is None:
                log.error("could not read the provider keys of user %s: %s", user_id, exc)
                raise StoreUnavailable(
                    "your provider keys could not be read; try again later"
                ) from None
            log.warning("could not re-read the provider keys of user %s: %s", user_id, exc)
            entry.fetched_at = started
            return entry
        fresh = _UserEntry(started, {key.provider: key for key in keys})
        if epoch != self._epoch:
            # Keys changed while this read ran: good enough for this request, not cached.
            return fresh
        current = self._users.get(user_id)
        if current is not None:
            # Keep the adapters of keys that did not change.
            fresh.adapters = {
                name: built
                for name, built in current.adapters.items()
                if name in fresh.keys and built.version == _version(fresh.keys[name])
            }
        self._users[user_id] = fresh
        self._users.move_to_end(user_id)
        while len(self._users) > self._max_users:
            self._users.popitem(last=False)
        return fresh

    async def _fetch(self, user_id: int) -> list[StoredKey]:
        task = self._loading.get(user_id)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(self.store.user_keys, user_id))
            self._loading[user_id] = task
            task.add_done_callback(lambda done: self._done_loading(user_id, done))
        # Shielded: a caller that goes away does not cancel the others' read.
        return await asyncio.shield(task)

    def _done_loading(self, user_id: int, task: asyncio.Task[list[StoredKey]]) -> None:
        if self._loading.get(user_id) is task:
            del self._loading[user_id]

    def _adapter(self, entry: _UserEntry, name: str, base: Provider) -> Provider:
        stored = entry.keys[name]
        version = _version(stored)
        built = entry.adapters.get(name)
        if built is not None and built.version == version and built.base is base:
            return built.adapter
        adapter = _with_key(base, self.vault.decrypt(stored.ciphertext), self._session)
        entry.adapters[name] = _Built(version, base, adapter)
        return adapter


def _version(key: StoredKey) -> str:
    return hashlib.sha256(key.ciphertext.encode()).hexdigest()[:16]


def _with_key(base: Provider, key: str, session: aiohttp.ClientSession) -> Provider:
    """An adapter like ``base`` (a configured one keeps its defaults) that sends ``key``."""
    config = replace(base.config, api_key=Secret(key))
    if isinstance(base, ConfiguredProvider):
        return configured(build_provider(config, session), base.defaults)
    return build_provider(config, session)
