"""The client side of a remote run, one job per module:

settings.py  server URL/token (arguments > HANDOFF_SERVER_URL/HANDOFF_TOKEN > handoff.json), cache dir
http.py      HandoffClient: the server's REST API over httpx (uploads, long-poll, downloads)
cache.py     per-kernel bundle cache and per-run handoff records on this laptop
follow.py    RemoteRun: a remote run mirrored from its events, driving a RunWidget; follow/cancel
             for terminals (CLI, MCP)
journey.py   handoff / reattach / review_diff / pull as small steps
views.py     what the notebook shows (run list, diff, pull report) and a terminal shows (event_text)

The notebook actions (``handoff``, ``pull``...) load on first use: they need the widget
(ipywidgets, IPython), which terminals (``jupyter handoff``, the MCP server) importing
``follow``/``http``/``views`` from this package never pay for.
"""
from types import ModuleType
from typing import Any

from ..errors import HandoffError

_JOURNEY = frozenset({"handoff", "reattach", "review_diff", "pull", "last_handoff_info"})


def journey_side() -> ModuleType:
    """The notebook actions, plugged into local runs (their Hand off / Pull back buttons)."""
    from ..local.run import use_remote
    from . import journey
    use_remote(journey)
    return journey


def __getattr__(name: str) -> Any:
    if name in _JOURNEY:
        return getattr(journey_side(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HandoffError", "journey_side", "handoff", "reattach", "review_diff", "pull", "last_handoff_info"]
