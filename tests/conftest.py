"""Test-session isolation: no test reads or writes the developer's real Jupyter config."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="handoff-tests-"))
for _name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
    _path = _SESSION_DIR / _name.lower()
    _path.mkdir()
    os.environ[_name] = str(_path)
for _name in ("HANDOFF_MODEL", "HANDOFF_SERVER_URL", "HANDOFF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
              "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "JUPYTER_TOKEN"):
    os.environ.pop(_name, None)
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, str(Path(__file__).parent))
