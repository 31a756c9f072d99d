"""%agent, %%agent, %agent continue, %runs and the remote magics' argument handling, in real kernels.

A scripted model (JSON written into the test's tmp dir) drives the real AgentLoop with the
real InProcessExecutor inside real ipykernel kernels: one executed with nbclient (the user's
journey as a notebook), one driven through jupyter_client (interrupts, background runs).
"""
from __future__ import annotations

import json
import re
import queue
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

from handoff_magic.magics import parse_agent_line

pytestmark = pytest.mark.timeout(120)

SALES = "region,product,revenue\nnorth,a,10\nsouth,b,20\nnorth,c,5\neast,a,7\neast,b,3\n"


def plan(*steps: tuple[str, str]) -> dict[str, Any]:
    return {"name": "update_plan", "arguments": {"steps": [{"text": t, "status": s} for t, s in steps]}}


def py(code: str) -> dict[str, Any]:
    return {"name": "run_python", "arguments": {"code": code}}


SOLVE = [
    {"text": "I'll load sales.csv first.", "tool_calls": [
        plan(("Load sales.csv", "active"), ("Revenue per region", "pending")),
        py("import pandas as pd\nsales = pd.read_csv('sales.csv')\nsales.shape")]},
    {"text": "Now the revenue per region.", "tool_calls": [
        plan(("Load sales.csv", "done"), ("Revenue per region", "active")),
        py("by_region = sales.groupby('region')['revenue'].sum().to_dict()\nby_region")]},
    {"text": "Done.", "tool_calls": [
        plan(("Load sales.csv", "done"), ("Revenue per region", "done")),
        {"name": "finish", "arguments": {"summary": "by_region holds the revenue per region"}}]},
]

# the answer reaches the model as the ask_user tool result; the next scripted code reads it
# back from the run's conversation, so the variable it defines proves the answer was used
ASK = [
    {"text": "Which region?", "tool_calls": [
        plan(("Ask which region", "active"), ("Revenue of that region", "pending")),
        {"name": "ask_user", "arguments": {"question": "Which region should I report on?"}}]},
    {"text": "Using your answer.", "tool_calls": [
        plan(("Ask which region", "done"), ("Revenue of that region", "active")),
        py("import pandas as pd\nfrom handoff_magic.local.run import current_run\n"
           "said = [r.content for m in current_run().state.messages if m.role == 'tool'\n"
           "        for r in m.tool_results if r.name == 'ask_user'][-1]\n"
           "chosen = said.rsplit(':', 1)[-1].strip()\n"
           "chosen_revenue = int(pd.read_csv('sales.csv').groupby('region')['revenue'].sum()[chosen])\n"
           "print('chosen:', chosen)")]},
    {"text": "", "tool_calls": [
        plan(("Ask which region", "done"), ("Revenue of that region", "done")),
        {"name": "finish", "arguments": {"summary": "chosen_revenue holds it"}}]},
]

SLOW = [
    {"text": "A long computation.", "tool_calls": [
        plan(("Long step", "active"), ("Short step", "pending")),
        py("import time\nprint('slow step started', flush=True)\n"
           "for _ in range(400):\n    time.sleep(0.05)\nslow_finished = True")]},
    {"text": "Redo it quickly.", "tool_calls": [
        plan(("Long step", "done"), ("Short step", "active")),
        py("after_interrupt = 42")]},
    {"text": "", "tool_calls": [
        plan(("Long step", "done"), ("Short step", "done")),
        {"name": "finish", "arguments": {"summary": "done after an interrupt"}}]},
]

BACKGROUND = [
    {"text": "step one", "tool_calls": [
        plan(("One", "active"), ("Two", "pending")),
        py("import time\ntime.sleep(0.5)\nprint('bg step one output', flush=True)\ntime.sleep(1.0)\nbg_one = 1")]},
    {"text": "step two", "tool_calls": [plan(("One", "done"), ("Two", "active")), py("bg_two = 2")]},
    {"text": "", "tool_calls": [plan(("One", "done"), ("Two", "done")),
                                {"name": "finish", "arguments": {"summary": "both"}}]},
]

STATE_PROBE = """
import json as _json
from handoff_magic.local.run import current_run as _cr
_r = _cr()
print(_json.dumps({"status": _r.state.status, "question": _r.state.question, "steps": _r.state.steps,
                   "plan": [[p.text, p.status] for p in _r.state.plan],
                   "messages": len(_r.state.messages), "running": _r.running,
                   "vars": {k: repr(v) for k, v in globals().items() if k in %s}}))
"""


def probe(names: list[str]) -> str:
    return STATE_PROBE % (json.dumps(names),)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("magics")
    (d / "sales.csv").write_text(SALES)
    for name, script in (("solve", SOLVE), ("ask", ASK), ("slow", SLOW), ("background", BACKGROUND)):
        (d / f"{name}.json").write_text(json.dumps(script))
    return d


def _stream_text(cell: Any, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream"
                   and o.get("name") == name)


def usage_error(cell: Any) -> str:
    """IPython prints a UsageError on stderr (no traceback, no error output)."""
    err = _stream_text(cell, "stderr")
    assert err.startswith("UsageError: "), cell.outputs
    return err


def _last_json(text: str) -> dict[str, Any]:
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON probe output in {text!r}"
    return json.loads(lines[-1])


# -- the user's journey as an executed notebook ------------------------------------------------

@pytest.fixture(scope="module")
def journey(workdir: Path) -> nbformat.NotebookNode:
    cells = [
        "%load_ext handoff_magic",
        f"%agent --model scripted:{workdir / 'solve.json'} compute the revenue per region from sales.csv",
        "import json\nprint('IN', json.dumps(In))\n" + probe(["sales", "by_region"]),
        "%runs",
        f"%%agent --model scripted:{workdir / 'ask.json'}\nReport the revenue of one region;\nask me which.",
        probe(["chosen_revenue"]),
        "%agent continue",                      # waiting for an answer: says how to give one
        '%agent continue "east"',
        probe(["chosen_revenue", "chosen"]),
        "%agent --max-steps zero count the rows",
        "%handoff no-such-run",
        "%pull",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, timeout=60, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    return nb


def test_scripted_agent_solves_data_task_in_notebook(journey: nbformat.NotebookNode) -> None:
    first = journey.cells[1]
    assert not [o for o in first.outputs if o.output_type == "error"], first.outputs
    # the widget was displayed under the %agent cell and the agent's outputs follow it
    mimes = [m for o in first.outputs for m in o.get("data", {})]
    assert "application/vnd.jupyter.widget-view+json" in mimes
    state = _last_json(_stream_text(journey.cells[2]))
    assert state["status"] == "completed"
    assert state["plan"] == [["Load sales.csv", "done"], ["Revenue per region", "done"]]
    assert state["vars"]["by_region"] == repr({"east": 10, "north": 15, "south": 20})
    assert state["vars"]["sales"].splitlines()[0].split() == ["region", "product", "revenue"]
    history = json.loads(_stream_text(journey.cells[2]).split("IN ", 1)[1].splitlines()[0])
    assert any("sales = pd.read_csv('sales.csv')" in c for c in history), history
    assert any("groupby('region')" in c for c in history), history


def test_runs_lists_runs_as_html_and_text(journey: nbformat.NotebookNode) -> None:
    out = [o for o in journey.cells[3].outputs if o.output_type == "execute_result"]
    assert out, journey.cells[3].outputs
    text, html_ = out[0]["data"]["text/plain"], out[0]["data"]["text/html"]
    for expected in ("compute the revenue per region", "completed", "local", "3"):
        assert expected in text and expected in html_
    assert "<table" in html_
    # the scripted model reports no usage: the tokens are estimated, and marked so
    assert re.search(r"~[\d,]+ tokens", text) and re.search(r"~[\d,]+ tokens", html_)


def test_ask_user_waits_then_continue_with_answer_completes(journey: nbformat.NotebookNode) -> None:
    waiting = _last_json(_stream_text(journey.cells[5]))
    assert waiting["status"] == "waiting_input"
    assert waiting["question"] == "Which region should I report on?"
    assert waiting["plan"][0] == ["Ask which region", "active"]
    assert "chosen_revenue" not in waiting["vars"]
    # %agent continue without an answer: a clear usage error that repeats the question
    err = usage_error(journey.cells[6])
    assert "Which region should I report on?" in err and '%agent continue "your answer"' in err
    assert not [o for o in journey.cells[6].outputs if o.output_type == "display_data"]
    done = _last_json(_stream_text(journey.cells[8]))
    assert done["status"] == "completed"
    assert done["vars"] == {"chosen_revenue": "10", "chosen": "'east'"}
    assert all(s == "done" for _, s in done["plan"])


def test_argument_errors_are_usage_errors(journey: nbformat.NotebookNode) -> None:
    e = usage_error(journey.cells[9])
    assert "--max-steps needs a whole number" in e and "usage:" in e
    e = usage_error(journey.cells[10])
    assert "no agent run 'no-such-run'" in e and "%runs" in e
    e = usage_error(journey.cells[11])
    assert "required: run_id" in e and "usage: %pull RUN_ID" in e


# -- interrupts and background runs through jupyter_client -------------------------------------

class Kernel:
    def __init__(self, cwd: Path) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd))

    def run(self, code: str, timeout: float = 30) -> tuple[dict[str, Any], str, str]:
        """Execute and wait: (reply content, stdout text, stderr text + error outputs)."""
        out: list[str] = []
        err: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                (out if msg["content"]["name"] == "stdout" else err).append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                err.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        reply = self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        return reply["content"], "".join(out), "".join(err)

    def state(self, names: list[str]) -> dict[str, Any]:
        content, out, errors = self.run(probe(names))
        assert content["status"] == "ok", errors
        return _last_json(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(workdir: Path) -> Any:
    k = Kernel(workdir)
    k.run("%load_ext handoff_magic")
    yield k
    k.close()


def test_interrupt_pauses_with_state_kept_and_continue_finishes(kernel: Kernel, workdir: Path) -> None:
    kc = kernel.kc
    msg_id = kc.execute(f"%agent --model scripted:{workdir / 'slow.json'} a long task")
    deadline = time.monotonic() + 30
    started = False
    while time.monotonic() < deadline and not started:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        started = msg["msg_type"] == "stream" and "slow step started" in msg["content"].get("text", "")
    assert started, "the agent's long step never started"
    time.sleep(0.3)
    kernel.km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=30)
    # the interrupt lands in the agent's code; the %agent cell itself ends cleanly, paused
    assert reply["content"]["status"] == "ok", reply["content"]
    paused = kernel.state(["slow_finished", "after_interrupt"])
    assert paused["status"] == "paused"
    assert paused["plan"] == [["Long step", "active"], ["Short step", "pending"]]
    assert paused["messages"] >= 3 and paused["steps"] == 1
    assert paused["vars"] == {}
    content, _, errors = kernel.run("%agent continue")
    assert content["status"] == "ok", errors
    done = kernel.state(["slow_finished", "after_interrupt"])
    assert done["status"] == "completed"
    assert done["vars"] == {"after_interrupt": "42"}
    assert done["plan"] == [["Long step", "done"], ["Short step", "done"]]
    # the model was told its step was cut off
    _, out, _ = kernel.run("from handoff_magic.local.run import current_run\n"
                           "print([r.content[:25] for m in current_run().state.messages "
                           "for r in m.tool_results if r.name == 'run_python'])")
    assert "'[interrupted by the user" in out


def test_background_run_keeps_notebook_usable_and_pauses_on_request(kernel: Kernel, workdir: Path) -> None:
    t0 = time.monotonic()
    content, _, errors = kernel.run(f"%agent --background --model scripted:{workdir / 'background.json'} bg task")
    assert content["status"] == "ok", errors
    assert time.monotonic() - t0 < 5, "a --background run must give the cell back at once"
    # while its first step sleeps, the notebook runs other cells; the Pause button asks for a pause
    content, out, errors = kernel.run(
        "from handoff_magic.local.run import current_run\nr = current_run()\nprint(r.running, 6 * 7)\n"
        "r.widget.buttons['pause'].click()\nprint(r.wait_paused(20))")
    assert content["status"] == "ok", errors
    # the background step printed while this cell ran: its output stays with the run, not here
    assert out.split() == ["True", "42", "True"]
    paused = kernel.state(["bg_one", "bg_two"])
    assert paused["status"] == "paused"
    assert paused["vars"] == {"bg_one": "1"}     # the running step finished; the next did not start
    assert not paused["running"]
    content, _, errors = kernel.run("%agent continue --background")
    assert content["status"] == "ok", errors
    content, out, _ = kernel.run("print(current_run().wait_paused(20))")
    assert out.strip() == "True"
    done = kernel.state(["bg_one", "bg_two"])
    assert done["status"] == "completed" and done["vars"] == {"bg_one": "1", "bg_two": "2"}


def test_answer_sent_from_the_widget_front_end_resumes_and_mirrors_outputs(kernel: Kernel, workdir: Path) -> None:
    """The front end's side of the answer box: comm messages that set the Text and click Send."""
    # a task ending in "?" is a task, not IPython's object-help syntax
    content, _, errors = kernel.run(f"%agent --model scripted:{workdir / 'ask.json'} which region pays most?")
    assert content["status"] == "ok", errors
    _, out, _ = kernel.run("from handoff_magic.local.run import current_run\nw = current_run().widget\n"
                           "print(w.answer_text.model_id, w.answer_button.model_id,"
                           " w.answer_box.layout.display == '')\n"
                           "print(current_run().state.goal)")
    ids, goal = out.splitlines()
    text_id, button_id, visible = ids.split()
    assert goal == "which region pays most?" and visible == "True"
    kc = kernel.kc
    for comm_id, data in ((text_id, {"method": "update", "state": {"value": "south"}, "buffer_paths": []}),
                          (button_id, {"method": "custom", "content": {"event": "click"}})):
        kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data}))
    content, out, errors = kernel.run("import time\nt = time.monotonic()\n"
                                      "while current_run().status != 'completed' and time.monotonic() - t < 20:\n"
                                      "    time.sleep(0.1)\n"
                                      "print(current_run().wait_paused(20), current_run().status, chosen_revenue)\n"
                                      "print(repr(''.join(o.get('text', '') for o in w.outputs.outputs)))")
    assert content["status"] == "ok", errors
    lines = out.splitlines()
    assert lines[0] == "True completed 20"             # "south" reached the agent as the answer
    assert "chosen: south" in lines[1]                  # its output is in the widget, not lost
    _, out, _ = kernel.run("print(w.answer_box.layout.display, w.answer_text.value == '')")
    assert out.split() == ["none", "True"]


def test_new_run_refused_while_background_run_busy(kernel: Kernel, workdir: Path) -> None:
    content, _, errors = kernel.run(f"%agent --background --model scripted:{workdir / 'background.json'} again")
    assert content["status"] == "ok", errors
    content, _, errors = kernel.run(f"%agent --model scripted:{workdir / 'solve.json'} another")
    assert content["status"] == "error"
    assert errors.startswith("UsageError:") and "still running in the background" in errors
    content, out, errors = kernel.run("%agent cancel\nprint(current_run().wait_paused(20), current_run().status)")
    assert content["status"] == "ok", errors
    assert out.splitlines()[-1] == "True cancelled"
    content, _, errors = kernel.run("%agent continue")
    assert errors.startswith("UsageError:") and "cancelled" in errors and "%agent TASK" in errors


# -- the parser (pure) ---------------------------------------------------------------------------

def test_parse_agent_line_keeps_task_verbatim() -> None:
    opts, task = parse_agent_line("--model openai:gpt-4o --max-steps 5 --background don't drop 'quotes' -- here")
    assert opts == {"model": "openai:gpt-4o", "max_steps": 5, "max_tokens": None, "max_cost": None,
                    "background": True}
    assert task == "don't drop 'quotes' -- here"
    opts, task = parse_agent_line('--model="scripted:my script.json" -- --leading dash task')
    assert opts["model"] == "scripted:my script.json" and task == "--leading dash task"
    opts, task = parse_agent_line("--max-steps=3 task")
    assert opts["max_steps"] == 3 and task == "task"
    opts, task = parse_agent_line("--model 'scripted:my script.json' task")
    assert opts["model"] == "scripted:my script.json" and task == "task"
    opts, task = parse_agent_line("-- --leading dash")
    assert task == "--leading dash"
    opts, task = parse_agent_line("--max-tokens 200000 --max-cost $1.50 summarise")
    assert (opts["max_tokens"], opts["max_cost"], task) == (200000, 1.5, "summarise")


@pytest.mark.parametrize("line, message", [
    ("--model", "--model needs a value"),
    ("--max-steps 0 x", "at least 1"),
    ("--max-tokens lots x", "--max-tokens needs a whole number"),
    ("--max-cost 0 x", "--max-cost must be more than 0"),
    ("--colour red x", "unknown option --colour"),
    ("--background=yes x", "takes no value"),
    ("--model 'unclosed x", "unclosed quote"),
])
def test_parse_agent_line_errors(line: str, message: str) -> None:
    from IPython.core.error import UsageError
    with pytest.raises(UsageError, match=message) as info:
        parse_agent_line(line)
    assert "usage:" in str(info.value)


def test_terminal_ipython_narrates_in_text(workdir: Path) -> None:
    """Without a widget front end the run is readable text, never 'VBox(children=...)'."""
    import subprocess
    import sys
    code = ("ip = get_ipython(); ip.run_line_magic('load_ext', 'handoff_magic'); "
            f"ip.run_line_magic('agent', '--model scripted:{workdir / 'solve.json'} revenue per region'); "
            "ip.run_line_magic('runs', '') ; print(by_region)")
    proc = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "-c", code],
                          cwd=workdir, capture_output=True, text=True, timeout=60)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert out.startswith("Agent run [idle] revenue per region"), out
    assert "[agent] plan: ✓ Load sales.csv · ✓ Revenue per region" in out
    assert "[agent] running 3 lines of code" in out
    assert "[agent] done: by_region holds the revenue per region" in out
    assert "{'east': 10, 'north': 15, 'south': 20}" in out
    assert "VBox" not in out and "Widget" not in out
