"""Model providers: OpenAI chat-completions, Anthropic messages, and a scripted player."""
from .base import HTTPProvider, Provider, ProviderError, make_provider

__all__ = ["HTTPProvider", "Provider", "ProviderError", "make_provider"]
