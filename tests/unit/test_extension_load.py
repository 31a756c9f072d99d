"""``%load_ext handoff_magic`` warms up the HTTP engine and dill only when a handoff server is
configured: a user who never hands off does not pay for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# a fresh interpreter: nothing but the preload thread imports httpcore or dill at %load_ext.
# If the thread started it is either still running (listed) or done (the modules are loaded).
PROBE = """
import json, sys, threading
from IPython.core.interactiveshell import InteractiveShell
InteractiveShell.instance().run_line_magic("load_ext", "handoff_magic")
names = [t.name for t in threading.enumerate()]
loaded = {m: m in sys.modules for m in ("httpcore", "dill")}
for t in threading.enumerate():
    if t.name == "handoff-preload":
        t.join(30)
print(json.dumps({"names": names, "loaded": loaded,
                  "loaded_after": {m: m in sys.modules for m in ("httpcore", "dill")}}))
"""


def _load_ext(tmp_path: Path, env: dict[str, str]) -> tuple[list[str], dict[str, bool], dict[str, bool]]:
    """(thread names just after %load_ext, modules loaded then, modules loaded once the preload ended)."""
    full = {k: v for k, v in os.environ.items() if k not in ("HANDOFF_SERVER_URL", "HANDOFF_TOKEN")}
    full.update(JUPYTER_CONFIG_DIR=str(tmp_path), IPYTHONDIR=str(tmp_path / "ipython"),
                PYTHONPATH=os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")]), **env)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=full, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    return seen["names"], seen["loaded"], seen["loaded_after"]


def test_no_preload_thread_without_a_server(tmp_path: Path) -> None:
    names, loaded, loaded_after = _load_ext(tmp_path, {})
    assert "handoff-preload" not in names
    assert loaded == loaded_after == {"httpcore": False, "dill": False}


@pytest.mark.parametrize("where", ["env", "handoff.json"])
def test_preload_thread_runs_with_a_server_configured(tmp_path: Path, where: str) -> None:
    env: dict[str, str] = {}
    if where == "env":
        env["HANDOFF_SERVER_URL"] = "http://127.0.0.1:9"
    else:
        (tmp_path / "handoff.json").write_text(json.dumps({"server_url": "http://127.0.0.1:9"}))
    names, loaded, loaded_after = _load_ext(tmp_path, env)
    assert "handoff-preload" in names or all(loaded.values())
    assert loaded_after == {"httpcore": True, "dill": True}
