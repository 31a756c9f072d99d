"""Where the model spec comes from: arguments, environment, handoff.json (the server address: remote/settings.py).

handoff.json lives in the Jupyter config dir (``jupyter --config-dir``, usually ~/.jupyter;
JUPYTER_CONFIG_DIR moves it). Keys are never read from it: they come from the environment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_SCRIPT = Path(__file__).parent / "demo_scripts" / "default.json"


def config_path() -> Path:
    from jupyter_core.paths import jupyter_config_dir
    return Path(jupyter_config_dir()) / "handoff.json"


def load_config() -> dict[str, Any]:
    """The handoff.json settings, or {} if there is no file. A broken file is an error."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object like {{\"model\": \"openai:gpt-4o\"}}")
    return data


def default_model_spec() -> str:
    return f"scripted:{DEFAULT_SCRIPT}"


def resolve_model_spec(explicit: str | None = None) -> str:
    """--model, else HANDOFF_MODEL, else handoff.json "model", else the scripted demo model."""
    for value in (explicit, os.environ.get("HANDOFF_MODEL")):
        if value and value.strip():
            return value.strip()
    model = load_config().get("model")
    if isinstance(model, str) and model.strip():
        return model.strip()
    return default_model_spec()
