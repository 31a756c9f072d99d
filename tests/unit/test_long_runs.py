"""Long runs against a loopback model with a small context window, in both wire formats.

The fake model refuses any request over its window the way the real services do, counts
tokens with its own tokenizer and reports usage (cached tokens included). It "answers from its
prompt": its summaries and its final answer list the facts it can see in the request, so a fact
from a compacted turn reaches the final answer only if the summary kept it.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import pytest
from IPython.core.interactiveshell import InteractiveShell

from tests.harness.fake_llm import FakeLLM, Recorded, Turn
from handoff_magic.agent import AgentLoop, InProcessExecutor, make_provider
from handoff_magic.state import Budgets, RunState, Usage

FACT = re.compile(r"FACT (\d+): fact_\d+ = (\d+)")
WINDOW = 12_000


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


def step_code(n: int) -> str:
    """~6 KB of output per step, its one finding on the first line."""
    return (f"fact_{n} = {n * 7919 % 10007}\n"
            f"print(f'FACT {n}: fact_{n} = {{fact_{n}}}')\n"
            f"for j in range(260):\n    print(f'row {{j}}: {{j * 0.37:.3f}} {{j * {n}.91:.3f}}')")


def facts_in(text: str) -> dict[int, str]:
    return {int(k): v for k, v in FACT.findall(text)}


def long_run_model(steps: int) -> Callable[[Recorded], Turn]:
    """An agent that runs ``steps`` steps, then finishes with every fact its prompt holds;
    asked to summarise, it keeps every fact it sees."""
    taken = 0

    def respond(rec: Recorded) -> Turn:
        nonlocal taken
        seen = facts_in(rec.prompt)
        if rec.is_compaction:
            return Turn(text="Findings so far:\n" + "\n".join(f"FACT {k}: fact_{k} = {v}" for k, v in sorted(seen.items())))
        taken += 1
        if taken <= steps:
            return Turn(tool_calls=[("run_python", {"code": step_code(taken)})])
        found = " ".join(f"FACT {k}: fact_{k} = {v}" for k, v in sorted(seen.items()))
        return Turn(tool_calls=[("finish", {"summary": f"facts found: {found}"})])
    return respond


def provider_for(llm: FakeLLM, api: str):
    base = llm.openai_base_url if api == "openai" else llm.anthropic_base_url
    return make_provider(f"{api}:fake-model", api_key=llm.api_key, base_url=base, backoff_base=0.01)


def usage_of(rec: Recorded) -> Usage:
    u = rec.usage or {}
    if rec.api == "openai":
        return Usage(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                     cached_tokens=u["prompt_tokens_details"]["cached_tokens"], requests=1)
    read, written = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    return Usage(input_tokens=u["input_tokens"] + read + written, output_tokens=u["output_tokens"],
                 cached_tokens=read, cache_write_tokens=written, requests=1)


def reported_total(llm: FakeLLM) -> Usage:
    total = Usage()
    for rec in llm.requests:
        if rec.usage is not None:
            total.add(usage_of(rec))
    return total


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_sixty_step_run_with_big_outputs_completes_inside_the_window(shell, api):
    steps = 62
    with FakeLLM(window=WINDOW, responder=long_run_model(steps)) as llm:
        state = RunState(goal="collect the facts", budgets=Budgets(max_steps=200))
        events: list[Any] = []
        AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell),
                  on_event=lambda s, e: events.append(e)).run()

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
        assert all(final[n] == str(n * 7919 % 10007) for n in final)
        # the full output stays in the state (In/Out), only the model's view was trimmed
        first = next(r for m in state.messages if m.role == "tool" for r in m.tool_results)
        assert "row 259" in first.content or state.messages[1].compacted_turns
        # every reply's usage is counted: the run's total is the sum of what the model reported
        assert state.usage.input_tokens == reported_total(llm).input_tokens
        assert state.usage.output_tokens == reported_total(llm).output_tokens
        assert state.usage.cached_tokens == reported_total(llm).cached_tokens > 0
        assert state.usage.requests == sum(1 for r in llm.requests if r.usage is not None)
