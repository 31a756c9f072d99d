"""What a model's tokens cost: a small table of list prices, overridable without a release.

Prices are USD per million tokens: ``input`` (uncached prompt), ``output``, ``cached`` (prompt
read from the cache) and ``cache_write`` (prompt written to Anthropic's cache). A model not in
the table has no cost (None), never a guessed one. HANDOFF_PRICES (a JSON object, same shape as
PRICES, e.g. ``{"my-model": {"input": 1, "output": 2}}``) adds or replaces entries.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..state import Usage
from .providers.base import ProviderError

# longest matching prefix of the model name wins (so "gpt-4o-mini" beats "gpt-4o")
PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached": 0.075},
    "gpt-4o": {"input": 2.50, "output": 10.00, "cached": 1.25},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40, "cached": 0.025},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60, "cached": 0.10},
    "gpt-4.1": {"input": 2.00, "output": 8.00, "cached": 0.50},
    "gpt-5-mini": {"input": 0.25, "output": 2.00, "cached": 0.025},
    "gpt-5": {"input": 1.25, "output": 10.00, "cached": 0.125},
    "o4-mini": {"input": 1.10, "output": 4.40, "cached": 0.275},
    "o3": {"input": 2.00, "output": 8.00, "cached": 0.50},
    "claude-opus-4": {"input": 15.00, "output": 75.00, "cached": 1.50, "cache_write": 18.75},
    "claude-sonnet-4": {"input": 3.00, "output": 15.00, "cached": 0.30, "cache_write": 3.75},
    "claude-3-7-sonnet": {"input": 3.00, "output": 15.00, "cached": 0.30, "cache_write": 3.75},
    "claude-3-5-sonnet": {"input": 3.00, "output": 15.00, "cached": 0.30, "cache_write": 3.75},
    "claude-haiku-4": {"input": 1.00, "output": 5.00, "cached": 0.10, "cache_write": 1.25},
    "claude-3-5-haiku": {"input": 0.80, "output": 4.00, "cached": 0.08, "cache_write": 1.00},
    "scripted": {"input": 0.0, "output": 0.0},
}


def _overrides() -> dict[str, dict[str, float]]:
    raw = os.environ.get("HANDOFF_PRICES", "").strip()
    if not raw:
        return {}
    hint = 'set HANDOFF_PRICES to JSON like {"my-model": {"input": 1.0, "output": 2.0}} (USD per million tokens)'
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProviderError(f"HANDOFF_PRICES is not valid JSON ({exc})", hint) from exc
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and all(isinstance(p, (int, float)) for p in v.values()) for v in data.values()):
        raise ProviderError("HANDOFF_PRICES must map model names to {input, output, cached} numbers", hint)
    return data


def price_for(spec: str, table: dict[str, dict[str, float]] | None = None) -> dict[str, float] | None:
    """The price entry for ``kind:model`` (or a bare model name), or None if unknown."""
    kind, _, model = spec.partition(":")
    name = model if model else kind
    if kind == "scripted":
        name = "scripted"
    prices = {**PRICES, **(table or {}), **_overrides()}
    matches = [key for key in prices if name == key or name.startswith(key)]
    return prices[max(matches, key=len)] if matches else None


def cost_of(usage: Usage, spec: str, table: dict[str, dict[str, Any]] | None = None) -> float | None:
    """USD for one reply's usage, or None when the model's price is not known."""
    price = price_for(spec, table)
    if price is None:
        return None
    base_in = price.get("input", 0.0)
    cached = usage.cached_tokens * price.get("cached", base_in)
    written = usage.cache_write_tokens * price.get("cache_write", base_in)
    plain = max(0, usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens) * base_in
    return (plain + cached + written + usage.output_tokens * price.get("output", 0.0)) / 1_000_000
