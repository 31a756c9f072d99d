"""Every error handoff_magic raises on purpose, under one root.

A ``HandoffError`` is written for the user: ``message`` says what happened, ``hint`` what to do
next, and ``str()`` joins the two. Code that shows errors (the widget, the magics, the CLI, the
server's HTTP error mapping) catches the root and shows that text without a traceback; anything
else is a bug and keeps its traceback. Built-in bases are kept where callers catch them
(``except ValueError`` around state parsing, ``pickle.PicklingError`` inside the pickler).

    HandoffError(message, hint)               the root
    ├── StateError (ValueError)               a run state or manifest that cannot be read
    │   ├── SchemaVersionError                written by a newer jupyter-handoff
    │   └── BundleError                       a bundle that cannot be written, read or trusted
    │       └── BundleSchemaError             ... written by a newer jupyter-handoff (+ SchemaVersionError)
    ├── ConfigError (ValueError)              configuration missing or unreadable (model spec, handoff.json)
    ├── ClientError (RuntimeError)            a request to the handoff server failed (status, body)
    │   ├── ServerUnreachable                 no connection (server down, wrong URL)
    │   ├── AuthError                         token refused (401/403)
    │   ├── RunNotFound                       no such run or blob (404)
    │   └── BundleTooLarge                    over the server's size limit (413)
    ├── JourneyError (RuntimeError)           a handoff/reattach/pull/diff step failed; the local run is intact
    ├── RunError (RuntimeError)               a local run cannot do what was asked
    ├── ProviderError (RuntimeError)          a model call failed (retryable or not)
    ├── ToolArgumentError (ValueError)        tool arguments that do not fit its schema (shown to the model)
    ├── DemoError (RuntimeError)              a stage of `make demo` failed
    ├── DiffError (ValueError)                a chunk of a diffed file is unreadable or does not match its address
    └── capture internals, never shown as such (they become a variable's "skipped" reason):
        ├── SecretFound                       a pickle stream or file would carry a secret
        └── Blocked (pickle.PicklingError)    a live resource dill would restore wrongly

This module imports nothing from the package, so any module can raise from it without a cycle.
The classes are also importable from the modules that raise them (``handoff_magic.remote.http.ClientError``...).
"""
from __future__ import annotations

import pickle
from typing import Any

__all__ = ["HandoffError", "StateError", "SchemaVersionError", "BundleError", "BundleSchemaError",
           "ConfigError", "ClientError", "ServerUnreachable", "AuthError", "RunNotFound", "BundleTooLarge",
           "JourneyError", "RunError", "ProviderError", "ToolArgumentError", "DemoError", "DiffError", "SecretFound",
           "Blocked"]


class HandoffError(Exception):
    """Root: ``message`` (what happened) and ``hint`` (what to do next); ``str()`` shows both."""

    def __init__(self, message: str = "", hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.compose(message, hint))

    @staticmethod
    def compose(message: str, hint: str | None) -> str:
        return f"{message}: {hint}" if hint else message


class StateError(HandoffError, ValueError):
    """A run state or manifest that cannot be read; the message says what to do."""


class SchemaVersionError(StateError):
    """Written by a newer jupyter-handoff than the one reading it."""


class BundleError(StateError):
    """A bundle that cannot be written, read or trusted; the message says what to do."""


class BundleSchemaError(BundleError, SchemaVersionError):
    """The bundle was written by a newer jupyter-handoff."""


class ConfigError(HandoffError, ValueError):
    """Configuration that is missing or unreadable; the message says what to set."""


class ClientError(HandoffError, RuntimeError):
    """A request to the handoff server failed; ``str()`` says what happened and what to do."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status
        self.body: dict[str, Any] = {}    # the server's JSON error body (e.g. "missing" chunks)


class ServerUnreachable(ClientError):
    """No connection could be made (server down, wrong URL, network gone)."""


class AuthError(ClientError):
    """The server refused the token (403/401)."""


class RunNotFound(ClientError):
    """The server has no run (or blob) with that id (404)."""


class BundleTooLarge(ClientError):
    """The server refused the bundle because of its size limit (413)."""


class JourneyError(HandoffError, RuntimeError):
    """A handoff/reattach/pull/diff step failed; the message says what to do and the local run is intact."""


class RunError(HandoffError, RuntimeError):
    """A run cannot do what was asked; the message says why and what to do instead."""


class ProviderError(HandoffError, RuntimeError):
    """A model call that failed; ``message`` says what happened, ``hint`` what to do next.

    ``context_overflow`` marks the provider's "request too long for the context window" answer,
    which the agent loop handles by compacting the conversation and retrying.
    """

    def __init__(self, message: str, hint: str = "", *, retryable: bool = False,
                 context_overflow: bool = False) -> None:
        super().__init__(message, hint)
        self.retryable = retryable
        self.context_overflow = context_overflow

    @staticmethod
    def compose(message: str, hint: str | None) -> str:
        return f"{message} ({hint})" if hint else message


class ToolArgumentError(HandoffError, ValueError):
    """Arguments that do not fit a tool's schema; the message is shown to the model."""


class DemoError(HandoffError, RuntimeError):
    """A stage of the demo failed; the message names the stage and where to look."""


class DiffError(HandoffError, ValueError):
    """A chunk could not be read or does not match its address."""


class SecretFound(HandoffError):
    """A pickle stream or file would carry a secret value."""


class Blocked(HandoffError, pickle.PicklingError):
    """dill would 'restore' this live resource wrongly (a new lock, a truncated file)."""

    def __init__(self, reason: str, replayable: bool) -> None:
        super().__init__(reason)
        self.reason, self.replayable = reason, replayable
