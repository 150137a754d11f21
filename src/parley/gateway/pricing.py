"""Model prices: the table shipped in ``parley/data/pricing.toml`` plus config overrides.

Lookup order: ``provider/model`` in the overrides, then the bare model name in the
overrides, then the shipped table. No match means the cost is unknown (``None``), which
is stored as NULL: an unknown price is never reported as free.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources

from parley.domain.usage import Price, Usage


def shipped_prices() -> dict[str, Price]:
    data = tomllib.loads(
        resources.files("parley").joinpath("data/pricing.toml").read_text(encoding="utf-8")
    )
    return {
        model: Price(
            input=float(p["input"]),
            output=float(p["output"]),
            cached_input=None if p.get("cached_input") is None else float(p["cached_input"]),
        )
        for model, p in data.items()
    }


class PriceBook:
    def __init__(self, overrides: Mapping[str, Price], shipped: Mapping[str, Price]) -> None:
        self._overrides = dict(overrides)
        self._shipped = dict(shipped)

    def price(self, provider: str, model: str) -> Price | None:
        return (
            self._overrides.get(f"{provider}/{model}")
            or self._overrides.get(model)
            or self._shipped.get(model)
        )

    def cost(self, provider: str, model: str, usage: Usage) -> float | None:
        price = self.price(provider, model)
        return None if price is None else price.cost(usage)
