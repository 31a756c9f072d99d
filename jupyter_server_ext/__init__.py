"""jupyter-handoff's Jupyter Server extension: accepts handed-off agent runs and resumes them."""
from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import HandoffApp
    return [{"module": "jupyter_server_ext", "app": HandoffApp}]
