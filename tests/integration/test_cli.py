"""`jupyter handoff ...` run as real commands (subprocesses) against a real Jupyter Server.

The server's model is the loopback FakeLLM (OpenAI wire format, the server's own key); runs are
started with ``delegate``, the function behind the MCP tool start_run. Live output is checked against the
server's events: a model turn is held back until the test has seen `follow` print the step
before it, so "printed as it happened" is an ordering fact, not a sleep.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff_magic.remote.http import HandoffClient
from handoff_magic.mcp import delegate
from tests.harness.fake_llm import FakeLLM, Turn
from tests.harness.runner_helpers import all_events, wait_status
from tests.harness.server_process import JupyterServerProcess

MODEL = "openai:fake-model"
CLI = [sys.executable, "-m", "handoff_magic.cli"]


@pytest.fixture(scope="module")
def server(llm: FakeLLM) -> Iterator[JupyterServerProcess]:
    srv = JupyterServerProcess(env=llm.env()).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def env(server: JupyterServerProcess) -> dict[str, str]:
    e = dict(os.environ, HANDOFF_SERVER_URL=server.url, HANDOFF_TOKEN=server.token, PYTHONUNBUFFERED="1")
    e.pop("DISPLAY", None)
    e.pop("BROWSER", None)
    return e


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120, input=stdin,
                          check=False)


def new_run(server: JupyterServerProcess, tmp_path: Path, goal: str = "count the notes",
            model: str = MODEL) -> str:
    with HandoffClient(server.url, server.token) as cl:
        return str(delegate(cl, goal, {"notes.txt": "a\nb\n"}, model, root=tmp_path)["id"])


def py(code: str, text: str = "") -> Turn:
    return Turn(text, [("run_python", {"code": code})])


def ask(question: str) -> Turn:
    return Turn("", [("ask_user", {"question": question})])


def finish(summary: str) -> Turn:
    return Turn("", [("finish", {"summary": summary})])


def test_follow_prints_each_step_as_the_server_commits_it(server: JupyterServerProcess, llm: FakeLLM,
                                                          env: dict[str, str], tmp_path: Path) -> None:
    release = threading.Event()

    def held_back(_req: Any) -> Turn:   # the second model turn waits for the test
        assert release.wait(60), "the test never released the second model turn"
        return ask("Which file should I write the count to?")

    llm.push(py("n = len(open('notes.txt').read().split())\nprint('counted', n)", "counting"), held_back)
    run_id = new_run(server, tmp_path)
    proc = subprocess.Popen([*CLI, "follow", run_id], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            if "counted 2" in line:
                break
        # follow has printed the step's output while the run cannot have gone further
        assert proc.poll() is None
        assert not any(e["type"] == "question" for e in all_events(server, run_id))
        release.set()
        rest, err = proc.communicate(timeout=90)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    out = "\n".join(seen) + "\n" + rest
    assert proc.returncode == 5, (out, err)
    assert "question: Which file should I write the count to?" in out
    assert f'jupyter handoff answer {run_id} "YOUR ANSWER"' in out
    # every step the server committed, in the server's order, each printed with its number
    events = all_events(server, run_id)
    printed = [int(line.split()[0]) for line in out.splitlines() if line[:4].strip().isdigit()]
    assert printed == sorted(printed)
    wanted = [e["seq"] for e in events if e["type"] in ("assistant", "tool_result", "question")]
    assert set(wanted) <= set(printed)
    assert out.index("agent:") < out.index("python:") < out.index("counted 2") < out.index("question:")

    # answer it from the terminal; follow again from where it stopped: it completes (exit 0)
    llm.push(py("open('count.txt', 'w').write('2')"), finish("wrote count.txt"))
    answered = cli(env, "answer", run_id, "count.txt", "please")
    assert answered.returncode == 0, answered.stderr
    assert "answer sent" in answered.stdout
    last = printed[-1]
    again = cli(env, "follow", run_id, f"--after={last}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "answer: count.txt please" in again.stdout
    assert f"{last:>4} " not in again.stdout          # nothing before --after is repeated
    assert f"run {run_id} completed: wrote count.txt" in again.stdout

    shown = cli(env, "show", run_id)
    assert shown.returncode == 0
    assert f"run {run_id}: completed" in shown.stdout and "summary: wrote count.txt" in shown.stdout
    assert f"/handoff/runs/{run_id}" in shown.stdout
    assert re.search(r"usage: [\d,]+ tokens", shown.stdout), shown.stdout   # what the model replies reported
    as_json = json.loads(cli(env, "show", run_id, "--json").stdout)
    assert as_json["status"] == "completed" and as_json["id"] == run_id

    diff = cli(env, "diff", run_id)
    assert diff.returncode == 0
    assert f"What run {run_id} on {server.url} changed: the handoff vs its latest checkpoint" in diff.stdout
    assert "count.txt" in diff.stdout and "added" in diff.stdout

    listed = cli(env, "list")
    assert listed.returncode == 0 and run_id in listed.stdout and "jupyter handoff show ID" in listed.stdout

    opened = cli(env, "open", run_id, "--no-browser")
    assert opened.stdout.strip() == f"{server.url}/lab/tree/handoff-runs/{run_id}/result.ipynb"

    ended = cli(env, "cancel", run_id)    # nothing to cancel: a clear error, exit 1
    assert ended.returncode == 1
    assert "already ended" in ended.stderr


def test_cancel_and_failed_runs_give_their_own_exit_codes(server: JupyterServerProcess, llm: FakeLLM,
                                                          env: dict[str, str], tmp_path: Path) -> None:
    llm.push(ask("Shall I go on?"))
    run_id = new_run(server, tmp_path)
    waiting = cli(env, "follow", run_id)
    assert waiting.returncode == 5, waiting.stdout + waiting.stderr
    assert "waiting for input" in cli(env, "show", run_id).stdout
    row = [line for line in cli(env, "list").stdout.splitlines() if line.startswith(run_id)]
    assert len(row) == 1 and "waiting for input" in row[0] and "waiting_input" not in row[0]
    cancelled = cli(env, "cancel", run_id)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    after = cli(env, "follow", run_id)
    assert after.returncode == 4 and f"run {run_id} is cancelled" in after.stdout

    failing = new_run(server, tmp_path, model="nosuch:model")   # the server cannot use it
    wait_status(server, failing)
    failed = cli(env, "follow", failing)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert f"run {failing} failed:" in failed.stdout


def test_ctrl_c_detaches_and_the_run_goes_on(server: JupyterServerProcess, llm: FakeLLM,
                                             env: dict[str, str], tmp_path: Path) -> None:
    release = threading.Event()
    llm.push(py("print('first step')"), lambda _req: (release.wait(60), finish("done"))[1])
    run_id = new_run(server, tmp_path)
    proc = subprocess.Popen([*CLI, "follow", run_id], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "first step" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert f"detached from run {run_id}; it goes on on the server" in err
    assert "Traceback" not in err
    assert wait_status(server, run_id)["status"] == "completed"


def test_errors_say_what_to_do(server: JupyterServerProcess, env: dict[str, str]) -> None:
    wrong = cli(dict(env, HANDOFF_TOKEN="not-the-token"), "list")
    assert wrong.returncode == 1
    assert "refused the token" in wrong.stderr and "jupyter server list" in wrong.stderr
    assert "_xsrf" not in wrong.stderr
    posted = cli(dict(env, HANDOFF_TOKEN="not-the-token"), "cancel", "abc")   # a POST: Jupyter's form check
    assert posted.returncode == 1 and "refused the token" in posted.stderr and "_xsrf" not in posted.stderr
    dots = cli(env, "show", "../../etc")
    assert dots.returncode == 1 and "'../../etc' is not a valid run id" in dots.stderr
    missing = cli(env, "show", "nosuchrun")
    assert missing.returncode == 1 and "no run with id 'nosuchrun'" in missing.stderr
    usage = cli(env, "show")
    assert usage.returncode == 2 and "usage: jupyter handoff show ID" in usage.stderr
    unset = {k: v for k, v in env.items() if k not in ("HANDOFF_SERVER_URL", "HANDOFF_TOKEN")}
    nowhere = cli(unset, "list")
    assert nowhere.returncode == 1 and "HANDOFF_SERVER_URL" in nowhere.stderr


def test_settings_come_from_handoff_json(server: JupyterServerProcess, env: dict[str, str],
                                         tmp_path: Path) -> None:
    """The same ~/.jupyter/handoff.json the magics read (JUPYTER_CONFIG_DIR moves it)."""
    (tmp_path / "handoff.json").write_text(json.dumps({"server_url": server.url, "token": server.token}))
    e = {k: v for k, v in env.items() if k not in ("HANDOFF_SERVER_URL", "HANDOFF_TOKEN")}
    e["JUPYTER_CONFIG_DIR"] = str(tmp_path)
    listed = cli(e, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)


def test_jupyter_dispatches_to_the_handoff_subcommand() -> None:
    """`jupyter handoff` works once the package is installed (console script jupyter-handoff)."""
    jupyter = Path(sys.executable).with_name("jupyter")
    out = subprocess.run([str(jupyter), "handoff", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for sub in ("list", "show", "follow", "answer", "cancel", "diff", "open", "mcp"):
        assert f"\n{sub}\n" in out.stdout


def test_the_terminal_client_loads_no_notebook_widget_code() -> None:
    """`jupyter handoff` starts without importing ipywidgets/IPython (they doubled its start-up);
    the notebook actions still load on first use."""
    code = ("import sys, handoff_magic.cli, handoff_magic.mcp\n"
            "print(sorted(m for m in ('ipywidgets', 'IPython', 'handoff_magic.local.widget') if m in sys.modules))\n"
            "from handoff_magic.remote import pull\n"
            "print(pull.__module__, 'ipywidgets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[]", "handoff_magic.remote.journey True"], out.stdout
