"""The agent: a provider-neutral loop, its tools, model providers and code executors."""
from .executors import ExecResult, Executor, InProcessExecutor
from .loop import SYSTEM_PROMPT, AgentLoop
from .providers import Provider, ProviderError, make_provider
from .tools import TOOLS

__all__ = ["AgentLoop", "SYSTEM_PROMPT", "ExecResult", "Executor", "InProcessExecutor",
           "Provider", "ProviderError", "make_provider", "TOOLS"]
