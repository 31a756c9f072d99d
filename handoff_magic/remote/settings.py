"""Where the client side finds its server and its cache: every HANDOFF_* variable the remote
actions read is read here, once per action (arguments > environment > handoff.json).

HANDOFF_SERVER_URL / HANDOFF_TOKEN (or ``--to URL --token T``, or ``server_url``/``token`` in
handoff.json) name the server and its Jupyter Server token; the token goes only to that server.
HANDOFF_CACHE_DIR moves the bundle cache (default ~/.cache/jupyter-handoff).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import config_path, load_config
from ..errors import ConfigError


def server_settings(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """(server URL, token): arguments, else HANDOFF_SERVER_URL/HANDOFF_TOKEN, else handoff.json."""
    url = url or os.environ.get("HANDOFF_SERVER_URL") or None
    token = token or os.environ.get("HANDOFF_TOKEN") or None
    if not url or not token:
        cfg = load_config()
        url = url or cfg.get("server_url") or None
        token = token or cfg.get("token") or None
    if not url:
        raise ConfigError(
            "no handoff server configured: pass --to URL, or set HANDOFF_SERVER_URL (and HANDOFF_TOKEN), "
            f"or put {{\"server_url\": ..., \"token\": ...}} in {config_path()}"
        )
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"server URL {url!r} must start with http:// or https://")
    return url.rstrip("/"), token


def cache_dir() -> Path | None:
    """HANDOFF_CACHE_DIR when set: the bundle cache lives there instead of ~/.cache/jupyter-handoff."""
    base = os.environ.get("HANDOFF_CACHE_DIR")
    return Path(base) if base else None
