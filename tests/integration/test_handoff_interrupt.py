"""A kernel interrupt during %handoff cancels the handoff only: one clean line ("handoff
cancelled, your run is unchanged"), no traceback, and the background step that was running
finishes with its own result (issue 17, item 8). Real kernel, real SIGINT."""
from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

from tests.harness.kernels import Kernel, kernel_env

STEP = ("import pathlib, time\n"
        "from handoff_magic.local.run import current_run\n"
        "pathlib.Path('step-started').touch()\n"
        "while not current_run().pause_requested:\n    time.sleep(0.05)\n"
        "pathlib.Path('pause-requested').touch()\n"
        "while not pathlib.Path('go-on').exists():\n    time.sleep(0.05)\n"
        "step_result = 6 * 7\nprint('step result', step_result)")


def _wait_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_interrupt_cancels_handoff_and_spares_the_background_step(tmp_path: Path) -> None:
    script = tmp_path / "model.json"
    script.write_text(json.dumps([
        {"text": "computing", "tool_calls": [{"name": "run_python", "arguments": {"code": STEP}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]},
    ]))
    k = Kernel(tmp_path, kernel_env())
    try:
        k.ok("%load_ext handoff_magic")
        k.ok(f"%agent --background --model scripted:{script} compute")
        _wait_file(tmp_path / "step-started")
        msg_id = k.kc.execute("%handoff --to http://127.0.0.1:9")   # waits for the step boundary
        _wait_file(tmp_path / "pause-requested")
        k.km.interrupt_kernel()
        error: dict[str, Any] | None = None
        shown = ""
        while True:
            try:
                msg = k.kc.get_iopub_msg(timeout=30)
            except queue.Empty:
                raise AssertionError("%handoff never finished after the interrupt") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg["content"]
            if msg["msg_type"] == "stream":
                shown += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        # one clean line, as IPython shows a UsageError: no traceback, no KeyboardInterrupt
        assert error is None, error
        assert shown.strip() == "UsageError: handoff cancelled, your run is unchanged", shown
        (tmp_path / "go-on").touch()
        out = k.ok("from handoff_magic.local.run import current_run as _cr\nprint(_cr().wait_paused(60))\n"
                   "import json\nprint(json.dumps([_cr().state.status, globals().get('step_result'), "
                   "[r.content for m in _cr().state.messages for r in m.tool_results if r.name == 'run_python']]))")
        finished, status = out["stdout"].splitlines()[0], json.loads(out["stdout"].splitlines()[1])
        assert finished == "True" and status[0] == "completed" and status[1] == 42
        assert "step result 42" in status[2][0] and "Error" not in status[2][0], status[2]
    finally:
        k.stop()
