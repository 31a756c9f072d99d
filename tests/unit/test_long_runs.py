"""Long runs against a loopback model with a small context window, in both wire formats.

The fake model refuses any request over its window the way the real services do, counts
tokens with its own tokenizer and reports usage (cached tokens included). It "answers from its
prompt": its summaries and its final answer list the facts it can see in the request, so a fact
from a compacted turn reaches the final answer only if the summary kept it.
"""
from __future__ import annotations

import html
import re
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from handoff_magic.agent import AgentLoop, InProcessExecutor, make_provider
from handoff_magic.state import Budgets, RunState, Usage, describe_usage
from handoff_magic.local.widget import RunWidget
from tests.harness.fake_llm import FakeLLM
from tests.harness.long_run_model import fact_value, facts_in, long_run_model, step_code

WINDOW = 12_000


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


def provider_for(llm: FakeLLM, api: str):
    base = llm.openai_base_url if api == "openai" else llm.anthropic_base_url
    return make_provider(f"{api}:fake-model", api_key=llm.api_key, base_url=base, backoff_base=0.01)


def reported(llm: FakeLLM) -> Usage:
    """What the model reported over the whole run, as a Usage."""
    return Usage.from_dict(llm.reported_usage())


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_sixty_step_run_with_big_outputs_completes_inside_the_window(shell, api):
    steps = 62
    with FakeLLM(window=WINDOW, responder=long_run_model(steps)) as llm:
        state = RunState(goal="collect the facts", budgets=Budgets(max_steps=200))
        widget = RunWidget(state)
        events: list[Any] = []
        shown_compaction: list[bool] = []

        def on_event(s: RunState, e: Any) -> None:
            events.append(e)
            widget.show_event(e)
            if e.type == "compacted":
                shown_compaction.append("Context compacted" in widget._log.value)
        AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell), on_event=on_event).run()

        assert state.status == "completed", (state.status, state.error, state.question)
        assert state.steps == steps + 1
        refused = [i for i, r in enumerate(llm.requests) if r.over_window]
        assert refused, "the run never reached the window; the test proves nothing"
        after = llm.requests[refused[0] + 1:]
        assert max(r.tokens for r in after) <= WINDOW
        assert not any(r.over_window for r in after)
        compactions = [e for e in events if e.type == "compacted"]
        assert len(compactions) >= 5
        assert all(c.data["tokens_after"] < c.data["tokens_before"] for c in compactions)
        # the final answer still knows facts that were compacted away long ago
        final = facts_in(state.summary or "")
        assert set(range(1, steps + 1)) <= set(final), sorted(set(range(1, steps + 1)) - set(final))
        assert all(final[n] == str(fact_value(n)) for n in final)
        # the full output stays in the state (In/Out), only the model's view was trimmed
        first = next(r for m in state.messages if m.role == "tool" for r in m.tool_results)
        assert "row 259" in first.content or state.messages[1].compacted_turns
        # every reply's usage is counted: the run's total is the sum of what the model reported
        total = reported(llm)
        assert (state.usage.input_tokens, state.usage.output_tokens, state.usage.requests) == (
            total.input_tokens, total.output_tokens, total.requests)
        assert state.usage.cached_tokens == total.cached_tokens > 0
        # ... and the widget shows that total in its header, and each compaction in its log
        assert describe_usage(total.to_dict()) in widget._header.value
        assert shown_compaction and all(shown_compaction)


def test_a_scripted_run_compacts_by_itself_and_resumes_from_json(shell, tmp_path, monkeypatch):
    """The scripted model writes no summaries: the loop's own summary keeps the variable names,
    and a state saved mid-run (as a handoff or restart would) continues at the right turn."""
    monkeypatch.setenv("HANDOFF_CONTEXT_TOKENS", "4000")
    turns = [{"tool_calls": [{"name": "run_python", "arguments": {"code": step_code(n)}}]} for n in range(1, 31)]
    turns.append({"tool_calls": [{"name": "finish", "arguments": {"summary": "all thirty"}}]})
    path = tmp_path / "long.json"
    path.write_text(__import__("json").dumps(turns))
    state = RunState(goal="g", budgets=Budgets(max_steps=12))
    loop = AgentLoop(state, make_provider(f"scripted:{path}"), InProcessExecutor(shell))
    loop.run()
    assert state.status == "paused" and state.steps == 12
    compacted = [e for e in state.events if e.type == "compacted"]
    assert compacted and not compacted[0].data["by_model"]
    summary = next(m for m in state.messages if m.compacted_turns)
    assert "fact_1" in summary.text and "Variables defined so far" in summary.text
    assert state.usage.estimated and state.usage.input_tokens > 0 and state.usage.cost == 0.0

    state = RunState.from_json(state.to_json())
    assert state.messages[1].compacted_turns == summary.compacted_turns
    state.budgets.max_steps = 40
    AgentLoop(state, make_provider(f"scripted:{path}"), InProcessExecutor(shell)).run()
    assert state.status == "completed" and state.summary == "all thirty" and state.steps == 31
    assert shell.user_ns["fact_30"] == fact_value(30)


def _refusal_run(shell, llm: FakeLLM, api: str) -> tuple[RunState, AgentLoop]:
    llm.refuse("I can't help with scanning that network.")
    state = RunState(goal="scan the network")
    loop = AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell))
    loop.run()
    assert state.status == "waiting_input"
    assert "I can't help with scanning that network." in (state.question or "")
    assert [e.data["text"] for e in state.events if e.type == "refusal"] == [state.messages[-1].text]
    llm.reply(tool_calls=[("finish", {"summary": "went on"})])
    loop.run(answer="continue")                      # %agent continue
    assert state.status == "completed" and state.summary == "went on"
    return state, loop


def test_openai_refusal_is_shown_and_a_bare_agent_continue_goes_on(shell):
    """Through LocalRun, as %agent continue drives it: no answer is needed after a refusal."""
    from handoff_magic.local.run import LocalRun
    with FakeLLM() as llm:
        llm.refuse("I can't help with scanning that network.")
        run = LocalRun.new("scan the network", shell=shell, provider=provider_for(llm, "openai"))
        run.start()
        assert run.status == "waiting_input"
        assert "The model refused: I can't help with scanning that network." in run.state.question
        assert html.escape("The model refused: I can't help with scanning that network.") in run.widget._log.value
        llm.reply(tool_calls=[("finish", {"summary": "went on"})])
        run.check_continue(None)                         # what a bare %agent continue checks
        run.continue_(None)
        assert run.status == "completed" and run.state.summary == "went on"
        assert llm.requests[1].body["messages"][1:] == [
            {"role": "user", "content": "scan the network"},
            {"role": "assistant", "content": "I can't help with scanning that network."},
            {"role": "user", "content": "Continue with the task."},
        ]


def test_anthropic_refusal_is_shown_with_its_stop_details_and_the_next_request_is_valid(shell):
    with FakeLLM() as llm:
        _refusal_run(shell, llm, "anthropic")
        cache = {"type": "ephemeral"}
        assert llm.requests[1].body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "scan the network", "cache_control": cache}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "I can't help with scanning that network. (category: cyber)"}]},
            {"role": "user", "content": [{"type": "text", "text": "Continue with the task.", "cache_control": cache}]},
        ]


def test_an_empty_reply_never_becomes_a_null_assistant_turn(shell):
    with FakeLLM() as llm:
        llm.raw(200, {"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}})
        llm.reply(tool_calls=[("finish", {"summary": "ok"})])
        state = RunState(goal="g")
        loop = AgentLoop(state, provider_for(llm, "openai"), InProcessExecutor(shell))
        loop.run()
        loop.run(answer="retry")
        assert state.status == "completed"
        assert llm.requests[1].body["messages"][1:] == [{"role": "user", "content": "g"},
                                                         {"role": "user", "content": "Continue with the task."}]


def test_tool_ids_of_another_provider_are_normalised_when_the_run_switches(shell):
    with FakeLLM() as llm:
        llm.reply(tool_calls=[("run_python", {"code": "switched = 1"}, "functions.run_python:0"),
                              ("update_plan", {"steps": [{"text": "a", "status": "active"}]},
                               "functions.update_plan:1")])
        state = RunState(goal="g", budgets=Budgets(max_steps=1))
        AgentLoop(state, provider_for(llm, "openai"), InProcessExecutor(shell)).run()
        assert state.status == "paused"
        llm.reply(tool_calls=[("finish", {"summary": "done on anthropic"})])
        state = RunState.from_json(state.to_json())          # handed off to a server using Anthropic
        AgentLoop(state, provider_for(llm, "anthropic"), InProcessExecutor(shell)).run()
        assert state.status == "completed"
        sent = llm.requests[-1].body["messages"]
        uses = [b["id"] for b in sent[1]["content"] if b["type"] == "tool_use"]
        results = [b["tool_use_id"] for b in sent[2]["content"] if b["type"] == "tool_result"]
        assert uses == results and len(set(uses)) == 2
        assert all(re.fullmatch(r"[a-zA-Z0-9_-]+", i) for i in uses)
        # the state keeps the original ids; the mapping is stable, so OpenAI sees them unchanged
        assert [c.id for c in state.messages[1].tool_calls] == ["functions.run_python:0", "functions.update_plan:1"]


def _totals_per_step(shell, api: str, steps: int) -> list[Usage]:
    """Run ``steps`` steps unbudgeted; the cumulative usage the model reported after each."""
    with FakeLLM() as llm:
        for n in range(steps):
            llm.reply(tool_calls=[("run_python", {"code": f"print({n} * 3)"})])
        llm.reply(tool_calls=[("finish", {"summary": "x"})])
        AgentLoop(RunState(goal="budget me"), provider_for(llm, api), InProcessExecutor(shell)).run()
        return [Usage.from_dict(llm.reported_usage(llm.requests[:n])) for n in range(1, len(llm.requests) + 1)]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_token_budget_pauses_at_the_step_that_reaches_it(shell, api):
    totals = _totals_per_step(shell, api, 5)
    budget = totals[1].total_tokens + 1          # steps 1-2 stay under it, step 3 reaches it
    with FakeLLM() as llm:
        for n in range(5):
            llm.reply(tool_calls=[("run_python", {"code": f"print({n} * 3)"})])
        llm.reply(tool_calls=[("finish", {"summary": "x"})])
        state = RunState(goal="budget me", budgets=Budgets(max_tokens=budget))
        loop = AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell))
        loop.run()
        assert state.status == "paused" and state.steps == 3
        assert f"token budget reached ({totals[2].total_tokens:,} of {budget:,} tokens)" \
            in state.events[-1].data["reason"]
        assert state.usage.total_tokens == totals[2].total_tokens
        usage_events = [e for e in state.events if e.type == "usage"]
        assert [e.data["total"]["total_tokens"] for e in usage_events] == [t.total_tokens for t in totals[:3]]
        loop.run()                                  # continue: a fresh allowance
        assert state.steps >= 4


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_cost_budget_pauses_at_the_step_that_reaches_it(shell, api, monkeypatch):
    monkeypatch.setenv("HANDOFF_PRICES", '{"fake-model": {"input": 2.0, "output": 8.0, "cached": 0.5}}')
    totals = _totals_per_step(shell, api, 5)

    def cost(u: Usage) -> float:
        return ((u.input_tokens - u.cached_tokens) * 2.0 + u.cached_tokens * 0.5 + u.output_tokens * 8.0) / 1e6
    budget = (cost(totals[2]) + cost(totals[3])) / 2    # reached by step 4
    with FakeLLM() as llm:
        for n in range(5):
            llm.reply(tool_calls=[("run_python", {"code": f"print({n} * 3)"})])
        llm.reply(tool_calls=[("finish", {"summary": "x"})])
        state = RunState(goal="budget me", budgets=Budgets(max_cost=budget))
        AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell)).run()
        assert state.status == "paused" and state.steps == 4
        assert "cost budget reached" in state.events[-1].data["reason"]
        assert state.usage.cost == pytest.approx(cost(totals[3]))


def test_usage_travels_as_json_and_old_states_still_load():
    state = RunState(goal="g")
    state.usage.add(Usage(input_tokens=100, output_tokens=7, cached_tokens=64, requests=1, cost=0.001))
    back = RunState.from_json(state.to_json())
    assert back.usage == state.usage and back.usage.total_tokens == 107
    old = state.to_dict()
    del old["usage"]
    for m in old["messages"]:
        m.pop("usage", None)
    assert RunState.from_dict(old).usage == Usage()


def test_turn_index_counts_the_turns_a_summary_replaced():
    """Crash recovery finds the step a crash cut off by its turn number, even after compaction."""
    from handoff_magic.agent.context import turn_index
    from handoff_magic.state import Message
    msgs = [Message(role="user", text="goal"), Message(role="user", text="summary", compacted_turns=5),
            Message(role="assistant", text="six"), Message(role="tool"), Message(role="assistant", text="seven")]
    assert [turn_index(msgs, n) for n in (5, 6, 7, 8)] == [None, 2, 4, None]
