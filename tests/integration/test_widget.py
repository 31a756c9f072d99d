"""RunWidget: traits per status, plan/log rendering, thread-safe updates, text fallback, and the
widget state a real kernel leaves in an executed notebook (nbclient, store_widget_state=True)."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import nbformat
import pytest
from IPython.lib.pretty import pretty
from nbclient import NotebookClient

from handoff_magic.state import RUN_STATUSES, RunState
from handoff_magic.local.widget import STATUS_LABELS, RunWidget

pytestmark = pytest.mark.timeout(120)

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"


def make(status: str = "idle", **kw: Any) -> tuple[RunState, RunWidget]:
    state = RunState(goal="clean sales.csv and fit a forecast", model="scripted:demo.json", **kw)
    state.status = status
    return state, RunWidget(state)


def emit(state: RunState, widget: RunWidget, type: str, **data: Any) -> None:
    widget.show_event(state.emit(type, **data))


def set_status(state: RunState, widget: RunWidget, status: str, **data: Any) -> None:
    ev = state.set_status(status, **data)
    assert ev is not None
    widget.show_event(ev)


def enabled(widget: RunWidget) -> set[str]:
    return {k for k, b in widget.buttons.items() if not b.disabled}


# -- header and badge -------------------------------------------------------------------------

@pytest.mark.parametrize("status", RUN_STATUSES)
def test_status_badge_shows_status(status: str) -> None:
    _, w = make(status)
    header = w._header.value
    assert f'class="jh-badge jh-s-{status}" data-status="{status}">{STATUS_LABELS[status]}</span>' in header
    assert "clean sales.csv and fit a forecast" in header and "scripted:demo.json" in header
    assert w.status == status


def test_badge_follows_status_events_and_html_is_escaped() -> None:
    state = RunState(goal="<script>alert(1)</script> & co", model="openai:gpt-4o")
    w = RunWidget(state)
    assert "<script>alert(1)" not in w._header.value and "&lt;script&gt;" in w._header.value
    set_status(state, w, "running")
    assert 'data-status="running">running<' in w._header.value
    set_status(state, w, "paused", reason="pause requested; continue the run to resume")
    assert 'data-status="paused">paused<' in w._header.value
    assert 'data-level="warn"' in w._message.value and "pause requested" in w._message.value


def test_model_retry_notice_shows_then_clears_when_the_model_answers() -> None:
    state, w = make("running")
    set_status(state, w, "running", reason="model call failed: HTTP 429; retrying in 2.0s (attempt 2 of 4)")
    assert 'data-level="warn"' in w._message.value and "retrying in 2.0s" in w._message.value
    assert 'data-status="running"' in w._header.value
    emit(state, w, "assistant", text="Here is the next step")
    assert w._message.value == ""


# -- plan -----------------------------------------------------------------------------------

def test_plan_is_a_live_checklist() -> None:
    state, w = make("running")
    assert "No plan yet" in w._plan.value
    emit(state, w, "plan", steps=[{"text": "Load <data>", "status": "done"}, {"text": "Fit", "status": "active"},
                                  {"text": "Evaluate", "status": "pending"}, {"text": "Plot", "status": "failed"}])
    html = w._plan.value
    assert html.count("<li ") == 4 and "Plan · 1/4 done" in html
    for text, status, icon in (("Load &lt;data&gt;", "done", "✓"), ("Fit", "active", "◐"),
                               ("Evaluate", "pending", "○"), ("Plot", "failed", "✗")):
        assert f'data-status="{status}"><span class="jh-ico{" jh-spin" if status == "active" else ""}">' \
               f'{icon}</span><span class="jh-txt">{text}</span>' in html
    emit(state, w, "plan", steps=[{"text": "Load", "status": "done"}])
    assert w._plan.value.count("<li ") == 1 and "1/1 done" in w._plan.value


# -- step log ---------------------------------------------------------------------------------

def test_step_log_shows_words_code_and_short_results_newest_last() -> None:
    state, w = make("running")
    emit(state, w, "assistant", text="Loading the data")
    emit(state, w, "tool_call", id="c1", name="run_python", arguments={"code": "df = load('<x>')\ndf.head()"})
    assert '<pre class="jh-code">df = load(&#x27;&lt;x&gt;&#x27;)\ndf.head()</pre>' in w._log.value
    emit(state, w, "tool_result", id="c1", name="run_python", content="[ok]\n" + "row\n" * 50, is_error=False)
    assert "… (38 more lines)" in w._log.value and "[ok]" not in w._log.value
    emit(state, w, "assistant", text="Oops")
    emit(state, w, "tool_call", id="c2", name="run_python", arguments={"code": "1/0"})
    emit(state, w, "tool_result", id="c2", name="run_python", content="ZeroDivisionError", is_error=True)
    log = w._log.value
    assert log.index("Loading the data") < log.index("Oops")          # newest last
    assert '<div class="jh-result jh-err">ZeroDivisionError</div>' in log
    assert w._log_box.titles == ("Step log · 2 steps",)
    # a turn without words still gets its own numbered entry; the user's answer is a note
    emit(state, w, "answer", answer="use <metres>")
    emit(state, w, "tool_call", id="c3", name="run_python", arguments={"code": "x = 1"})
    emit(state, w, "tool_result", id="c3", name="run_python", content="[ok]", is_error=False)
    emit(state, w, "tool_call", id="c4", name="finish", arguments={"summary": "done"})
    log = w._log.value
    assert '<div class="jh-step jh-note"><div class="jh-tool">You answered: use &lt;metres&gt;</div></div>' in log
    assert log.index("You answered") < log.index("#3") < log.index("x = 1") < log.index("#4") \
        < log.index("finished: done")
    assert w._log_box.titles == ("Step log · 4 steps",)
    for i in range(60):
        emit(state, w, "assistant", text=f"step {i}")
    assert "25 earlier entries not shown" in w._log.value and "step 59" in w._log.value
    assert "step 0<" not in w._log.value


# -- buttons and answer box per status -------------------------------------------------------

LOCAL = {
    "idle": {"handoff", "cancel"},
    "running": {"handoff", "pause", "cancel"},
    "paused": {"handoff", "continue", "cancel"},
    "waiting_input": {"handoff", "cancel"},
    "completed": set(),
    "failed": {"continue"},
    "cancelled": set(),
}
REMOTE = {
    "queued": {"reattach", "diff", "pull", "notebook", "cancel"},
    "running": {"reattach", "diff", "pull", "notebook", "cancel"},
    "waiting_input": {"reattach", "diff", "pull", "notebook", "cancel"},
    "handed_off": {"reattach", "diff", "pull", "notebook", "cancel"},
    "completed": {"reattach", "diff", "pull", "notebook"},
    "cancelled": {"reattach", "diff", "notebook"},
    "pulled": {"diff", "notebook"},
}


@pytest.mark.parametrize("status", LOCAL)
def test_local_buttons_enabled_by_status(status: str) -> None:
    _, w = make(status)
    assert enabled(w) == LOCAL[status]
    assert w.buttons["pause"].layout.display != "none"
    for key in ("reattach", "diff", "pull", "notebook"):
        assert "handed off" in w.buttons[key].tooltip     # a greyed button says why


def test_pause_disabled_for_a_run_occupying_the_cell() -> None:
    state, w = make("idle")
    w.pausable = False                        # LocalRun sets this for foreground runs
    set_status(state, w, "running")
    assert "pause" not in enabled(w) and "interrupt the kernel" in w.buttons["pause"].tooltip
    w.pausable = True
    set_status(state, w, "paused")
    set_status(state, w, "running")
    assert "pause" in enabled(w)


@pytest.mark.parametrize("status", REMOTE)
def test_remote_buttons_enabled_by_status(status: str) -> None:
    _, w = make(status)
    w.set_remote("http://127.0.0.1:8888", "r123", {"status_page": "http://127.0.0.1:8888/handoff/runs/r123"})
    assert enabled(w) == REMOTE[status]
    assert w.buttons["pause"].layout.display == "none"
    assert "remote · http://127.0.0.1:8888 · run r123" in w._header.value
    assert 'href="http://127.0.0.1:8888/handoff/runs/r123"' in w._header.value


def test_handoff_and_pull_events_switch_between_local_and_remote() -> None:
    state, w = make("running")
    set_status(state, w, "handed_off")
    emit(state, w, "handoff", server="http://srv:1", remote_id="abc")
    assert "remote · http://srv:1 · run abc" in w._header.value and "Handed off to http://srv:1" in w._message.value
    assert "reattach" in enabled(w) and "handoff" not in enabled(w)
    set_status(state, w, "paused", reason="pulled back")
    emit(state, w, "pull", server="http://srv:1", remote_id="abc")
    assert "local · run" in w._header.value and "handoff" in enabled(w) and "reattach" not in enabled(w)
    w.show_state(state)           # a full refresh agrees with the incremental updates
    assert "local · run" in w._header.value and "handoff" in enabled(w)


def test_answer_box_only_while_waiting_input() -> None:
    state, w = make("running")
    assert w.answer_box.layout.display == "none" and w.answer_button.disabled
    state.question = "Which column holds the date?"
    emit(state, w, "question", question=state.question)
    set_status(state, w, "waiting_input", reason="the agent asked a question")
    assert w.answer_box.layout.display == "" and not w.answer_button.disabled
    assert "The agent asks: Which column holds the date?" in w._question.value
    set_status(state, w, "running")
    assert w.answer_box.layout.display == "none" and w._question.value == ""


def test_buttons_without_controller_say_not_connected() -> None:
    _, w = make("paused")
    w.buttons["handoff"].click()
    assert "Not connected to a server" in w._message.value and "%handoff --to URL" in w._message.value
    w.buttons["cancel"].click()
    assert "not attached to a run" in w._message.value
    state, w = make("running")
    state.question = "?"
    set_status(state, w, "waiting_input")
    w.answer_button.click()                       # empty answer: nothing sent, says what to do
    assert "Type an answer first" in w._message.value


class _Failing:
    """A controller whose actions fail the ways real ones do."""

    def handoff(self) -> None:
        from handoff_magic.remote import HandoffError
        raise HandoffError("handoff failed: no server configured: set HANDOFF_SERVER_URL and "
                           "HANDOFF_TOKEN. The local run is unchanged.")

    def review_diff(self) -> None:
        from handoff_magic.remote.http import ServerUnreachable
        raise ServerUnreachable("cannot reach http://srv:1", "start the server or fix the URL")

    def pull_back(self) -> None:
        return {}["missing"]   # type: ignore[return-value, index]  # a bug: KeyError


def test_failed_action_shows_one_clear_line_and_a_traceback_only_for_bugs() -> None:
    _, w = make("paused")
    w.controller = _Failing()  # type: ignore[assignment]  # a stand-in with the same methods
    w.buttons["handoff"].click()
    msg = w._message.value
    assert 'data-level="error"' in msg and "Hand off failed: no server configured" in msg
    assert "failed: handoff failed" not in msg.lower() and "<details" not in msg
    w.set_remote("http://srv:1", "abc")
    w.buttons["diff"].click()
    msg = w._message.value
    assert "Review diff failed: cannot reach http://srv:1: start the server or fix the URL" in msg
    assert msg.count("start the server") == 1 and "<details" not in msg
    w.buttons["pull"].click()        # unexpected: one line, the traceback collapsed under it
    msg = w._message.value
    assert "Pull back failed unexpectedly (KeyError: &#x27;missing&#x27;)" in msg
    assert '<details class="jh-details"><summary>' in msg and "Traceback (most recent call last)" in msg
    assert "<details open" not in msg
    assert w.action_output.outputs == ()      # nothing red printed below the widget


def test_progress_bar_hides_once_its_transfer_is_done() -> None:
    state, w = make("paused")
    w.set_progress("upload", 6_000_000, 6_000_000)
    assert w._progress.layout.display == ""
    emit(state, w, "handoff", server="http://srv:1", remote_id="abc")
    assert w._progress.layout.display == "none"
    w.set_progress("pull", 10, 10)
    w.show_state(state)
    emit(state, w, "pull", server="http://srv:1", remote_id="abc")
    assert w._progress.layout.display == "none" and "Pulled back into this kernel" in w._message.value


# -- progress and messages ------------------------------------------------------------------

def test_progress_bar_and_messages() -> None:
    _, w = make("running")
    assert w._progress.layout.display == "none"
    w.set_progress("Uploading", 1_500_000, 6_000_000)
    assert w._progress.layout.display == "" and w._progress_bar.value == pytest.approx(0.25)
    assert w._progress_label.value == "Uploading: 1.5 MB of 6.0 MB (25%)"
    w.set_progress("Uploading", 6_000_000, 6_000_000)
    assert w._progress_bar.bar_style == "success"
    w.set_progress("", 0, 0)
    assert w._progress.layout.display == "none"
    w.show_message("upload failed: connection refused", "error")
    assert 'data-level="error"' in w._message.value
    w.show_message("lost contact, retrying", "warning")        # remote.py's spelling
    assert 'data-level="warn"' in w._message.value
    w.show_message("The run's notebook:", link="http://h/lab/tree/x.ipynb")
    assert 'href="http://h/lab/tree/x.ipynb"' in w._message.value
    w.show_message("")
    assert w._message.value == ""


# -- text rendering without a widget front end --------------------------------------------------

def test_plain_text_rendering_never_shows_vbox() -> None:
    state, w = make("running")
    emit(state, w, "plan", steps=[{"text": "Load", "status": "done"}, {"text": "Fit", "status": "active"}])
    state.question = "Which model?"
    emit(state, w, "question", question="Which model?")
    set_status(state, w, "waiting_input")
    text = w._repr_mimebundle_()["text/plain"]
    assert VIEW in w._repr_mimebundle_()
    assert text.splitlines()[0] == "Agent run [waiting for input] clean sales.csv and fit a forecast"
    assert "    ✓ Load" in text and "    ◐ Fit" in text
    assert 'Answer with: %agent continue "your answer"' in text
    assert pretty(w) == text and repr(w) == text and "VBox" not in text


# -- updates from other threads -------------------------------------------------------------

def test_concurrent_updates_from_threads_are_consistent() -> None:
    state, w = make("running")
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(50):
                with lock:
                    ev = state.emit("assistant", text=f"t{n}-{i}")
                w.show_event(ev)
                w.set_progress("upload", i, 50)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        w.show_state(state)
    for t in threads:
        t.join()
    assert errors == []
    w.show_state(state)
    assert w._log_box.titles == ("Step log · 200 steps",)


# -- the widget state a real kernel leaves in an executed notebook ------------------------------

SOLVE = [
    {"text": "Loading.", "tool_calls": [
        {"name": "update_plan", "arguments": {"steps": [{"text": "Load sales.csv", "status": "active"},
                                                        {"text": "Revenue per region", "status": "pending"}]}},
        {"name": "run_python", "arguments": {"code": "import csv\nrows = list(csv.DictReader(open('sales.csv')))"}}]},
    {"text": "Aggregating.", "tool_calls": [
        {"name": "update_plan", "arguments": {"steps": [{"text": "Load sales.csv", "status": "done"},
                                                        {"text": "Revenue per region", "status": "done"}]}},
        {"name": "run_python", "arguments": {"code": "total = sum(int(r['revenue']) for r in rows)"}},
        {"name": "finish", "arguments": {"summary": "total holds the revenue"}}]},
]
ASK = [
    {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "Which unit?"}}]},
    {"text": "", "tool_calls": [{"name": "run_python",
                                 "arguments": {"code": "unit_answered = True\nprint('converted to metres')"}},
                                {"name": "finish", "arguments": {"summary": "ok"}}]},
]

EVIL = "<script>window.pwned = 1</script><img src=x onerror=alert(1)>"  # in a DataFrame step's HTML
TABLE = [
    {"text": "Showing the table.", "tool_calls": [{"name": "run_python", "arguments": {"code": (
        "import pandas as pd\nfrom IPython.display import HTML, display\n"
        "df = pd.DataFrame({'region': ['north', 'south'], 'revenue': [10, 20]})\nprint('loaded 2 rows')\n"
        f"display(HTML(df._repr_html_() + {EVIL!r}))")}},
        {"name": "finish", "arguments": {"summary": "shown"}}]},
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    d: Path = tmp_path_factory.mktemp("widgetnb")
    (d / "sales.csv").write_text("region,revenue\nnorth,10\nsouth,20\n")
    (d / "solve.json").write_text(json.dumps(SOLVE))
    (d / "ask.json").write_text(json.dumps(ASK))
    (d / "table.json").write_text(json.dumps(TABLE))
    cells = [
        "%load_ext handoff_magic",
        f"%agent --model scripted:{d / 'solve.json'} total revenue",
        # Hand off with no server configured: the widget tells the user what to set
        "from handoff_magic.local.run import current_run\nw = current_run().widget\n"
        "w.buttons['handoff'].click()\nprint(w._message.value)",
        f"%agent --model scripted:{d / 'ask.json'} convert units",
        # the answer box and Send button resume the run (in the background)
        "r = current_run()\nr.widget.answer_text.value = 'metres'\nr.widget.answer_button.click()\n"
        "print(r.wait_paused(20), r.status, unit_answered)",
        f"%agent --model scripted:{d / 'table.json'} show the table",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=60, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(d)}}).execute()
    return nb


def _models(nb: nbformat.NotebookNode) -> dict[str, Any]:
    return nb.metadata["widgets"][WIDGET_STATE]["state"]


def test_notebook_widget_state_holds_the_finished_run(executed: nbformat.NotebookNode) -> None:
    models = _models(executed)
    view = [o["data"][VIEW]["model_id"] for o in executed.cells[1].outputs if VIEW in o.get("data", {})]
    assert view and view[0] in models
    root = models[view[0]]
    assert root["model_name"] == "VBoxModel" and "jh-run" in root["state"]["_dom_classes"]
    child_ids = [c.removeprefix("IPY_MODEL_") for c in root["state"]["children"]]
    values = [models[c]["state"].get("value", "") for c in child_ids if models[c]["model_name"] == "HTMLModel"]
    header, plan = values[0], values[1]
    assert 'data-status="completed">completed<' in header and "total revenue" in header
    assert 'data-status="done"><span class="jh-ico">✓</span><span class="jh-txt">Load sales.csv' in plan
    assert "Revenue per region" in plan and "2/2 done" in plan
    # the text fallback saved alongside the view, for nbconvert / GitHub
    text = [o["data"]["text/plain"] for o in executed.cells[1].outputs if VIEW in o.get("data", {})][0]
    assert text.startswith("Agent run [")


def test_handoff_click_without_server_says_what_to_set(executed: nbformat.NotebookNode) -> None:
    out = "".join(o.get("text", "") for o in executed.cells[2].outputs if o.get("name") == "stdout")
    assert 'data-level="error"' in out and "Hand off failed" in out
    assert "HANDOFF_SERVER_URL" in out
    # one clear line: no doubled prefix, no traceback in the cell or in the widget's action area
    assert "failed: handoff failed" not in out.lower() and "<details" not in out
    assert not [o for o in executed.cells[2].outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    shown = [o for m in _models(executed).values() if m["model_name"] == "OutputModel"
             for o in m["state"].get("outputs", [])]
    assert not [o for o in shown if o.get("output_type") == "error" or o.get("name") == "stderr"], shown


def test_answer_box_send_resumes_run(executed: nbformat.NotebookNode) -> None:
    out = "".join(o.get("text", "") for o in executed.cells[4].outputs if o.get("name") == "stdout")
    # clicked from this cell, so this cell is the request the resumed run's output belongs to
    # (whether the thread's buffered stream is flushed before the cell ends is up to ipykernel)
    assert out.splitlines()[-1] == "True completed True"
    assert set(out.splitlines()[:-1]) <= {"converted to metres"}
    models = _models(executed)
    texts = [m["state"].get("value") for m in models.values() if m["model_name"] == "TextModel"]
    assert "" in texts                                 # the box was cleared after sending
    html = " ".join(str(m["state"].get("value", "")) for m in models.values() if m["model_name"] == "HTMLModel")
    assert "You answered: metres" in html
    # launched from a cell, the background steps' output belongs to that cell, not mirrored twice
    mirrored = [o for m in models.values() if m["model_name"] == "OutputModel"
                for o in m["state"].get("outputs", [])]
    assert not [o for o in mirrored if "converted" in str(o)]


def test_a_real_runs_dataframe_step_shows_the_table_in_the_step_log(executed: nbformat.NotebookNode) -> None:
    logs = [str(m["state"].get("value", "")) for m in _models(executed).values()
            if m["model_name"] == "HTMLModel" and "show the table" not in str(m["state"].get("value", ""))
            and "Showing the table." in str(m["state"].get("value", ""))]
    assert len(logs) == 1
    _assert_table_without_script(logs[0])


def test_model_key_never_reaches_state_or_widget(monkeypatch: pytest.MonkeyPatch) -> None:
    from handoff_magic.local.run import RUNS, LocalRun
    key = "sk-test-" + "K3y" * 10
    monkeypatch.setenv("OPENAI_API_KEY", key)
    run = LocalRun.new("fit a forecast", model="openai:gpt-4o")   # the provider holds the key
    try:
        assert run.state.model == "openai:gpt-4o"
        assert key not in run.state.to_json()
        html = " ".join(str(getattr(c, "value", "")) for c in run.widget.children) + run.widget._header.value
        assert key not in html and key not in run.widget.to_text() and key not in repr(run)
    finally:
        RUNS.pop(run.id, None)


def test_continue_button_resumes_a_paused_run() -> None:
    class Controller:
        resumed = 0

        def resume(self) -> None:
            self.resumed += 1

    _, w = make("paused")
    w.controller = c = Controller()  # type: ignore[assignment]  # a stand-in with the methods used
    assert "continue" in enabled(w) and "resume the run here" in w.buttons["continue"].tooltip
    w.buttons["continue"].click()
    assert c.resumed == 1
    w.set_remote("http://srv:1", "abc")
    assert "continue" not in enabled(w) and w.buttons["continue"].layout.display == "none"


def test_hand_off_stays_disabled_while_the_handoff_pauses_the_run() -> None:
    seen: list[bool] = []

    class Controller:
        def handoff(self) -> None:   # pausing at the step boundary happens in here
            seen.append(w.buttons["handoff"].disabled)
            w.buttons["handoff"].click()   # a second click meanwhile starts nothing
            with w.busy("handoff"):        # remote.handoff holds it too (re-entrant)
                seen.append(w.buttons["handoff"].disabled)
            seen.append(w.buttons["handoff"].disabled)

    _, w = make("running")
    w.controller = Controller()  # type: ignore[assignment]  # a stand-in with the methods used
    w.buttons["handoff"].click()
    assert seen == [True, True, True]
    assert not w.buttons["handoff"].disabled and "in progress" not in w.buttons["handoff"].tooltip


def test_after_hand_off_the_log_keeps_local_steps_and_counts_on() -> None:
    """The remote steps continue the local numbering and the header counts every step, also
    when the view is rebuilt from the remote mirror (which starts from the sent events)."""
    state, w = make("running")
    state.budgets.max_steps = 40
    for i in (1, 2):
        state.steps = i
        emit(state, w, "assistant", text=f"local step {i}")
        emit(state, w, "tool_call", id=f"l{i}", name="run_python", arguments={"code": f"x{i} = {i}"})
        emit(state, w, "tool_result", id=f"l{i}", name="run_python", content="[ok]")
    set_status(state, w, "paused", reason="handoff")
    mirror = RunState.from_dict(state.to_dict())    # what remote.handoff mirrors
    set_status(state, w, "handed_off")
    emit(state, w, "handoff", server="http://srv:1", remote_id="abc")
    for i in (3, 4, 5):   # remote turns arrive as events only
        for ev in (mirror.emit("tool_call", id=f"r{i}", name="run_python", arguments={"code": f"y = {i}"}),
                   mirror.emit("tool_result", id=f"r{i}", name="run_python", content="[ok]")):
            w.show_event(ev)
    assert "5 steps of max 40" in w._header.value
    log = w._log.value
    assert log.index("local step 1") < log.index("#2") < log.index("x2 = 2") < log.index("#5") < log.index("y = 5")
    assert w._log_box.titles == ("Step log · 5 steps",)
    mirror.steps = 5                                   # the server's count, refreshed at the end
    mirror.status = "completed"
    w.show_state(mirror)
    assert "5 steps of max 40" in w._header.value and "local step 1" in w._log.value and "#5" in w._log.value


def test_the_step_log_is_the_only_scroll_box() -> None:
    """Step results are trimmed (lines and characters) instead of scrolling inside the log."""
    import re as _re

    from handoff_magic.local.widget_css import CSS
    rules = dict(_re.findall(r"([^{}]+)\{([^}]*)\}", CSS))
    scrolling = [sel.strip() for sel, body in rules.items() if "overflow-y: auto" in body or "overflow: auto" in body]
    assert [s for s in scrolling if s.startswith(".jh-log") or s.startswith(".jh-result") or
            s.startswith(".jh-code") or s.startswith(".jh-step")] == [".jh-log"]
    state, w = make("running")
    emit(state, w, "tool_call", id="c1", name="run_python", arguments={"code": "print(1)"})
    emit(state, w, "tool_result", id="c1", name="run_python", content="\n".join(f"line {i}" for i in range(100)))
    assert "line 11" in w._log.value and "line 12<" not in w._log.value and "88 more lines" in w._log.value


def _dataframe_result(code: str = "df") -> dict[str, Any]:
    """A run_python step whose execute_result is a DataFrame with script in its HTML."""
    import pandas as pd
    df = pd.DataFrame({"region": ["north", "south"], "revenue": [10, 20]})
    out = {"output_type": "execute_result", "execution_count": 3, "metadata": {},
           "data": {"text/html": df._repr_html_() + EVIL, "text/plain": repr(df)}}
    return {"id": "c1", "name": "run_python", "is_error": False, "outputs": [
        {"output_type": "stream", "name": "stdout", "text": "loaded 2 rows\n"}, out],
        "content": f"[ok]\nstdout:\nloaded 2 rows\nOut[3]:\n[text/html]\n{df!r}"}


def _assert_table_without_script(log: str) -> None:
    import re as _re
    log = _re.sub(r'<pre class="jh-code">.*?</pre>', "", log, flags=_re.S)   # the step's code, escaped
    assert "<table" in log and "<td>north</td>" in log and "loaded 2 rows" in log
    assert "[text/html]" not in log and "<script" not in log and "pwned" not in log and "onerror" not in log


def test_a_dataframe_step_shows_its_table_sanitised_live_and_after_reattach() -> None:
    state, w = make("running")
    emit(state, w, "tool_call", id="c1", name="run_python", arguments={"code": "df"})
    emit(state, w, "tool_result", **_dataframe_result())
    _assert_table_without_script(w._log.value)
    # a reattach rebuilds the view from the remote run's state (its events carry the outputs)
    mirror = RunState.from_dict(json.loads(json.dumps(state.to_dict())))
    _, again = make("completed")
    again.show_state(mirror)
    _assert_table_without_script(again._log.value)
    # text-only steps keep their text result; an HTML output too big for the log shows as text
    emit(state, w, "tool_call", id="c2", name="run_python", arguments={"code": "big"})
    emit(state, w, "tool_result", id="c2", name="run_python", content="[ok]\nOut[4]:\n[text/html]\nbig",
         outputs=[{"output_type": "execute_result", "data": {"text/html": "<b>x</b>" * 5000,
                                                             "text/plain": "big frame"}}])
    assert '<div class="jh-result">big frame</div>' in w._log.value


def test_a_local_refresh_mid_turn_never_counts_a_step_twice() -> None:
    state, w = make("running")
    state.steps = 1            # the loop counts the turn before it emits its events
    w.show_state(state)        # e.g. the run's launch refreshing the view meanwhile
    emit(state, w, "assistant", text="one")
    emit(state, w, "tool_call", id="c1", name="run_python", arguments={"code": "x = 1"})
    assert "1 step of max" in w._header.value
