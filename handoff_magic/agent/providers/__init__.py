"""Model providers: OpenAI chat-completions, Anthropic messages, and a scripted player.

``make_provider`` lives here, not in base.py, so the base classes import no provider (each
provider imports base; nothing imports back): a new provider is one module plus one branch here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import HTTPProvider, Provider, ProviderError

__all__ = ["HTTPProvider", "Provider", "ProviderError", "make_provider"]


def make_provider(spec: str, *, api_key: str | None = None, base_url: str | None = None,
                  base_dir: str | Path | None = None, **options: Any) -> Provider:
    """Build a provider from a spec: ``openai:MODEL``, ``anthropic:MODEL`` or ``scripted:PATH``.

    ``base_dir`` is where a relative scripted PATH is looked up first (then the cwd);
    ``options`` go to the HTTP providers (timeout, max_retries, backoff_base, ...).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ProviderError(f"model spec {spec!r} is not KIND:NAME",
                            "use openai:MODEL, anthropic:MODEL or scripted:PATH")
    kind, _, name = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(name.strip(), api_key=api_key, base_url=base_url, **options)
    if kind == "anthropic":
        from .anthropic import AnthropicProvider
        return AnthropicProvider(name.strip(), api_key=api_key, base_url=base_url, **options)
    if kind == "scripted":
        from .scripted import ScriptedProvider
        return ScriptedProvider(name, base_dir=base_dir)
    raise ProviderError(f"unknown model kind {kind!r} in {spec!r}",
                        "use openai:MODEL, anthropic:MODEL or scripted:PATH")
