"""What a restored kernel never saw: the model turn after the latest checkpoint.

A step cut off by a server stop or a kernel death is rolled back to the checkpoint (messages,
plan, step count) and the agent is told, in a user message that shows the lost code, to redo it;
a scripted model replays the same turn. Turns are counted, not message positions: a compaction
shortens the conversation, so only the step count says what a checkpoint holds. Pure functions
over the run state and the checkpoint manifest: the driver commits the events that say so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from handoff_magic.agent.context import turn_index
from handoff_magic.state import Message, PlanStep, RunState, StateError

log = logging.getLogger(__name__)

SHOWN_CODE_CHARS = 2000


@dataclass(frozen=True)
class Rollback:
    """A cut-off step that was dropped: its 1-based turn number and why it was cut off."""
    turn: int
    why: str


def checkpoint_key(state: RunState) -> tuple[int, int]:
    """What a checkpoint of ``state`` holds: (model turns, messages). Both, because a compaction
    can give the conversation back the length it had."""
    return state.steps, len(state.messages)


def held_key(manifest: dict[str, Any]) -> tuple[int, int]:
    """``checkpoint_key`` of the run state inside a manifest (what a restore brings back)."""
    held = manifest.get("run")
    if not isinstance(held, dict):
        return 0, 0
    return int(held.get("steps") or 0), len(held.get("messages") or [])


def has_cut_off_step(state: RunState, manifest: dict[str, Any]) -> bool:
    """True if the state holds a model turn newer than the checkpoint ``manifest`` (it will be redone)."""
    return state.steps > held_key(manifest)[0]


def roll_back(state: RunState, manifest: dict[str, Any], why: str) -> Rollback | None:
    """Drop the model turn the checkpoint does not hold and tell the agent to redo it."""
    turn = held_key(manifest)[0] + 1
    cut = turn_index(state.messages, turn) if state.steps >= turn else None
    if cut is None:
        return None
    codes = [str(c.arguments.get("code", "")) for c in state.messages[cut].tool_calls if c.name == "run_python"]
    shown = "\n\n".join(c if len(c) < SHOWN_CODE_CHARS else c[:SHOWN_CODE_CHARS] + "\n# ... (trimmed)"
                        for c in codes)
    note = (f"[interrupted] Your step {turn} was cut off: {why}. The kernel was restored to the "
            "checkpoint taken before that step, so its effects are gone. Redo the step."
            + (f" Its code was:\n```python\n{shown}\n```" if shown else ""))
    state.messages = state.messages[:cut] + [Message(role="user", text=note)]
    base_run = manifest.get("run")
    if isinstance(base_run, dict):
        try:
            base = RunState.from_dict(base_run)
            state.plan = [PlanStep(text=p.text, status=p.status) for p in base.plan]
            state.steps = base.steps
        except StateError as exc:
            log.warning("jupyter-handoff: checkpoint run state of %s unreadable: %s", state.id, exc)
    return Rollback(turn, why)
