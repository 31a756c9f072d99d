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


def _same_server(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.rstrip("/") == b.rstrip("/")


def server_settings(url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """(server URL, token): arguments, else HANDOFF_SERVER_URL/HANDOFF_TOKEN, else handoff.json.

    A stored token is bound to the server it was stored for: ``HANDOFF_TOKEN`` belongs to
    ``HANDOFF_SERVER_URL`` (or, without it, to handoff.json's ``server_url``) and handoff.json's
    ``token`` to its ``server_url``. ``--to`` another server takes none of them: it needs its
    own ``--token``, so a token never reaches a server it was not given for."""
    cfg = load_config()
    env_url = os.environ.get("HANDOFF_SERVER_URL") or None
    cfg_url = cfg.get("server_url") or None
    url = url or env_url or cfg_url
    if not token:
        stored = ((os.environ.get("HANDOFF_TOKEN"), env_url or cfg_url), (cfg.get("token"), cfg_url))
        token = next((t for t, owner in stored if t and _same_server(url, owner)), None)
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
