"""Agent-loop semantics with the scripted model and code running in a real IPython shell."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from tests.harness.fake_llm import FakeLLM
from handoff_magic.agent import AgentLoop, InProcessExecutor, make_provider
from handoff_magic.config import DEFAULT_SCRIPT, resolve_model_spec
from handoff_magic.state import Budgets, RunState


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


def script(tmp_path: Path, turns: list[dict], name: str = "script.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(turns))
    return f"scripted:{path}"


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def make_loop(shell, spec: str, state: RunState | None = None, **kwargs):
    state = state or RunState(goal="test goal")
    events = []
    loop = AgentLoop(state, make_provider(spec), InProcessExecutor(shell),
                     on_event=lambda s, e: events.append(e), **kwargs)
    return loop, state, events


def results(state: RunState):
    return [r for m in state.messages if m.role == "tool" for r in m.tool_results]


def test_default_demo_model_solves_its_task(shell, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = resolve_model_spec()
    assert spec == f"scripted:{DEFAULT_SCRIPT}"
    loop, state, events = make_loop(shell, spec, RunState(goal="clean the sales data and forecast"))
    n_in = len(shell.user_ns["In"])
    loop.run()
    assert state.status == "completed", state.error
    assert [p.status for p in state.plan] == ["done"] * 4
    assert (tmp_path / "demo_sales.csv").exists()
    ns = shell.user_ns
    assert len(ns["monthly"]) == 12 and ns["trend"].slope > 0 and ns["forecast"] > max(ns["monthly"].values())
    agent_cells = ns["In"][n_in:]
    assert any("linear_regression" in c for c in agent_cells)           # the agent's code is in In
    assert not any(r.is_error for r in results(state))
    # every event reached the callback, numbered without gaps
    assert events == state.events
    assert [e.seq for e in state.events] == list(range(1, len(state.events) + 1))
    assert state.events[-1].type == "status" and state.events[-1].data["status"] == "completed"
    assert {"plan", "assistant", "tool_call", "tool_result", "finish"} <= {e.type for e in state.events}


def test_step_budget_pauses_and_continue_finishes(shell, tmp_path):
    spec = script(tmp_path, [{"tool_calls": [call("run_python", code=f"budget_{i} = {i}")]} for i in range(3)]
                  + [{"tool_calls": [call("finish", summary="all set")]}])
    loop, state, _ = make_loop(shell, spec, RunState(goal="g", budgets=Budgets(max_steps=2)))
    loop.run()
    assert state.status == "paused" and state.steps == 2
    assert "step budget" in state.events[-1].data["reason"]
    assert "budget_2" not in shell.user_ns
    # the run travels as JSON and a fresh loop + provider continue at the next unplayed turn
    state = RunState.from_json(state.to_json())
    loop2, state, _ = make_loop(shell, spec, state)
    loop2.run()
    assert state.status == "completed" and state.summary == "all set"
    assert state.steps == 4 and shell.user_ns["budget_2"] == 2


def test_time_budget_pauses_without_failing(shell, tmp_path):
    spec = script(tmp_path, [{"tool_calls": [call("run_python", code="import time; time.sleep(0.3)")]},
                             {"tool_calls": [call("finish", summary="x")]}])
    loop, state, _ = make_loop(shell, spec, RunState(goal="g", budgets=Budgets(max_seconds=0.2)))
    loop.run()
    assert state.status == "paused" and state.steps == 1
    assert "time budget" in state.events[-1].data["reason"]
    loop.run()
    assert state.status == "completed"


def test_ask_user_round_trip_over_openai_wire(shell):
    with FakeLLM() as llm:
        llm.reply("I need one thing.",
                  tool_calls=[("ask_user", {"question": "Which column is the target?"}, "call_ask"),
                              ("run_python", {"code": "after_ask = 1"}, "call_after")])
        llm.reply(tool_calls=[("run_python", {"code": "target = 'revenue'"}, "call_use")])
        llm.reply(tool_calls=[("finish", {"summary": "target set"}, "call_fin")])
        provider = make_provider("openai:m", api_key=llm.api_key, base_url=llm.openai_base_url, backoff_base=0.01)
        state = RunState(goal="fit a model")
        loop = AgentLoop(state, provider, InProcessExecutor(shell))
        loop.run()
        assert state.status == "waiting_input"
        assert state.question == "Which column is the target?"
        assert "after_ask" not in shell.user_ns          # calls after ask_user wait for the answer
        loop.run()                                       # no answer yet: still waiting, no model call
        assert state.status == "waiting_input" and len(llm.requests) == 1

        loop.run(answer="revenue")
        assert state.status == "completed", state.error
        assert state.question is None and shell.user_ns["target"] == "revenue"
        sent = llm.requests[1].body["messages"]
        tool_msgs = [m for m in sent if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in tool_msgs] == ["call_ask", "call_after"]
        assert "revenue" in tool_msgs[0]["content"]
        assert "not run" in tool_msgs[1]["content"]
        assert any(e.type == "answer" and e.data["answer"] == "revenue" for e in state.events)


LONG_LOOP = "import time\nfor _ in range(400):\n    time.sleep(0.01)\nslow_done = True"


def test_interrupt_in_background_thread_pauses_and_continue_completes(shell, tmp_path):
    spec = script(tmp_path, [
        {"tool_calls": [call("update_plan", steps=[{"text": "slow work", "status": "active"}]),
                        call("run_python", code=LONG_LOOP), call("run_python", code="never_run = 1")]},
        {"tool_calls": [call("run_python", code="redone = True")]},
        {"tool_calls": [call("finish", summary="done after interrupt")]},
    ])
    shell.user_ns.pop("slow_done", None)
    loop, state, events = make_loop(shell, spec)
    started = threading.Event()
    loop.on_event = lambda s, e: (events.append(e), e.type == "tool_call" and e.data["name"] == "run_python"
                                  and started.set())
    worker = threading.Thread(target=loop.run)
    worker.start()
    assert started.wait(10)
    time.sleep(0.3)
    loop.executor.interrupt()
    worker.join(10)
    assert state.status == "paused"
    assert any(e.type == "interrupted" for e in state.events)
    assert [p.text for p in state.plan] == ["slow work"]           # plan kept
    cut, skipped = results(state)[1:]
    assert cut.is_error and "interrupted" in cut.content
    assert "not run" in skipped.content
    assert "slow_done" not in shell.user_ns and "never_run" not in shell.user_ns

    loop.run()
    assert state.status == "completed" and shell.user_ns["redone"] is True


def test_keyboard_interrupt_during_model_call_pauses_at_step_boundary(shell):
    with FakeLLM() as llm:
        llm.reply(tool_calls=[("run_python", {"code": "before_hang = 1"})])
        llm.fault_hang(20)
        llm.reply(tool_calls=[("finish", {"summary": "resumed"})])
        provider = make_provider("anthropic:m", api_key=llm.api_key, base_url=llm.anthropic_base_url, timeout=15)
        state = RunState(goal="g")
        loop = AgentLoop(state, provider, InProcessExecutor(shell))
        timer = threading.Timer(0.0, lambda: None)

        def on_event(s, e):
            nonlocal timer
            if e.type == "tool_result":     # the next thing the loop does is the hanging model call
                timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # a kernel interrupt
                timer.start()
        loop.on_event = on_event
        loop.run()
        timer.join()
        assert state.status == "paused" and state.steps == 1
        assert any(e.type == "interrupted" for e in state.events)
        assert not loop._dangling_calls()
        loop.on_event = None
        loop.run()
        assert state.status == "completed" and state.summary == "resumed"


def test_pause_request_takes_effect_at_step_boundary(shell, tmp_path):
    spec = script(tmp_path, [{"tool_calls": [call("run_python", code="p1 = 1")]},
                             {"tool_calls": [call("run_python", code="p2 = 2")]},
                             {"tool_calls": [call("finish", summary="ok")]}])
    loop, state, _ = make_loop(shell, spec, should_pause=lambda: state.steps >= 1)
    loop.run()
    assert state.status == "paused" and state.steps == 1
    assert "pause requested" in state.events[-1].data["reason"]
    loop.should_pause = None
    loop.run()
    assert state.status == "completed"


def test_unknown_tools_and_bad_arguments_go_back_to_the_model(shell, tmp_path):
    spec = script(tmp_path, [
        {"tool_calls": [call("delete_everything"), call("run_python", cmd="x"),
                        call("update_plan", steps=[{"text": "a", "status": "started"}])]},
        {"tool_calls": [call("finish", summary="recovered")]},
    ])
    loop, state, _ = make_loop(shell, spec)
    loop.run()
    assert state.status == "completed"
    unknown, missing, bad_status = results(state)[:3]
    assert unknown.is_error and "unknown tool 'delete_everything'" in unknown.content \
        and "run_python" in unknown.content
    assert missing.is_error and "needs the argument 'code'" in missing.content
    assert bad_status.is_error and "'started'" in bad_status.content


def test_provider_failure_waits_for_input_and_retry_resumes(shell):
    with FakeLLM() as llm:
        for _ in range(2):
            llm.fault_500()
        provider = make_provider("openai:m", api_key=llm.api_key, base_url=llm.openai_base_url,
                                 backoff_base=0.01, max_retries=1)
        state = RunState(goal="g")
        loop = AgentLoop(state, provider, InProcessExecutor(shell))
        loop.run()
        assert state.status == "waiting_input"
        retrying = [e for e in state.events if e.type == "status" and e.data["status"] == "running"
                    and "retrying in" in e.data.get("reason", "")]
        assert len(retrying) == 1 and "HTTP 500" in retrying[0].data["reason"]   # the user saw the retry
        assert "HTTP 500" in state.question and "retry" in state.question
        assert "HTTP 500" in state.error
        assert any(e.type == "error" for e in state.events)

        llm.reply(tool_calls=[("finish", {"summary": "back"})])
        loop.run(answer="retry")
        assert state.status == "completed" and state.error is None
        # "retry" is not sent to the model as a user message
        assert [m["role"] for m in llm.requests[-1].body["messages"]] == ["system", "user"]


def test_plain_text_reply_becomes_a_question(shell, tmp_path):
    spec = script(tmp_path, [{"text": "Should I drop the outliers?"},
                             {"tool_calls": [call("finish", summary="kept them")]}])
    loop, state, _ = make_loop(shell, spec)
    loop.run()
    assert state.status == "waiting_input" and state.question == "Should I drop the outliers?"
    loop.run(answer="no, keep them")
    assert state.status == "completed"
    assert state.messages[2].role == "user" and state.messages[2].text == "no, keep them"


def test_cut_off_step_is_reported_as_interrupted_on_resume(shell, tmp_path):
    spec = script(tmp_path, [{"tool_calls": [call("run_python", code="crash_step = 1")]},
                             {"tool_calls": [call("finish", summary="after crash")]}])
    loop, state, _ = make_loop(shell, spec, RunState(goal="g", budgets=Budgets(max_steps=1)))
    loop.run()
    # simulate a crash between the model turn and its tool results (e.g. the server died)
    data = state.to_dict()
    data["messages"] = data["messages"][:-1]
    data["status"] = "running"
    state = RunState.from_dict(data)
    loop2, state, _ = make_loop(shell, spec, state)
    loop2.run()
    assert state.status == "completed"
    cut = results(state)[0]
    assert cut.is_error and "cut off" in cut.content


def test_run_python_results_for_the_model(shell, tmp_path):
    png = ("import io, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
           "from IPython.display import Image, display\nfig = plt.figure(figsize=(4, 3), dpi=100)\n"
           "plt.plot([1, 3, 2]); buf = io.BytesIO(); fig.savefig(buf, format='png'); plt.close(fig)\n"
           "display(Image(buf.getvalue()))")
    spec = script(tmp_path, [{"tool_calls": [
        call("run_python", code=png),
        call("run_python", code="for i in range(3000): print('line', i)"),
        call("run_python", code="def f():\n    raise ValueError('bad value')\nf()"),
        call("run_python", code="{'a': 1}"),
    ]}, {"tool_calls": [call("finish", summary="x")]}])
    loop, state, _ = make_loop(shell, spec)
    loop.run()
    image, long, error, value = results(state)[:4]
    assert "[image/png 400x300]" in image.content
    assert any(o["output_type"] == "display_data" and "image/png" in o["data"] for o in image.outputs)
    assert "line 0" in long.content and "line 2999" in long.content and "characters trimmed" in long.content
    assert len(long.content) < 9000
    assert error.is_error and "ValueError: bad value" in error.content and "raise ValueError" in error.content
    assert "\x1b[" not in error.content
    assert "{'a': 1}" in value.content and not value.is_error


def test_secret_variables_are_redacted_but_ordinary_key_names_are_not(shell, tmp_path):
    shell.user_ns["DB_PASSWORD"] = "hunter2-Very-Secret-99"
    shell.user_ns["join_key"] = "customer_id"
    spec = script(tmp_path, [{"tool_calls": [call("run_python", code="print(DB_PASSWORD, join_key)")]},
                             {"tool_calls": [call("finish", summary="x")]}])
    loop, state, _ = make_loop(shell, spec)
    loop.run()
    content = results(state)[0].content
    assert "hunter2-Very-Secret-99" not in state.to_json()
    assert "<redacted> customer_id" in content
