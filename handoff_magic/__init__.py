"""jupyter-handoff: run an agent in your notebook, hand it off to a Jupyter Server, pull it back.

Public API (a contract): ``save_state``, ``load_state``, ``register_reducer``, ``errors`` (the
HandoffError tree), ``RunState``, ``%load_ext handoff_magic``. The rest is reached lazily, so
importing the package stays cheap (no widgets, no HTTP client).
"""
from __future__ import annotations

import importlib
import threading
from typing import Any

from . import errors
from .state import RunState

__version__ = "0.1.0"
__all__ = ["save_state", "load_state", "register_reducer", "errors", "RunState", "load_ipython_extension",
           "__version__"]


def save_state(path: Any, shell: Any = None, **kwargs: Any) -> Any:
    """Snapshot the kernel's variables, imports, In/Out history and working files into ``path``."""
    from .snapshot.capture import save_state as _save
    return _save(path, shell, **kwargs)


def load_state(path: Any, shell: Any = None, **kwargs: Any) -> Any:
    """Restore a snapshot written by ``save_state`` into this kernel; nothing changes on error."""
    from .snapshot.restore import load_state as _load
    return _load(path, shell, **kwargs)


def register_reducer(cls: type, save: Any, rebuild: Any) -> None:
    """Save instances of ``cls`` as ``save(obj)`` (picklable state) and rebuild them as ``rebuild(state)``.

    For objects whose meaning is a resource (a client holding a session, a handle)::

        handoff_magic.register_reducer(Client, lambda c: c.url, Client)
    """
    from .snapshot.reducers import register_reducer as _register
    _register(cls, save, rebuild)


def load_ipython_extension(ip: Any) -> None:
    from .remote import journey_side
    journey_side()   # plugs handoff/pull into local runs' widget buttons
    from .magics import HandoffMagics
    ip.register_magics(HandoffMagics)
    # httpx loads its HTTP engine on the first client (~0.1-0.4 s) and a capture loads dill
    # (~0.03 s); with a server configured, do it now, off the prompt, so a first %handoff does
    # not wait for them. Without one (or with a broken setting, which that %handoff reports)
    # the user may never hand off, and does not pay for it.
    from .remote.settings import server_settings
    try:
        server_settings()
    except errors.ConfigError:
        return
    threading.Thread(target=_preload, args=("httpcore", "dill"), name="handoff-preload", daemon=True).start()


def _preload(*modules: str) -> None:
    for name in modules:
        importlib.import_module(name)


def unload_ipython_extension(ip: Any) -> None:  # nothing to undo: magics simply stay registered
    return None
