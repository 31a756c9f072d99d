"""The IPython shell a local run works in: finding it, and pinning a background run's outputs to
the cell (or widget click) that started it, so prints and displays land under that cell.
"""
from __future__ import annotations

import sys
from typing import Any


def get_shell() -> Any:
    """The running IPython shell, or None outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def current_parent(shell: Any) -> dict[str, Any] | None:
    """The request (cell execution or widget comm message) being handled right now."""
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is None:
        return None
    try:
        parent = get_parent("shell")
    except TypeError:  # older ipykernel: get_parent() without a channel
        parent = get_parent()
    return parent if isinstance(parent, dict) and parent.get("header") else None


def pin_outputs(shell: Any, parent: dict[str, Any] | None) -> list[tuple[Any, Any]]:
    """Set the calling thread's output parent on stdout/stderr/display publisher/display hook
    (ipykernel >= 6.20 keeps a per-thread parent); returns the reset tokens."""
    if not parent:
        return []
    tokens = []
    for obj in (sys.stdout, sys.stderr, getattr(shell, "display_pub", None), getattr(shell, "displayhook", None)):
        setter = getattr(obj, "set_thread_parent", None)
        if setter is not None:
            tokens.append((obj, setter(parent)))
    return tokens


def renders_widgets(shell: Any) -> bool:
    """A kernel (ZMQ) shell has a front end that may render widgets; terminal IPython has not."""
    return shell is not None and (hasattr(shell, "kernel") or type(shell).__name__ == "ZMQInteractiveShell")
