"""InProcessExecutor: code runs in the shell's namespace and history, outputs shown and captured.

Most tests use an in-process IPython shell; the last ones run inside a real ipykernel (through
jupyter_client) to check the tees against the kernel's own display publisher, display hook
and output streams, and a real kernel interrupt.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from handoff_magic.agent.executors import ExecResult, Executor, InProcessExecutor


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


@pytest.fixture(scope="module")
def ex(shell):
    return InProcessExecutor(shell)


def kinds(res: ExecResult) -> list[str]:
    return [o["output_type"] for o in res.outputs]


def test_protocol_and_basic_capture(ex, shell, capsys):
    assert isinstance(ex, Executor)
    n = len(shell.user_ns["In"])
    res = ex.execute("exec_x = 41\nprint('to stdout')\nimport sys; print('to stderr', file=sys.stderr)\nexec_x + 1")
    assert res.status == "ok" and res.error is None
    assert res.stdout == "to stdout\n" and res.stderr == "to stderr\n"
    assert res.result == "42"
    assert kinds(res) == ["stream", "stream", "execute_result"]
    assert res.outputs[2] == {"output_type": "execute_result", "data": {"text/plain": "42"}, "metadata": {},
                              "execution_count": res.execution_count}
    json.dumps(res.outputs)                                   # nbformat outputs are JSON
    # the user saw it too, and can rerun it from history
    shown = capsys.readouterr()
    assert "to stdout" in shown.out and "to stderr" in shown.err and "42" in shown.out
    assert shell.user_ns["exec_x"] == 41
    assert shell.user_ns["In"][n].startswith("exec_x = 41")
    assert shell.user_ns["Out"][res.execution_count] == 42
    assert sys.stdout is not None and type(sys.stdout).__name__ != "_Tee"   # tees removed


def test_errors_carry_a_clean_traceback(ex):
    res = ex.execute("def g():\n    return 1 / 0\ng()")
    assert res.status == "error"
    assert res.error["ename"] == "ZeroDivisionError" and res.error["evalue"] == "division by zero"
    text = "\n".join(res.error["traceback"])
    assert "return 1 / 0" in text and "\x1b[" not in text
    assert kinds(res) == ["error"]
    syntax = ex.execute("def broken(:")
    assert syntax.status == "error" and syntax.error["ename"] == "SyntaxError"


def test_rich_display_and_clear_output(ex):
    res = ex.execute("from IPython.display import HTML, display, clear_output\n"
                     "display(HTML('<b>old</b>'))\nclear_output()\ndisplay(HTML('<b>new</b>'))")
    assert kinds(res) == ["display_data"]
    assert res.outputs[0]["data"]["text/html"] == "<b>new</b>"


def test_png_bytes_are_stored_base64(ex):
    res = ex.execute("from IPython.display import Image, display\n"
                     "display(Image(b'\\x89PNG\\r\\n\\x1a\\n' + bytes(24)))")
    png = res.outputs[0]["data"]["image/png"]
    assert isinstance(png, str) and png.startswith("iVBORw0KGgo")


def test_interrupt_from_another_thread_while_running_in_a_background_thread(ex, shell):
    box = {}
    worker = threading.Thread(target=lambda: box.update(
        res=ex.execute("import time\nfor _ in range(500):\n    time.sleep(0.01)\nbg_done = True")))
    worker.start()
    time.sleep(0.3)
    assert ex.running
    ex.interrupt()
    worker.join(5)
    assert box["res"].status == "interrupted"
    assert box["res"].error["ename"] == "KeyboardInterrupt"
    assert "bg_done" not in shell.user_ns
    assert ex.execute("1 + 1").status == "ok"               # no stray interrupt left behind


def test_interrupt_while_running_in_the_main_thread_wakes_sleep(ex):
    threading.Timer(0.3, ex.interrupt).start()
    t0 = time.monotonic()
    res = ex.execute("import time\ntime.sleep(20)")
    assert res.status == "interrupted" and time.monotonic() - t0 < 5


def test_timeout_stops_runaway_code(ex):
    res = ex.execute("while True:\n    pass", timeout=0.3)
    assert res.status == "timeout"


def test_interrupts_work_where_sigint_was_ignored(ex):
    """IPython started from a background shell or a service inherits SIGINT ignored; a timeout
    and an interrupt still stop the agent's code, and the disposition is left as it was."""
    import signal
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert ex.execute("while True:\n    pass", timeout=0.3).status == "timeout"
        threading.Timer(0.3, ex.interrupt).start()
        t0 = time.monotonic()
        res = ex.execute("import time\ntime.sleep(20)")
        assert res.status == "interrupted" and time.monotonic() - t0 < 5
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_only_the_executing_threads_output_is_captured(ex, capsys):
    stop = threading.Event()

    def chatter():
        while not stop.is_set():
            print("user cell output")
            time.sleep(0.005)
    other = threading.Thread(target=chatter)
    other.start()
    try:
        res = ex.execute("import time\nfor i in range(5):\n    print('agent', i)\n    time.sleep(0.02)")
    finally:
        stop.set()
        other.join()
    assert res.stdout == "".join(f"agent {i}\n" for i in range(5))
    assert "user cell output" in capsys.readouterr().out


def test_interrupt_when_idle_is_harmless(ex):
    ex.interrupt()
    assert ex.execute("'still fine'").result == "'still fine'"


# -- inside a real ipykernel ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.manager import start_new_kernel
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # the kernel's default: inline plots
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run_in_kernel(kc, code: str, timeout: float = 60) -> tuple[dict, list[dict]]:
    msgs: list[dict] = []
    reply = kc.execute_interactive(code, output_hook=msgs.append, timeout=timeout)
    return reply["content"], msgs


SETUP = """
from handoff_magic.agent.executors import InProcessExecutor
import json, threading, time
ex = InProcessExecutor(get_ipython())
"""


def test_in_a_real_kernel_outputs_reach_the_user_and_the_result(kernel):
    km, kc = kernel
    reply, _ = run_in_kernel(kc, SETUP)
    assert reply["status"] == "ok", reply
    code = ("print('hello from agent')\nimport matplotlib.pyplot as plt\n"
            "plt.figure(figsize=(2, 2)); plt.plot([1, 2, 3])\nfrom IPython.display import Markdown\n"
            "display(Markdown('**md**'))\n40 + 2")
    reply, msgs = run_in_kernel(kc, f"r = ex.execute({code!r})\nprint('RESULT', json.dumps(r.__dict__))")
    assert reply["status"] == "ok"
    streams = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    assert "hello from agent" in streams                                     # shown to the user
    shown = [m["msg_type"] for m in msgs if m["msg_type"] in ("display_data", "execute_result")]
    assert shown.count("display_data") == 2 and "execute_result" in shown
    res = json.loads(streams.split("RESULT ", 1)[1])
    assert res["status"] == "ok" and res["stdout"] == "hello from agent\n" and res["result"] == "42"
    data_kinds = [list(o.get("data", {})) for o in res["outputs"]]
    assert any("image/png" in d for d in data_kinds)
    assert any("text/markdown" in d for d in data_kinds)
    assert res["outputs"][-1]["output_type"] == "display_data"   # the inline figure, flushed after the cell
    reply, msgs = run_in_kernel(kc, "print(In[-2][:20])")
    assert "print('hello from a" in "".join(m["content"].get("text", "") for m in msgs)


def test_in_a_real_kernel_background_thread_and_kernel_interrupt(kernel):
    km, kc = kernel
    run_in_kernel(kc, SETUP)
    code = textwrap.dedent("""
        box = {}
        code = "import time\\nfor _ in range(1000): time.sleep(0.01)"
        t = threading.Thread(target=lambda: box.update(r=ex.execute(code)))
        t.start(); time.sleep(0.3); ex.interrupt(); t.join(5)
        print('BG', box['r'].status)
    """)
    _, msgs = run_in_kernel(kc, code)
    assert "BG interrupted" in "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")

    # a kernel interrupt (what the user's stop button sends) while agent code runs in the main thread
    threading.Timer(1.0, km.interrupt_kernel).start()
    reply, msgs = run_in_kernel(kc, "r = ex.execute('import time\\ntime.sleep(30)')\nprint('FG', r.status)")
    assert reply["status"] == "ok"
    assert "FG interrupted" in "".join(m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream")
