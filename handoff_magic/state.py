"""The run state that travels between kernels and servers, as plain JSON.

Everything here is data only (no pickles): the server reads it, stores it in SQLite and
shows it, so it must never need to execute anything to understand a run.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# re-exported: the parsers' callers catch them here
from .errors import SchemaVersionError as SchemaVersionError, StateError as StateError

SCHEMA_VERSION = 1

PlanStatus = Literal["pending", "active", "done", "failed"]
PLAN_STATUSES: tuple[str, ...] = ("pending", "active", "done", "failed")

# Local runs use idle/running/paused; remote runs add queued/restoring; handed_off and
# pulled mark the side that gave the run away.
RUN_STATUSES: tuple[str, ...] = (
    "idle", "queued", "restoring", "running", "paused", "waiting_input",
    "completed", "failed", "cancelled", "handed_off", "pulled",
)
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "pulled"})
# the words every view (widget, status pages, terminal) uses for a status
STATUS_LABELS: dict[str, str] = {
    "idle": "idle", "queued": "queued", "restoring": "restoring", "running": "running",
    "paused": "paused", "waiting_input": "waiting for input", "completed": "completed",
    "failed": "failed", "cancelled": "cancelled", "handed_off": "handed off", "pulled": "pulled back",
}


def check_schema_version(data: dict[str, Any], what: str = "run state") -> None:
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise StateError(f"{what} has no integer schema_version; it is not a jupyter-handoff {what}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{what} uses schema version {version}, but this jupyter-handoff reads up to "
            f"{SCHEMA_VERSION}: upgrade jupyter-handoff here (pip install -U jupyter-handoff)"
        )
    if version < 1:
        raise StateError(f"{what} has invalid schema_version {version}")


def _pick(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Keep only the keys a dataclass knows, so older readers ignore newer optional fields."""
    if not isinstance(data, dict):
        raise StateError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class PlanStep:
    text: str
    status: str = "pending"

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise StateError("plan step text must be a string")
        if self.status not in PLAN_STATUSES:
            raise StateError(f"plan step status {self.status!r} is not one of {', '.join(PLAN_STATUSES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PlanStep":
        return cls(**_pick(cls, data))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToolCall":
        d = _pick(cls, data)
        if not isinstance(d.get("name"), str) or not isinstance(d.get("id"), str):
            raise StateError("a tool call needs string 'id' and 'name'")
        if not isinstance(d.get("arguments", {}), dict):
            raise StateError("tool call arguments must be a JSON object")
        return cls(**d)


@dataclass
class ToolResult:
    call_id: str
    name: str
    content: str                      # what the model sees (already trimmed)
    is_error: bool = False
    outputs: list[dict[str, Any]] = field(default_factory=list)  # nbformat v4 output dicts

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToolResult":
        return cls(**_pick(cls, data))


@dataclass
class Usage:
    """Tokens a model reported (or, for the scripted model, that were estimated) and their cost.

    ``input_tokens`` counts the whole prompt, cached part included; ``cached_tokens`` is the part
    read from the provider's prompt cache, ``cache_write_tokens`` the part written to it.
    ``cost`` is in USD, None while the model's price is unknown.
    """
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    requests: int = 0
    cost: float | None = None
    estimated: bool = False           # counted by jupyter-handoff, not reported by the provider

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: "Usage") -> None:
        """Add another reply's usage in place (cost stays None only if neither had one)."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_tokens += other.cached_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.requests += other.requests
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost
        self.estimated = self.estimated or other.estimated

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def describe(self) -> str:
        """One line for people (widget header, %runs, status page, notifications)."""
        return describe_usage(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Usage":
        d = _pick(cls, data or {})
        for key in ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "requests"):
            if not isinstance(d.get(key, 0), int) or isinstance(d.get(key, 0), bool):
                raise StateError(f"usage {key} must be an integer")
        if d.get("cost") is not None and not isinstance(d["cost"], (int, float)):
            raise StateError("usage cost must be a number or null")
        return cls(**d)


def describe_usage(usage: dict[str, Any] | None) -> str:
    """``12,345 tokens (3,000 cached) · $0.0123`` from a Usage dict (as events and the API carry
    it); "" when nothing was counted yet. "~" marks estimated counts (the scripted model)."""
    if not isinstance(usage, dict) or not usage.get("requests"):
        return ""
    approx = "~" if usage.get("estimated") else ""
    total = int(usage.get("input_tokens", 0)) + int(usage.get("output_tokens", 0))
    text = f"{approx}{total:,} tokens"
    if usage.get("cached_tokens"):
        text += f" ({int(usage['cached_tokens']):,} cached)"
    cost = usage.get("cost")
    if isinstance(cost, (int, float)) and cost > 0:
        text += f" · ${cost:.4f}" if cost < 1 else f" · ${cost:.2f}"
    return text


def describe_compaction(data: dict[str, Any]) -> str:
    """A ``compacted`` event for people: how many turns were folded, tokens before and after."""
    return (f"Context compacted: {data.get('turns', '?')} earlier turns summarised "
            f"({int(data.get('tokens_before') or 0):,} → {int(data.get('tokens_after') or 0):,} tokens)")


@dataclass
class Message:
    """Provider-neutral message. role: system | user | assistant | tool.

    An assistant message may carry tool_calls; a tool message carries the results of
    every call of the preceding assistant message, in order. ``usage`` is what the reply
    that produced an assistant message cost; ``refusal`` marks a reply the model declined
    (its ``text`` is the model's reason). ``compacted_turns`` > 0 marks the summary that
    replaced that many earlier model turns (see agent/context.py).
    """
    role: str
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    usage: Usage | None = None
    refusal: bool = False
    compacted_turns: int = 0

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise StateError(f"message role {self.role!r} is not system, user, assistant or tool")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Message":
        d = _pick(cls, data)
        d["tool_calls"] = [ToolCall.from_dict(c) for c in d.get("tool_calls") or []]
        d["tool_results"] = [ToolResult.from_dict(r) for r in d.get("tool_results") or []]
        d["usage"] = Usage.from_dict(d["usage"]) if d.get("usage") is not None else None
        if not isinstance(d.get("text", ""), str):
            raise StateError("message text must be a string")
        return cls(**d)


@dataclass
class Event:
    """One state change. seq numbers start at 1 and never repeat within a run."""
    seq: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        d = _pick(cls, data)
        if not isinstance(d.get("seq"), int) or not isinstance(d.get("type"), str):
            raise StateError("an event needs an integer 'seq' and a string 'type'")
        return cls(**d)


@dataclass
class Budgets:
    """Limits per ``run()`` call (``%agent continue`` grants a fresh allowance); None = no limit."""
    max_steps: int = 40
    max_seconds: float = 3600.0
    max_tokens: int | None = None      # input + output tokens
    max_cost: float | None = None      # USD

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Budgets":
        return cls(**_pick(cls, data))


@dataclass
class Origin:
    host: str = ""
    notebook_path: str = ""
    python: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Origin":
        return cls(**_pick(cls, data))


RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def check_run_id(run_id: object) -> str:
    """``run_id`` if it is a safe run id (it names a directory and a URL segment), else StateError."""
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise StateError(f"{str(run_id)[:80]!r} is not a valid run id",
                         "a run id is 1-64 letters, digits, '-' or '_' (%agent makes one)")
    return run_id


@dataclass
class RunState:
    goal: str
    id: str = field(default_factory=new_run_id)
    status: str = "idle"
    plan: list[PlanStep] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    steps: int = 0                     # model turns taken so far
    budgets: Budgets = field(default_factory=Budgets)
    model: str = ""                    # model spec name only, e.g. "openai:gpt-4o"; never a key
    origin: Origin = field(default_factory=Origin)
    events: list[Event] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)   # totals over every model reply of the run
    question: str | None = None        # set while status == waiting_input
    summary: str | None = None         # set by finish
    error: str | None = None           # what went wrong, with what to do next
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES:
            raise StateError(f"run status {self.status!r} is not one of {', '.join(RUN_STATUSES)}")

    # -- events -------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def emit(self, type: str, **data: Any) -> Event:
        """Append a numbered event; every state change goes through here."""
        event = Event(seq=self.last_seq + 1, type=type, data=data)
        self.events.append(event)
        self.updated = event.time
        return event

    def set_status(self, status: str, **data: Any) -> Event | None:
        if status not in RUN_STATUSES:
            raise StateError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        if status == self.status and not data:
            return None
        self.status = status
        return self.emit("status", status=status, **data)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    # -- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunState":
        if not isinstance(data, dict):
            raise StateError("run state must be a JSON object")
        check_schema_version(data)
        d = _pick(cls, data)
        if not isinstance(d.get("goal"), str):
            raise StateError("run state needs a string 'goal'")
        try:
            d["plan"] = [PlanStep.from_dict(p) for p in d.get("plan") or []]
            d["messages"] = [Message.from_dict(m) for m in d.get("messages") or []]
            d["events"] = [Event.from_dict(e) for e in d.get("events") or []]
            d["budgets"] = Budgets.from_dict(d.get("budgets") or {})
            d["origin"] = Origin.from_dict(d.get("origin") or {})
            d["usage"] = Usage.from_dict(d.get("usage"))
            return cls(**d)
        except TypeError as exc:  # wrong field types from hand-made JSON
            raise StateError(f"run state is malformed: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> "RunState":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            raise StateError(f"run state is not valid JSON ({exc}); the file may be truncated") from exc
        return cls.from_dict(data)
