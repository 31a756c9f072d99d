"""A model that plays turns from a JSON or YAML file: the demo default and a test double.

Turn k is played when the conversation already holds k assistant messages (counting the
turns a compaction summary replaced), so a run that was paused, handed off, pulled back or
compacted continues with the next unplayed turn. It reports no usage (the loop estimates it)
and writes no summaries (the loop's built-in summary is used).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...state import Message, ToolCall
from .base import ProviderError

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo_scripts"


def _packaged(p: Path) -> Path | None:
    """A demo script shipped with jupyter-handoff, by bare name ("default") or by a path that
    pointed into another install's demo_scripts (a run handed off to a server)."""
    if len(p.parts) > 1 and p.parent.name != "demo_scripts":
        return None
    for name in (p.name, p.name + ".json"):
        candidate = DEMO_DIR / name
        if candidate.is_file():
            return candidate
    return None


def resolve_script_path(path: str | Path, base_dir: str | Path | None = None) -> Path:
    """A relative ``path`` is looked up in ``base_dir`` first, then the cwd, then the demos."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else (_packaged(p) or p)
    if base_dir is not None and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    if (Path.cwd() / p).exists():
        return Path.cwd() / p
    return _packaged(p) or Path.cwd() / p


def load_script(path: Path) -> list[dict[str, Any]]:
    """Read and check a script; every problem names the file, the turn and what is wrong."""
    hint = ('a script is a JSON/YAML list of turns like {"text": "...", "tool_calls": '
            '[{"name": "run_python", "arguments": {"code": "..."}}]}')
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProviderError(f"cannot read model script {path}: {exc.strerror or exc}",
                            "check the path after 'scripted:'") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ProviderError(f"model script {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}",
                            hint) from exc
    if isinstance(data, dict) and "turns" in data:
        data = data["turns"]
    if not isinstance(data, list):
        raise ProviderError(f"model script {path} must be a list of turns, got {type(data).__name__}", hint)
    for k, turn in enumerate(data):
        where = f"model script {path}, turn {k}"
        if not isinstance(turn, dict):
            raise ProviderError(f"{where} is a {type(turn).__name__}, not an object", hint)
        if not isinstance(turn.get("text", ""), str):
            raise ProviderError(f"{where}: 'text' must be a string", hint)
        calls = turn.get("tool_calls", [])
        if not isinstance(calls, list):
            raise ProviderError(f"{where}: 'tool_calls' must be a list", hint)
        for i, call in enumerate(calls):
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ProviderError(f"{where}, tool call {i}: needs a string 'name'", hint)
            if not isinstance(call.get("arguments", {}), dict):
                raise ProviderError(f"{where}, tool call {i}: 'arguments' must be an object", hint)
    return data


class ScriptedProvider:
    """Plays a fixed script; deterministic tool-call ids ``script-<turn>-<index>``."""

    summarises = False

    def __init__(self, path: str | Path, *, base_dir: str | Path | None = None) -> None:
        path = str(path).strip()
        if not path:
            raise ProviderError("'scripted:' needs a path", "use scripted:PATH/TO/script.json")
        self.path = resolve_script_path(path, base_dir)
        self.turns = load_script(self.path)
        self.spec = f"scripted:{path}"

    def __repr__(self) -> str:
        return f"<ScriptedProvider {self.path} ({len(self.turns)} turns)>"

    def complete(self, system: str, messages: list[Message], tools: list[dict]) -> Message:
        k = sum(1 for m in messages if m.role == "assistant") + sum(m.compacted_turns for m in messages)
        if k >= len(self.turns):
            return Message(role="assistant", text="", tool_calls=[ToolCall(
                id=f"script-{k}-end", name="finish",
                arguments={"summary": f"The scripted model's script ({self.path.name}) ended after "
                                      f"{len(self.turns)} turns; nothing more to do."})])
        turn = self.turns[k]
        calls = [ToolCall(id=f"script-{k}-{i}", name=c["name"], arguments=dict(c.get("arguments") or {}))
                 for i, c in enumerate(turn.get("tool_calls") or [])]
        return Message(role="assistant", text=turn.get("text", ""), tool_calls=calls)
