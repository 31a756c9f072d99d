"""A long agent run against the loopback model with a small context window.

    python benchmarks/long_run.py [--steps 200] [--window 16000] [--api openai|anthropic]

Each step prints ~6 KB. The loopback model (tests/harness/fake_llm.py) counts tokens with its own
tokenizer, refuses requests over its window like the real services, and reports usage. Printed:
steps completed, compactions, the largest request against the window, and the input tokens the
run sent against what the same conversation would have sent uncompacted (every step resending
all earlier ones: quadratic in the run's length, where the compacted run grows linearly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from IPython.core.interactiveshell import InteractiveShell

from handoff_magic.agent import (
    SYSTEM_PROMPT,
    TOOLS,
    AgentLoop,
    InProcessExecutor,
    make_provider,
)
from handoff_magic.state import Budgets, Message, RunState, ToolCall, ToolResult
from tests.harness.fake_llm import FakeLLM, count_tokens
from tests.harness.long_run_model import facts_in, long_run_model


def uncompacted_input_tokens(state: RunState, provider: object) -> int:
    """What every step would have sent had nothing been trimmed or compacted: the full
    conversation rebuilt from the run's events, counted by the loopback model's tokenizer."""
    msgs: list[Message] = [Message(role="user", text=state.goal)]
    for e in state.events:
        if e.type == "tool_call":
            if msgs[-1].role != "assistant":
                msgs.append(Message(role="assistant"))
            msgs[-1].tool_calls.append(ToolCall(id=e.data["id"], name=e.data["name"], arguments=e.data["arguments"]))
        elif e.type == "tool_result":
            if msgs[-1].role != "tool":
                msgs.append(Message(role="tool"))
            msgs[-1].tool_results.append(ToolResult(call_id=e.data["id"], name=e.data["name"],
                                                    content=e.data["content"]))
    body = provider.request_body(SYSTEM_PROMPT, [], TOOLS)  # type: ignore[attr-defined]
    fixed = count_tokens(json.dumps(body))
    total, prefix = 0, fixed
    for i, m in enumerate(msgs):
        prefix += count_tokens(json.dumps(provider.request_body("", [m], [])["messages"]))  # type: ignore[attr-defined]
        if i + 1 < len(msgs) and msgs[i + 1].role == "assistant":   # a request was made here
            total += prefix
    return total + prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=16_000)
    ap.add_argument("--api", choices=["openai", "anthropic"], default="openai")
    args = ap.parse_args()
    shell = InteractiveShell.instance()
    with FakeLLM(window=args.window, responder=long_run_model(args.steps)) as llm:
        base = llm.openai_base_url if args.api == "openai" else llm.anthropic_base_url
        provider = make_provider(f"{args.api}:loopback", api_key=llm.api_key, base_url=base)
        state = RunState(goal="collect one fact per step", budgets=Budgets(max_steps=args.steps + 10))
        loop = AgentLoop(state, provider, InProcessExecutor(shell))
        t0 = time.monotonic()
        shell.run_cell("import sys, io; _real_stdout = sys.stdout; sys.stdout = io.StringIO()")
        try:
            loop.run()
        finally:
            shell.run_cell("sys.stdout = _real_stdout")
        elapsed = time.monotonic() - t0
        answered = [r for r in llm.requests if not r.over_window]
        refused = [r for r in llm.requests if r.over_window]
        first_refusal = next((i for i, r in enumerate(llm.requests) if r.over_window), -1)
        after = llm.requests[first_refusal + 1:] if first_refusal >= 0 else llm.requests
        compactions = [e for e in state.events if e.type == "compacted"]
        sent = sum(r.tokens for r in answered)
        full = uncompacted_input_tokens(state, provider)
        facts = len(facts_in(state.summary or ""))
        print(f"long run, {args.api} wire format, window {args.window:,} tokens, {args.steps} steps of ~6 KB output")
        print(f"  status {state.status}; steps completed {state.steps} (of {args.steps} + finish) in {elapsed:.1f}s")
        print(f"  compactions {len(compactions)} (by the model: {sum(c.data['by_model'] for c in compactions)}); "
              f"requests {len(llm.requests)}; refused as too long {len(refused)}, of them after the first "
              f"refusal {sum(r.over_window for r in after)}")
        print(f"  largest request {max(r.tokens for r in answered):,} tokens vs window {args.window:,}; "
              f"after the first refusal {max((r.tokens for r in after), default=0):,}")
        print(f"  input tokens sent {sent:,} (reported usage {state.usage.input_tokens:,}, cached "
              f"{state.usage.cached_tokens:,}); uncompacted conversation would send {full:,} "
              f"({full / max(sent, 1):.1f}x)")
        half = answered[: len(answered) // 2]
        print(f"  growth: first half of the requests sent {sum(r.tokens for r in half):,}, second half "
              f"{sent - sum(r.tokens for r in half):,} (linear: about equal; quadratic: about 3x)")
        print(f"  facts known in the final answer {facts} of {args.steps}")


if __name__ == "__main__":
    main()
