"""The server's one error root: everything the extension refuses or fails at says what
happened (``message``) and what to do next (``hint``). ``ServerError`` is a
``handoff_magic.errors.HandoffError``, so code that shows errors catches one root on both sides.

::

    ServerError(message, hint, **extra)     root; http.py renders it as {"error", "hint", **extra}
    ├── BadRequest                           the request is malformed (JSON, ids, a manifest)
    │   └── BlobError                        an upload that cannot be stored (address, hash)
    │       └── BlobTooLarge                 a chunk over the size cap
    ├── TooLarge                             a body, bundle or answer over a limit
    ├── NotFound                             no such run, chunk or bundle
    ├── Conflict                             the request does not fit the run's status
    │   ├── RunConflict                      e.g. cancelling a run that already ended
    │   └── PullTimeout                      no step boundary came in time
    ├── Unavailable                          runs cannot execute here (e.g. no working sandbox)
    ├── RunFailure                           ends a run as ``failed`` (its hint goes to the user)
    ├── TransportError                       moving a bundle or checkpoint failed
    │   └── KernelGone                       the kernel died meanwhile (crash recovery follows)
    ├── KernelStartError                     a run's kernel did not become ready
    └── GatewayConnectionError               a gateway kernel's websocket could not be opened or was lost

Which HTTP status each one answers with is decided in one place, ``http.status_of``; this
module knows nothing about HTTP.
"""
from __future__ import annotations

from typing import Any

from handoff_magic.errors import HandoffError


class ServerError(HandoffError):
    """The root: ``message`` (what happened), ``hint`` (what to do), ``extra`` (JSON fields)."""

    def __init__(self, message: str, hint: str = "", **extra: Any) -> None:
        super().__init__(message, hint)
        self.extra = extra


class BadRequest(ServerError):
    """The request cannot be read or breaks a rule of the API."""


class BlobError(BadRequest):
    """An upload that cannot be stored (bad address, hash mismatch)."""


class BlobTooLarge(BlobError):
    """A chunk over the server's size cap."""


class TooLarge(ServerError):
    """A request body, bundle or answer over one of the server's limits."""


class NotFound(ServerError):
    """No run, chunk or bundle by that name on this server."""


class Conflict(ServerError):
    """The request does not fit the run's current status."""


class RunConflict(Conflict):
    """Answering, cancelling or pulling a run whose status does not allow it."""


class PullTimeout(Conflict):
    """The run did not reach a step boundary within the pull's timeout."""


class Unavailable(ServerError):
    """Runs cannot execute on this server now (e.g. the run sandbox does not work here)."""


class RunFailure(ServerError):
    """Ends a run as ``failed``; ``hint`` says what the user can do."""


class TransportError(ServerError):
    """Moving a bundle or checkpoint between the server and a run's kernel failed."""


class KernelGone(TransportError):
    """The kernel died during a transfer: the runner recovers from the last checkpoint."""


class KernelStartError(ServerError):
    """A run's kernel did not become ready; the message says what to check."""


class GatewayConnectionError(ServerError):
    """The gateway's kernel websocket could not be opened or was lost."""
