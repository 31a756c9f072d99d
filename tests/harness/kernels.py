"""A real ipykernel driven over ZMQ, as a notebook frontend would: the snapshot tests save in
one kernel and load in a fresh one started in another directory."""
from __future__ import annotations

import json
import os
import queue
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


class Kernel:
    """A real ipykernel driven over ZMQ, as a notebook frontend would."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60, store_history: bool = True) -> dict[str, Any]:
        msg_id = self.kc.execute(code, store_history=store_history, silent=not store_history)
        out: dict[str, Any] = {"stdout": "", "stderr": "", "data": [], "error": None}
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"kernel did not finish {code[:60]!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream" and c["name"] in ("stdout", "stderr"):   # a magic's UsageError is on stderr
                out[c["name"]] += c["text"]
            elif t in ("execute_result", "display_data"):
                out["data"].append(c["data"])
                if t == "execute_result":
                    out["execution_count"] = c["execution_count"]
            elif t == "error":
                out["error"] = f"{c['ename']}: {c['evalue']}"
            elif t == "status" and c["execution_state"] == "idle":
                return out

    def ok(self, code: str) -> dict[str, Any]:
        out = self.run(code)
        assert out["error"] is None, f"{code[:80]!r} failed: {out['error']}"
        return out

    def check(self, checks: str) -> dict[str, Any]:
        """Run ``checks``, lines of ``_c(name, lambda: value)``, in this kernel; every name's value
        (JSON), or ``'ERROR Type: message'`` where its lambda raised, so one failure hides no other."""
        return dict(json.loads(self.ok(_CHECK_HEAD + checks + _CHECK_TAIL)["stdout"]))

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


_CHECK_HEAD = r"""
import json as _json
_r = {}
def _c(name, fn):
    try:
        _r[name] = fn()
    except Exception as e:
        _r[name] = f'ERROR {type(e).__name__}: {e}'
"""
_CHECK_TAIL = "\nprint(_json.dumps(_r, default=str))\n"


def kernel_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "PYTEST"))}
    env.update(extra)
    return env
