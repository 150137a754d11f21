"""Model capabilities: the table shipped in ``parley/data/capabilities.toml`` plus config.

Keys are a bare model name, ``provider/model``, or a glob of either (``claude-*``). For a
candidate, every matching entry contributes the fields it knows, from the least to the
most specific: shipped globs, shipped names, configured globs, configured names, then the
configured ``provider/model``. A field nobody knows stays unknown and is never a reason
to refuse (``domain.capabilities``).
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Mapping
from importlib import resources

from parley.domain.capabilities import Capabilities, capabilities_from


def shipped_capabilities() -> dict[str, Capabilities]:
    text = resources.files("parley").joinpath("data/capabilities.toml").read_text("utf-8")
    return capabilities_from(tomllib.loads(text), "capabilities.toml")


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


class CapabilityBook:
    def __init__(
        self, configured: Mapping[str, Capabilities], shipped: Mapping[str, Capabilities]
    ) -> None:
        layers: list[Mapping[str, Capabilities]] = []
        for table in (shipped, configured):
            layers.append({k: v for k, v in table.items() if _is_glob(k)})
            layers.append({k: v for k, v in table.items() if not _is_glob(k)})
        self._layers = layers
        self._cache: dict[tuple[str, str], Capabilities] = {}

    def of(self, provider: str, model: str) -> Capabilities:
        """What ``provider/model`` can take, as far as anyone configured it."""
        key = (provider, model)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._lookup(provider, model)
        return found

    def _lookup(self, provider: str, model: str) -> Capabilities:
        qualified = f"{provider}/{model}"
        result = Capabilities()
        for layer in self._layers:
            for pattern, capabilities in layer.items():
                if pattern in (model, qualified) or (
                    _is_glob(pattern)
                    and (
                        fnmatch.fnmatchcase(model, pattern)
                        or fnmatch.fnmatchcase(qualified, pattern)
                    )
                ):
                    result = capabilities.over(result)
        return result


def _matches(pattern: str, model: str, qualified: str) -> bool:
    if pattern in (model, qualified):
        return True
    return _is_glob(pattern) and (
        fnmatch.fnmatchcase(model, pattern) or fnmatch.fnmatchcase(qualified, pattern)
    )
