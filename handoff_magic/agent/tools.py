"""The four tools the agent may call, as provider-neutral JSON-schema specs.

Providers translate these into their own wire format (OpenAI ``functions``, Anthropic
``input_schema``); the loop validates arguments against the same specs.
"""
from __future__ import annotations

from typing import Any

from ..errors import ToolArgumentError

RUN_PYTHON: dict[str, Any] = {
    "name": "run_python",
    "description": (
        "Run Python code in the user's live Jupyter kernel, with their variables, imports and "
        "working directory. State persists between calls. Returns stdout, stderr, the value of "
        "the last expression, a summary of rich outputs (plots, tables) and any error with its "
        "traceback. Inspect before you change things; keep each call focused."
    ),
    "parameters": {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "Python source to execute."}},
        "required": ["code"],
    },
}

UPDATE_PLAN: dict[str, Any] = {
    "name": "update_plan",
    "description": (
        "Replace the plan shown to the user: a short checklist of steps, each pending, active, "
        "done or failed. Call it at the start and whenever a step changes status."
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "status": {"type": "string", "enum": ["pending", "active", "done", "failed"]},
                    },
                    "required": ["text", "status"],
                },
            }
        },
        "required": ["steps"],
    },
}

ASK_USER: dict[str, Any] = {
    "name": "ask_user",
    "description": (
        "Ask the user a question and wait for the answer. Use only when truly blocked: a "
        "decision only they can make, or missing information you cannot find in the kernel."
    ),
    "parameters": {
        "type": "object",
        "properties": {"question": {"type": "string"}},
        "required": ["question"],
    },
}

FINISH: dict[str, Any] = {
    "name": "finish",
    "description": "End the run with a short summary of what was done and where the results are.",
    "parameters": {
        "type": "object",
        "properties": {"summary": {"type": "string"}},
        "required": ["summary"],
    },
}

TOOLS: list[dict[str, Any]] = [RUN_PYTHON, UPDATE_PLAN, ASK_USER, FINISH]
TOOL_NAMES: frozenset[str] = frozenset(t["name"] for t in TOOLS)


def validate_arguments(name: str, arguments: Any) -> dict[str, Any]:
    """Check ``arguments`` for tool ``name``; return them or raise ToolArgumentError.

    Deliberately small: required keys, and the types the loop relies on.
    """
    if name not in TOOL_NAMES:
        raise ToolArgumentError(
            f"unknown tool {name!r}; the available tools are {', '.join(sorted(TOOL_NAMES))}"
        )
    if not isinstance(arguments, dict):
        raise ToolArgumentError(f"{name} arguments must be a JSON object, got {type(arguments).__name__}")
    spec = next(t for t in TOOLS if t["name"] == name)
    for key in spec["parameters"].get("required", []):
        if key not in arguments:
            raise ToolArgumentError(f"{name} needs the argument {key!r}")
    string_keys = {"run_python": "code", "ask_user": "question", "finish": "summary"}
    key = string_keys.get(name)
    if key and not isinstance(arguments[key], str):
        raise ToolArgumentError(f"{name}: {key!r} must be a string")
    if name == "update_plan":
        steps = arguments["steps"]
        if not isinstance(steps, list):
            raise ToolArgumentError("update_plan: 'steps' must be a list of {text, status}")
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or not isinstance(step.get("text"), str):
                raise ToolArgumentError(f"update_plan: step {i} must be an object with a string 'text'")
            status = step.get("status", "pending")
            if status not in ("pending", "active", "done", "failed"):
                raise ToolArgumentError(
                    f"update_plan: step {i} status {status!r} must be pending, active, done or failed"
                )
    return arguments
