"""The client side of a remote run, one job per module:

settings.py  server URL/token (arguments > HANDOFF_SERVER_URL/HANDOFF_TOKEN > handoff.json), cache dir
http.py      HandoffClient: the server's REST API over httpx (uploads, long-poll, downloads)
cache.py     per-kernel bundle cache and per-run handoff records on this laptop
follow.py    RemoteRun: a remote run mirrored from its events, driving a RunWidget; follow/cancel
             for terminals (CLI, MCP)
journey.py   handoff / reattach / review_diff / pull as small steps
views.py     what the notebook shows (run list, diff, pull report) and a terminal shows (event_text)

Importing this package plugs the journey into local runs (their Hand off / Pull back buttons).
"""
from ..errors import HandoffError
from ..local.run import use_remote
from . import journey
from .journey import handoff, last_handoff_info, pull, reattach, review_diff

use_remote(journey)

__all__ = ["HandoffError", "handoff", "reattach", "review_diff", "pull", "last_handoff_info"]
