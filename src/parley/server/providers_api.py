"""Provider configurations (admin) and users' own provider keys (BYOK): the chat API routes.

Routes (JSON; errors are OpenAI error JSON):

- ``GET|POST /api/admin/providers``, ``GET|PATCH|DELETE /api/admin/providers/{id}``:
  provider configurations in the database (admins only: anyone else gets 404, as for an
  unknown route). A configuration named N is the provider N; model ``N`` is its model
  with its defaults, ``N/<model>`` another model with the same defaults;
- ``GET /api/me/provider-keys``, ``PUT|DELETE /api/me/provider-keys/{provider}``: the
  caller's own keys, used instead of the configured key for the caller's requests only.

Invariants: an API key is write-only: it is encrypted (``security.vault``) before it
reaches the store, and no response or error shows it (``has_api_key`` says whether one is
set); a change is seen by this process's router at once and by other processes within the
directory's reload interval; every repository call leaves the event loop.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import orjson
from aiohttp import web

from parley.domain.exchange import MAX_TOKENS_LIMIT
from parley.errors import InvalidRequest, NotFound, StoreUnavailable
from parley.gateway.directory import ProviderDirectory, effective_base_url
from parley.server import identity
from parley.server.api_body import read_fields
from parley.server.state import SERVICES
from parley.settings import PROVIDER_KINDS
from parley.store.provider_configs import FIELDS, ProviderConfigStore, StoredConfig, StoredKey

_NOT_FOUND = "no such provider configuration"
_MAX_NAME = 128
_MAX_MODEL = 255
_MAX_URL = 2048
_MAX_KEY = 4096
_MAX_PROMPT = 100_000
_MAX_EXTRA_BYTES = 64 * 1024
_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}
# The store's settable columns, with the key in plain text (encrypted before storing).
_FIELDS = (FIELDS - {"api_key_ciphertext"}) | {"api_key"}
_NOT_NULL = frozenset({"name", "kind", "model", "is_active", "extra"})
# Request fields ``extra`` may not set: the request's own shape, or a field of its own.
_EXTRA_REFUSED = frozenset(
    {
        "model",
        "messages",
        "system",
        "stream",
        "stream_options",
        "n",
        "tools",
        "tool_choice",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
    }
)


def add_routes(app: web.Application) -> None:
    """Register this module's routes on ``app``."""
    app.router.add_get("/api/admin/providers", list_configs)
    app.router.add_post("/api/admin/providers", create_config)
    app.router.add_get("/api/admin/providers/{id}", get_config)
    app.router.add_patch("/api/admin/providers/{id}", update_config)
    app.router.add_delete("/api/admin/providers/{id}", delete_config)
    app.router.add_get("/api/me/provider-keys", list_my_keys)
    app.router.add_put("/api/me/provider-keys/{provider}", put_my_key)
    app.router.add_delete("/api/me/provider-keys/{provider}", delete_my_key)


# -- configurations (admin) ----------------------------------------------------------------


async def list_configs(request: web.Request) -> web.Response:
    """Admins: list provider configurations (keys never shown)."""
    identity.admin(request)
    found = await asyncio.to_thread(_directory(request).store.list_configs)
    return _json({"data": [config_json(c) for c in found], "has_more": False})


async def create_config(request: web.Request) -> web.Response:
    """Admins: create a provider configuration (its API key is encrypted)."""
    identity.admin(request)
    directory = _directory(request)
    data = await read_fields(request, _FIELDS)
    missing = [name for name in ("name", "kind", "model") if data.get(name) is None]
    if missing:
        raise InvalidRequest(f"required: {', '.join(missing)}", missing[0])
    values = _columns(data, directory)
    created = await asyncio.to_thread(directory.store.create_config, values)
    await _changed(request, directory)
    return _json(config_json(created), status=201)


async def get_config(request: web.Request) -> web.Response:
    """Admins: one provider configuration by id."""
    identity.admin(request)
    return _json(config_json(await _config_by_path(request)))


async def update_config(request: web.Request) -> web.Response:
    """Change any field; ``null`` clears a nullable one (``api_key: null`` removes the key,
    ``base_url: null`` goes back to the kind's endpoint)."""
    identity.admin(request)
    directory = _directory(request)
    public_id = _public_id(request)
    data = await read_fields(request, _FIELDS)
    changes = _columns(data, directory)
    updated = await asyncio.to_thread(directory.store.update_config, public_id, changes)
    if updated is None:
        raise NotFound(_NOT_FOUND)
    await _changed(request, directory)
    return _json(config_json(updated))


async def delete_config(request: web.Request) -> web.Response:
    """Delete a configuration; conversations that used it keep their history."""
    identity.admin(request)
    directory = _directory(request)
    deleted = await asyncio.to_thread(directory.store.delete_config, _public_id(request))
    if not deleted:
        raise NotFound(_NOT_FOUND)
    await _changed(request, directory)
    return web.Response(status=204)


# -- the caller's own keys -----------------------------------------------------------------


async def list_my_keys(request: web.Request) -> web.Response:
    """The providers the caller has a key for, with dates (never the key)."""
    caller = identity.current(request)
    if caller.user_id is None:
        return _json({"data": [], "has_more": False})
    found = await asyncio.to_thread(_directory(request).store.user_keys, caller.user_id)
    return _json({"data": [key_json(k) for k in found], "has_more": False})


async def put_my_key(request: web.Request) -> web.Response:
    """Set (or replace) the caller's key for a provider of the config file or database."""
    user_id = _user_id(request)
    directory = _directory(request)
    provider = request.match_info["provider"]
    data = await read_fields(request, {"api_key"})
    key = _api_key(data.get("api_key"))
    if key is None:
        raise InvalidRequest("'api_key' is required (to remove a key, DELETE it)", "api_key")
    await _known_provider(request, directory.store, provider)
    ciphertext = directory.vault.encrypt(key)
    stored = await asyncio.to_thread(directory.store.put_user_key, user_id, provider, ciphertext)
    _forget(request, user_id)
    return _json(key_json(stored))


async def delete_my_key(request: web.Request) -> web.Response:
    """Delete the caller's own key for a provider (BYOK)."""
    user_id = _user_id(request)
    provider = request.match_info["provider"]
    store = _directory(request).store
    if not await asyncio.to_thread(store.delete_user_key, user_id, provider):
        raise NotFound(f"you have no key for provider '{provider}'")
    _forget(request, user_id)
    return web.Response(status=204)


# -- shapes --------------------------------------------------------------------------------


def config_json(config: StoredConfig) -> dict[str, Any]:
    """A configuration as the API shows it: the key only as ``has_api_key``."""
    return {
        "id": str(config.public_id),
        "name": config.name,
        "kind": config.kind,
        "model": config.model,
        "system_prompt": config.system_prompt,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "top_p": config.top_p,
        "frequency_penalty": config.frequency_penalty,
        "presence_penalty": config.presence_penalty,
        "is_active": config.is_active,
        "base_url": effective_base_url(config.kind, config.base_url),
        "has_api_key": config.has_api_key,
        "extra": config.extra,
        "created_at": config.created_at,
        "updated_at": config.updated_at,
    }


def key_json(key: StoredKey) -> dict[str, Any]:
    return {"provider": key.provider, "created_at": key.created_at, "updated_at": key.updated_at}


# -- input ---------------------------------------------------------------------------------


def _columns(data: dict[str, Any], directory: ProviderDirectory) -> dict[str, Any]:
    """The store columns for the fields of a POST or PATCH body (all validated)."""
    for name in _NOT_NULL & data.keys():
        if data[name] is None:
            raise InvalidRequest(f"'{name}' may not be null", name)
    out: dict[str, Any] = {}
    if "name" in data:
        out["name"] = _name(data["name"], directory)
    if "kind" in data:
        kind = data["kind"]
        if kind not in PROVIDER_KINDS:
            raise InvalidRequest(
                f"'kind' must be one of {', '.join(sorted(PROVIDER_KINDS))}", "kind"
            )
        out["kind"] = kind
    if "model" in data:
        out["model"] = _text(data["model"], "model", _MAX_MODEL, single_line=True)
    if "system_prompt" in data:
        prompt = data["system_prompt"]
        out["system_prompt"] = (
            None if prompt is None else _text(prompt, "system_prompt", _MAX_PROMPT)
        )
    for name, (low, high) in _RANGES.items():
        if name in data:
            out[name] = _number(data[name], name, low, high)
    if "max_tokens" in data:
        value = data["max_tokens"]
        if value is not None and (type(value) is not int or not 1 <= value <= MAX_TOKENS_LIMIT):
            raise InvalidRequest(
                f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_LIMIT}, or null",
                "max_tokens",
            )
        out["max_tokens"] = value
    if "is_active" in data:
        if not isinstance(data["is_active"], bool):
            raise InvalidRequest("'is_active' must be a boolean", "is_active")
        out["is_active"] = data["is_active"]
    if "base_url" in data:
        out["base_url"] = _base_url(data["base_url"])
    if "extra" in data:
        out["extra"] = _extra(data["extra"])
    if "api_key" in data:
        key = _api_key(data["api_key"])
        out["api_key_ciphertext"] = None if key is None else directory.vault.encrypt(key)
    return out


def _name(value: Any, directory: ProviderDirectory) -> str:
    name = _text(value, "name", _MAX_NAME, single_line=True)
    if "/" in name or any(ch.isspace() for ch in name):
        raise InvalidRequest("'name' may not contain '/' or spaces", "name")
    if name in directory.reserved:
        raise InvalidRequest(
            f"'{name}' is already a provider, alias or model of the config file", "name"
        )
    return name


def _text(value: Any, field: str, limit: int, *, single_line: bool = False) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"'{field}' must be a non-empty string", field)
    if len(value) > limit:
        raise InvalidRequest(f"'{field}' is longer than {limit} characters", field)
    if single_line and not value.isprintable():
        raise InvalidRequest(f"'{field}' may not contain control characters", field)
    return value


def _number(value: Any, field: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"'{field}' must be a number or null", field)
    if not low <= value <= high:
        raise InvalidRequest(f"'{field}' must be between {low:g} and {high:g}", field)
    return float(value)


def _base_url(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.startswith(("http://", "https://"))
        or len(value) > _MAX_URL
        or not value.isprintable()
        or any(ch.isspace() for ch in value)
    ):
        raise InvalidRequest("'base_url' must be an http(s) URL or null", "base_url")
    return value.rstrip("/")


def _extra(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest("'extra' must be a JSON object of request parameters", "extra")
    refused = sorted(_EXTRA_REFUSED & value.keys())
    if refused:
        raise InvalidRequest(
            f"'extra' may not set {', '.join(refused)}: the request itself, or a field of "
            "the configuration, decides those",
            "extra",
        )
    if len(orjson.dumps(value)) > _MAX_EXTRA_BYTES:
        raise InvalidRequest(f"'extra' is larger than {_MAX_EXTRA_BYTES} bytes", "extra")
    return value


def _api_key(value: Any) -> str | None:
    """A key to store, or None; the message never repeats what was sent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest("'api_key' must be a non-empty string or null", "api_key")
    if len(value) > _MAX_KEY or not value.isprintable() or value != value.strip():
        # It goes into an HTTP header: no control characters, no surrounding spaces.
        raise InvalidRequest(
            "'api_key' may not contain control characters or surrounding spaces", "api_key"
        )
    return value


# -- helpers -------------------------------------------------------------------------------


def _directory(request: web.Request) -> ProviderDirectory:
    directory = request.app[SERVICES].directory
    if directory is None:
        raise StoreUnavailable("provider configurations are not available on this server")
    return directory


def _user_id(request: web.Request) -> int:
    caller = identity.current(request)
    if caller.user_id is None:
        raise InvalidRequest(
            f"provider keys belong to a user, and this caller ({caller.via}) has none: "
            "use a user's API key or session (an admin sets a configuration's key with "
            "PATCH /api/admin/providers/{id})"
        )
    return caller.user_id


async def _known_provider(request: web.Request, store: ProviderConfigStore, name: str) -> None:
    if name in request.app[SERVICES].gateway.router.provider_names():
        return
    if await asyncio.to_thread(store.get_by_name, name) is None:
        raise NotFound(f"no provider named '{name}'")


async def _changed(request: web.Request, directory: ProviderDirectory) -> None:
    """After a configuration changed: this process routes by the new state at once."""
    await directory.reload()
    user_keys = request.app[SERVICES].gateway.user_keys
    if user_keys is not None:
        # A rename moves the users' keys, a delete removes them: cached ones must go.
        user_keys.forget_all()


def _forget(request: web.Request, user_id: int) -> None:
    user_keys = request.app[SERVICES].gateway.user_keys
    if user_keys is not None:
        user_keys.forget(user_id)


async def _config_by_path(request: web.Request) -> StoredConfig:
    found = await asyncio.to_thread(_directory(request).store.get_config, _public_id(request))
    if found is None:
        raise NotFound(_NOT_FOUND)
    return found


def _public_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NotFound(_NOT_FOUND) from None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
