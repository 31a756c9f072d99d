"""A long-run agent for the loopback model: one ~6 KB step after another, then a final answer.

It answers from its prompt, as a real model would: asked to summarise (a request without
tools), it keeps every fact it can see; its final answer lists every fact still in its prompt.
So a fact from a compacted turn reaches the final answer only if the summaries kept it.
Shared by the long-run tests and benchmarks/long_run.py.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from .fake_llm import Recorded, Turn

FACT = re.compile(r"FACT (\d+): fact_\d+ = (\d+)")


def fact_value(n: int) -> int:
    return n * 7919 % 10007


def step_code(n: int) -> str:
    """~6 KB of output, its one finding on the first line."""
    return (f"fact_{n} = {fact_value(n)}\n"
            f"print(f'FACT {n}: fact_{n} = {{fact_{n}}}')\n"
            f"for j in range(260):\n    print(f'row {{j}}: {{j * 0.37:.3f}} {{j * {n}.91:.3f}}')")


def facts_in(text: str) -> dict[int, str]:
    return {int(k): v for k, v in FACT.findall(text)}


def long_run_model(steps: int, call_id: Callable[[int], str | None] = lambda n: None) -> Callable[[Recorded], Turn]:
    """``steps`` run_python steps, then ``finish`` with every fact in the prompt; ``call_id``
    names the tool call of step n (None: the fake's own ids)."""
    taken = 0

    def respond(rec: Recorded) -> Turn:
        nonlocal taken
        seen = facts_in(rec.prompt)
        if rec.is_compaction:
            return Turn(text="Findings so far:\n"
                        + "\n".join(f"FACT {k}: fact_{k} = {v}" for k, v in sorted(seen.items())))
        taken += 1
        if taken <= steps:
            call = ("run_python", {"code": step_code(taken)}, call_id(taken))
            return Turn(tool_calls=[call if call[2] else call[:2]])
        found = " ".join(f"FACT {k}: fact_{k} = {v}" for k, v in sorted(seen.items()))
        return Turn(tool_calls=[("finish", {"summary": f"{len(seen)} facts found: {found}"})])
    return respond
