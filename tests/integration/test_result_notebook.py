"""KernelExecutor against a real kernel manager, and the result notebook built from the
outputs it collected: valid nbformat v4 at every write, atomic, with text, errors and images."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import nbformat
import pytest
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from handoff_magic.state import Message, Origin, PlanStep, RunState
from jupyter_server_ext.run.executor import KernelExecutor
from jupyter_server_ext.run.kernels import shutdown_settled
from jupyter_server_ext.notebook import build_result_notebook, write_for_state, write_result_notebook

INLINE = "module://matplotlib_inline.backend_inline"


@pytest.fixture
async def kernel(tmp_path: Path) -> AsyncIterator[tuple[AsyncMultiKernelManager, str]]:
    # connection_dir: by default a MultiKernelManager writes kernel-<id>.json into the cwd (the repo)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    mkm = AsyncMultiKernelManager(connection_dir=str(runtime))
    kid = await mkm.start_kernel(kernel_name="python3", cwd=str(tmp_path),
                                 env={**os.environ, "MPLBACKEND": INLINE})
    assert Path(mkm.get_kernel(kid).connection_file).parent == runtime
    try:
        yield mkm, kid
    finally:
        await shutdown_settled(mkm, kid, now=True)   # the test kills it: a restart may be under way


async def test_kernel_executor_outputs_timeout_interrupt_and_death(
        kernel: tuple[AsyncMultiKernelManager, str], tmp_path: Path) -> None:
    mkm, kid = kernel
    loop = asyncio.get_running_loop()
    ex = await asyncio.to_thread(KernelExecutor, mkm, kid, loop, default_timeout=60)
    run = lambda code, timeout=None: asyncio.to_thread(ex.execute, code, timeout)  # noqa: E731
    try:
        r = await run("import sys\nprint('a')\nprint('b')\nprint('oops', file=sys.stderr)\n40 + 2")
        assert r.status == "ok" and r.execution_count == 1
        assert r.outputs[0] == {"output_type": "stream", "name": "stdout", "text": "a\nb\n"}  # merged
        assert r.stderr == "oops\n" and r.result == "42"
        assert r.outputs[-1]["output_type"] == "execute_result" and r.outputs[-1]["execution_count"] == 1

        plot = await run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
        assert plot.status == "ok"
        assert any("image/png" in o.get("data", {}) for o in plot.outputs)

        err = await run("{}['missing']")
        assert err.status == "error" and err.error["ename"] == "KeyError"
        assert err.outputs[-1]["output_type"] == "error"

        t0 = time.monotonic()
        slow = await run("import time\ntime.sleep(30)", 1.0)
        assert slow.status == "timeout" and time.monotonic() - t0 < 10
        assert (await run("print('still alive')")).stdout == "still alive\n"

        threading.Timer(1.0, ex.interrupt).start()
        stopped = await run("import time\ntime.sleep(30)")
        assert stopped.status == "interrupted" and stopped.error["ename"] == "KeyboardInterrupt"

        outputs = [r, plot, err]
        nb_state = _state_with(outputs)
        write_for_state(tmp_path / "result.ipynb", nb_state, model="scripted:demo.json")
        nb = nbformat.read(tmp_path / "result.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == [r.execution_count, plot.execution_count, err.execution_count]
        assert any("image/png" in o.get("data", {}) for o in code[1].outputs)
        assert code[2].outputs[-1]["ename"] == "KeyError"

        t0 = time.monotonic()
        dead = await run("import os\nos._exit(1)")
        assert dead.status == "dead" and "exit code 1" in dead.error["evalue"]
        assert time.monotonic() - t0 < 15
        assert (await run("1")).status == "dead"  # stays dead; the runner restores a new kernel
    finally:
        ex.close()


def _state_with(results: list[Any]) -> RunState:
    state = RunState(goal="Find | the <b>best</b> region", model="scripted:demo.json",
                     plan=[PlanStep("load", "done"), PlanStep("plot", "active")],
                     origin=Origin(host="laptop-7", notebook_path="work/sales.ipynb"))
    state.messages.append(Message(role="user", text=state.goal))
    state.emit("handoff", server="http://cloud:8888", remote_id=state.id)
    state.emit("restore", report={"variables": [{"name": "df", "type": "DataFrame", "method": "pickle5",
                                                  "outcome": "restored", "reason": None}],
                                  "files": ["sales.csv"]})
    for i, res in enumerate(results):
        state.emit("assistant", text=f"Step {i}: **look**")
        state.emit("tool_call", id=f"c{i}", name="run_python", arguments={"code": f"# step {i}"})
        state.emit("tool_result", id=f"c{i}", name="run_python", content="...", is_error=res.status != "ok",
                   outputs=res.outputs, execution_count=res.execution_count)
    state.emit("interrupted", reason="step 3 was cut off (the server stopped); it will be redone")
    state.emit("question", question="Which region?")
    state.emit("answer", answer="north")
    state.emit("finish", summary="North sells best.")
    state.set_status("completed")
    return state


def test_header_restore_report_and_story_cells() -> None:
    class R:  # outputs as the executor reports them; one is malformed on purpose
        status = "ok"
        execution_count = 5
        outputs = [{"output_type": "stream", "name": "stdout", "text": ["a", "b\n"]},
                   {"output_type": "display_data", "data": {"text/plain": "x"}},  # no metadata
                   {"output_type": "mystery", "what": 1},
                   {"output_type": "error", "ename": "E", "evalue": "v", "traceback": "one line"}]
    state = _state_with([R()])
    nb = build_result_notebook(state, model="openai:gpt-4o")
    nbformat.validate(nb)
    header = nb.cells[0].source
    assert "Find \\| the &lt;b&gt;best&lt;/b&gt; region" in header  # escaped, table-safe
    assert "laptop-7" in header and "work/sales.ipynb" in header and "openai:gpt-4o" in header
    assert "☑ load" in header and "▶ plot" in header and "completed" in header
    assert "Restore report" in nb.cells[1].source and "| df | DataFrame | pickle5 | restored |" in nb.cells[1].source
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for needle in ("Handed off to http://cloud:8888", "Step interrupted", "Which region?", "**Answer:** north",
                   "## Summary\n\nNorth sells best."):
        assert needle in text
    code = [c for c in nb.cells if c.cell_type == "code"][0]
    assert code.execution_count == 5
    assert [o["output_type"] for o in code.outputs] == ["stream", "display_data", "error"]
    assert code.outputs[0]["text"] == "ab\n"


def test_write_is_atomic_and_never_leaves_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "result.ipynb"
    state = _state_with([])
    write_for_state(path, state)
    good = path.read_bytes()
    bad = build_result_notebook(state)
    bad.cells.append(nbformat.from_dict({"cell_type": "nonsense", "id": "bad", "source": "", "metadata": {}}))
    with pytest.raises(nbformat.ValidationError):
        write_result_notebook(path, bad)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["result.ipynb"]  # no temp file left behind


def test_restore_report_reads_well_rounded_seconds_imports_and_what_did_not_come_back() -> None:
    from jupyter_server_ext.notebook import restore_table
    text = restore_table({
        "variables": [{"name": "np", "type": "module", "method": "import", "outcome": "ok"},
                      {"name": "df", "type": "pandas.DataFrame", "method": "pickle5", "outcome": "ok"},
                      {"name": "conn", "type": "sqlite3.Connection", "method": "skipped", "outcome": "skipped",
                       "reason": "cannot be pickled"}],
        "files": ["sales.csv"], "seconds": 0.01753152899982524, "source": "checkpoint",
        "reason": "server restart", "conflicts": [{"path": "a.txt", "written_as": "a.txt.remote"}]})
    assert "0.0175" not in text and "0.02 s" in text
    assert "Restored **2 variables** (1 as imports) and **1 file** in 0.02 s, from the last checkpoint" in text
    assert "| np |" not in text and "**Imports:** `np`" in text  # imports on one line, not table rows
    assert "| df | pandas.DataFrame | pickle5 | ok |" in text
    assert "- `conn` (sqlite3.Connection): cannot be pickled" in text
    assert "`a.txt` → `a.txt.remote`" in text and "{" not in text  # no raw JSON dumped


async def test_a_kernel_killed_mid_step_is_dead_even_when_its_manager_restarts_it(tmp_path: Path) -> None:
    """jupyter_client's restarter replaces a dead kernel's process; the fresh process must not pass
    for the one that was running our code (that used to wait out the whole execution timeout)."""
    from traitlets.config import Config
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    eager_restarter = Config({"KernelRestarter": {"time_to_dead": 0.1}})  # restarts before we look
    mkm = AsyncMultiKernelManager(connection_dir=str(runtime), config=eager_restarter)
    kid = await mkm.start_kernel(kernel_name="python3", cwd=str(tmp_path))
    first_process = mkm.get_kernel(kid).provisioner.process  # type: ignore[attr-defined]  # LocalProvisioner
    ex = await asyncio.to_thread(KernelExecutor, mkm, kid, asyncio.get_running_loop(), default_timeout=60)
    try:
        t0 = time.monotonic()
        dead = await asyncio.to_thread(ex.execute, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        assert dead.status == "dead", dead
        assert "killed by SIGKILL" in dead.error["evalue"]
        assert time.monotonic() - t0 < 15  # seconds, not the 60 s execution timeout
        restarted = mkm.get_kernel(kid).provisioner
        assert restarted is None or restarted.process is not first_process  # type: ignore[attr-defined]  # restarted
        assert (await asyncio.to_thread(ex.execute, "1")).status == "dead"
    finally:
        ex.close()
        await shutdown_settled(mkm, kid, now=True)   # the test kills it: a restart may be under way
