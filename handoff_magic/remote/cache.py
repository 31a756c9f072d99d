"""This laptop's handoff cache: a small record per handed-off run (what a later pull compares
against). No bundle is kept here: handoff and pull stream chunks (upload.py, download.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..errors import JourneyError
from .settings import cache_dir


def cache_root() -> Path:
    """~/.cache/jupyter-handoff (XDG_CACHE_HOME respected), else a temp dir."""
    base = cache_dir()
    if base is not None:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    root = Path(xdg) / "jupyter-handoff"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "jupyter-handoff"


def _record_path(server_url: str, run_id: str) -> Path:
    server = hashlib.sha256(server_url.encode()).hexdigest()[:12]
    return cache_root() / "handoffs" / f"{server}-{run_id}.json"


def save_record(server_url: str, run_id: str, record: dict[str, Any]) -> None:
    """What pull needs from the handoff moment: the file hashes (conflict detection)."""
    atomic_write_bytes(_record_path(server_url, run_id), json.dumps(record).encode())


def load_record(server_url: str, run_id: str) -> dict[str, Any] | None:
    """The record ``save_record`` wrote for this run, or None (no handoff from this laptop)."""
    path = _record_path(server_url, run_id)
    try:
        record: dict[str, Any] = json.loads(path.read_text("utf-8"))
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JourneyError(f"the handoff record {path} is unreadable ({exc}): delete it and "
                           "run %pull again (local files will then be kept, remote ones saved as .remote)") from exc
