"""Token usage and cost."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, usage: Usage) -> float | None:
        """Cost of ``usage`` in USD, or None when the token counts are unknown."""
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        prompt = usage.prompt_tokens or 0
        cached = min(usage.cached_tokens or 0, prompt) if self.cached_input is not None else 0
        completion = usage.completion_tokens or 0
        total = (prompt - cached) * self.input + completion * self.output
        if cached and self.cached_input is not None:
            total += cached * self.cached_input
        return total / 1_000_000
