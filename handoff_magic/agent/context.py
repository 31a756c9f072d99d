"""Keeping every model request inside the model's context window.

Three tools, used by the loop before each model call:

- token estimates: a fast characters-per-token guess per message, corrected by the ``usage``
  the provider reported for the previous request (so the estimate tracks the real tokenizer);
- a view of the conversation for the model: old tool outputs trimmed (head and tail kept; the
  full output stays in the state, In/Out and result.ipynb);
- compaction: when the request nears the window, the older turns are summarised by the model
  itself into one message that keeps the goal, the plan, key findings and variable names, while
  the last turns stay verbatim. The summary is an ordinary message of ``RunState.messages``, so
  it travels with a handoff, a pull back and a server restart.

A provider's "context too long" error teaches the real window (the number in its message) and
the loop compacts and retries.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from ..state import Message, RunState, ToolResult, Usage
from .providers.base import Provider, ProviderError

DEFAULT_WINDOW = 128_000
# longest matching prefix of the model name wins
KNOWN_WINDOWS: dict[str, int] = {
    "gpt-3.5-turbo": 16_385,
    "gpt-4": 8_192,
    "gpt-4-32k": 32_768,
    "gpt-4-turbo": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-5": 400_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "claude": 200_000,
    "scripted": 1_000_000,
}

COMPACT_AT = 0.70          # compact when a request would fill this share of the window
TARGET_AFTER = 0.40        # ... down to about this share
KEEP_TURNS = 4             # at most this many model turns are kept verbatim by a compaction
RESULT_SHARE = 0.3         # characters of one tool output per token of window (~10% of it)
SUMMARY_SHARE = 0.2        # a summary takes at most this share of the request budget
MESSAGE_OVERHEAD = 4       # tokens each message costs beyond its text (role, separators)
SUMMARY_HEADER = "[Summary of the earlier part of this run, written when the conversation was compacted]\n"

COMPACT_PROMPT = """\
You compact the history of a long data-science agent run so the agent can go on working with a
shorter context. Write a summary that the agent will read instead of the turns below. Keep:
- the goal and every instruction or answer the user gave;
- the plan and which steps are done;
- key findings: numbers, shapes, column names, errors met and how they were fixed;
- the names of every variable, file and function created, and what each holds;
- what was about to happen next.
Be factual and complete, plain text, no preamble."""


def context_window(spec: str, configured: int | None = None) -> int:
    """The window in tokens: ``configured`` (c.HandoffApp.context_tokens), else
    HANDOFF_CONTEXT_TOKENS, else the table of known models, else a common default."""
    if configured:
        return int(configured)
    raw = os.environ.get("HANDOFF_CONTEXT_TOKENS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ProviderError(f"HANDOFF_CONTEXT_TOKENS={raw!r} is not a whole number",
                                "set it to the model's context window in tokens, e.g. 128000") from None
        if value < 1000:
            raise ProviderError(f"HANDOFF_CONTEXT_TOKENS={value} is too small to hold a request",
                                "set it to the model's context window in tokens (at least 1000)")
        return value
    kind, _, model = spec.partition(":")
    name = "scripted" if kind == "scripted" else model
    matches = [k for k in KNOWN_WINDOWS if name.startswith(k)]
    return KNOWN_WINDOWS[max(matches, key=len)] if matches else DEFAULT_WINDOW


def overflow_limit(text: str) -> int | None:
    """The window a "context too long" error names, if it names one.

    OpenAI: "maximum context length is 8192 tokens"; Anthropic: "prompt is too long: 210000
    tokens > 200000 maximum".
    """
    for pattern in (r"maximum context length is (\d+)", r"> ?(\d+) maximum", r"context window of (\d+)"):
        found = re.search(pattern, text)
        if found:
            return int(found.group(1))
    return None


def turn_index(messages: list[Message], turn: int) -> int | None:
    """Index of the assistant message of model turn ``turn`` (1-based), counting the turns a
    summary replaced; None if that turn is not in ``messages`` as itself."""
    seen = 0
    for i, m in enumerate(messages):
        seen += m.compacted_turns + (m.role == "assistant")
        if m.role == "assistant" and seen == turn:
            return i
    return None


def _chars(m: Message) -> int:
    n = len(m.text)
    for c in m.tool_calls:
        n += len(c.name) + len(c.id) + len(json.dumps(c.arguments, ensure_ascii=False))
    for r in m.tool_results:
        n += len(r.content) + len(r.call_id) + 8
    return n


def trim_middle(text: str, limit: int) -> str:
    """Head and tail of ``text`` within ``limit`` characters (both ends usually matter)."""
    if len(text) <= limit:
        return text
    marker = f"\n... [{len(text) - limit} characters trimmed] ...\n"
    keep = max(0, limit - len(marker))
    head = int(keep * 0.6)
    return text[:head] + marker + text[len(text) - (keep - head):]


@dataclass
class Compaction:
    """What one compaction did, for the ``compacted`` event."""
    tokens_before: int
    tokens_after: int
    turns: int                 # model turns folded into the summary
    summary: str
    usage: Usage | None        # what the summarising call cost (None for the built-in summary)
    by_model: bool


class ContextManager:
    """Estimates, trims and compacts one run's conversation for one provider and window."""

    def __init__(self, provider: Provider, *, window: int | None = None, system: str = "",
                 tools: list[dict] | None = None) -> None:
        self.provider = provider
        self.window = window or context_window(getattr(provider, "spec", "") or "")
        self.system = system
        self.tools = tools or []
        self.chars_per_token = 4.0     # corrected from reported usage
        self.learned_limit: int | None = None
        self.keep_turns = KEEP_TURNS

    # -- estimates ------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return min(self.window, self.learned_limit or self.window)

    def _fixed_chars(self) -> int:
        return len(self.system) + len(json.dumps(self.tools))

    def estimate(self, messages: list[Message]) -> int:
        """Tokens a request with ``messages`` (as sent) would take, system and tools included."""
        chars = self._fixed_chars() + sum(_chars(m) for m in messages)
        return math.ceil(chars / self.chars_per_token) + MESSAGE_OVERHEAD * (len(messages) + 1)

    def observe(self, sent: list[Message], usage: Usage | None) -> None:
        """Correct the characters-per-token ratio from what the provider counted."""
        if usage is None or usage.estimated or usage.input_tokens <= 0:
            return
        chars = self._fixed_chars() + sum(_chars(m) for m in sent)
        tokens = usage.input_tokens - MESSAGE_OVERHEAD * (len(sent) + 1)
        if tokens > 0 and chars > 0:
            measured = chars / tokens
            # lean towards the smaller ratio (more tokens per character): overestimating is safe
            self.chars_per_token = min(measured, (self.chars_per_token + measured) / 2)

    def calibrate(self, messages: list[Message]) -> None:
        """Recover the ratio from the state alone (after a handoff or a restart): the last
        assistant message's usage counted the request made of the messages before it."""
        for i in range(len(messages) - 1, 0, -1):
            m = messages[i]
            if m.role == "assistant" and m.usage is not None and not m.usage.estimated:
                self.observe(self.view(messages[:i]), m.usage)
                return

    def budget(self) -> int:
        """Tokens a request may take: the window less room for the reply."""
        reserve = min(getattr(self.provider, "max_tokens", 4096) or 4096, self.limit // 8)
        return self.limit - reserve

    def needs_compaction(self, messages: list[Message]) -> bool:
        return self.estimate(self.view(messages)) > self.budget() * COMPACT_AT

    # -- the model's view -----------------------------------------------------------------
    def result_chars(self) -> int:
        """Most characters of one tool output the model sees: a share of a small window.

        It depends on the window only (not on the calibrated ratio), so a message looks the
        same in every request and the provider's prompt cache keeps hitting."""
        return max(600, min(8_000, int(self.limit * RESULT_SHARE)))

    def view(self, messages: list[Message]) -> list[Message]:
        """The conversation as the model sees it: long tool outputs trimmed, head and tail kept."""
        limit = self.result_chars()
        out = []
        for m in messages:
            if m.role == "tool" and any(len(r.content) > limit for r in m.tool_results):
                m = replace(m, tool_results=[replace(r, content=trim_middle(r.content, limit), outputs=[])
                                             for r in m.tool_results])
            out.append(m)
        return out

    def overflowed(self, exc: ProviderError, sent: list[Message]) -> None:
        """A provider refused a request as too long: learn the real window from its words,
        or, if it names none, assume the window is a little below what was sent."""
        named = overflow_limit(exc.message)
        estimate = self.estimate(sent)
        if named:
            # the provider counted more tokens than we estimated: scale our ratio to match
            counted = re.search(r"(\d+) tokens? >|resulted in (\d+) tokens", exc.message)
            if counted:
                real = int(counted.group(1) or counted.group(2))
                if real > estimate:
                    self.chars_per_token *= estimate / real
            self.learned_limit = min(self.learned_limit or named, named)
        else:
            self.learned_limit = int(min(self.limit, estimate) * 0.85)
        self.keep_turns = max(1, self.keep_turns - 1)

    # -- compaction -----------------------------------------------------------------------
    def _split(self, messages: list[Message]) -> int:
        """Where the verbatim tail starts: at an assistant message, at most keep_turns from the
        end, fewer if they would take more than TARGET_AFTER of the budget (at least one)."""
        starts = [i for i, m in enumerate(messages) if m.role == "assistant" and i > 0]
        if not starts:
            return 1
        room = self.budget() * TARGET_AFTER
        for start in starts[-min(self.keep_turns, len(starts)):-1]:
            if self.estimate(self.view(messages[start:])) <= room:
                return start
        return starts[-1]

    def compact(self, state: RunState) -> Compaction | None:
        """Fold the older turns of ``state.messages`` into one summary message, in place."""
        messages = state.messages
        before = self.estimate(self.view(messages))
        split = self._split(messages)
        head = messages[:1] if messages and messages[0].role == "user" and not messages[0].compacted_turns else []
        old = messages[len(head):split]
        if not old:
            return None
        turns = sum(1 for m in old if m.role == "assistant") + sum(m.compacted_turns for m in old)
        summary, usage, by_model = self._summarise(state, old)
        cap = int(self.budget() * SUMMARY_SHARE * self.chars_per_token)
        text = SUMMARY_HEADER + trim_middle(summary, cap) + _appendix(state, old)
        summary_msg = Message(role="user", text=text, compacted_turns=turns)
        state.messages[:] = head + [summary_msg] + messages[split:]
        return Compaction(tokens_before=before, tokens_after=self.estimate(self.view(state.messages)),
                          turns=turns, summary=text, usage=usage, by_model=by_model)

    def transcript(self, old: list[Message], limit_tokens: int) -> str:
        """The turns to summarise as plain text, each part trimmed so the whole fits."""
        parts: list[str] = []
        for m in old:
            if m.compacted_turns:
                parts.append("EARLIER SUMMARY:\n" + m.text)
            elif m.role == "assistant":
                said = [f"ASSISTANT: {m.text}"] if m.text else []
                said += [f"ASSISTANT CALLS {c.name}: {json.dumps(c.arguments, ensure_ascii=False)}"
                         for c in m.tool_calls]
                parts.extend(said)
            elif m.role == "tool":
                parts += [f"RESULT OF {r.name}: {r.content}" for r in m.tool_results]
                if m.text:
                    parts.append(f"USER: {m.text}")
            else:
                parts.append(f"USER: {m.text}")
        budget = int(limit_tokens * self.chars_per_token)
        total = sum(len(p) for p in parts)
        if total > budget:   # trim the biggest parts first: share the budget evenly
            each = max(200, budget // max(1, len(parts)))
            parts = [p if p.startswith("EARLIER SUMMARY") else trim_middle(p, each) for p in parts]
        return trim_middle("\n\n".join(parts), budget)

    def _summarise(self, state: RunState, old: list[Message]) -> tuple[str, Usage | None, bool]:
        """The model's own summary; the built-in one if the model cannot or fails to write it."""
        if getattr(self.provider, "summarises", True):
            room = int(self.budget() * 0.6) - math.ceil(len(COMPACT_PROMPT) / self.chars_per_token)
            prompt = (f"The goal of the run: {state.goal}\n\nThe turns to summarise:\n\n"
                      + self.transcript(old, room))
            asked = [Message(role="user", text=prompt)]
            try:
                reply = self.provider.complete(COMPACT_PROMPT, asked, [])
            except ProviderError:   # even a failed summary must not stop the run
                reply = None
            if reply is not None and reply.text.strip() and not reply.refusal:
                return reply.text.strip(), reply.usage or usage_from_estimate(self, asked, reply), True
        return builtin_summary(old), None, False


_ASSIGNED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\s*,\s*[A-Za-z_][A-Za-z0-9_]*)*)\s*=(?!=)", re.MULTILINE)
_DEFINED = re.compile(r"^\s*(?:def|class)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def variable_names(messages: list[Message]) -> list[str]:
    """Names the agent's code assigned or defined, in first-seen order."""
    seen: dict[str, None] = {}
    for m in messages:
        for c in m.tool_calls:
            code = c.arguments.get("code") if c.name == "run_python" else None
            if isinstance(code, str):
                for group in _ASSIGNED.findall(code) + _DEFINED.findall(code):
                    for name in group.split(","):
                        seen.setdefault(name.strip(), None)
        if m.compacted_turns:
            found = re.search(r"^Variables defined so far: (.*)$", m.text, re.MULTILINE)
            for name in (found.group(1).split(", ") if found else []):
                seen.setdefault(name.strip(), None)
    return [n for n in seen if n and not n.startswith("_")]


def _appendix(state: RunState, old: list[Message]) -> str:
    """Facts kept mechanically, whatever the summary says: the plan and the variable names."""
    lines = []
    if state.plan:
        lines.append("Plan: " + "; ".join(f"[{p.status}] {p.text}" for p in state.plan))
    names = variable_names(old)
    if names:
        lines.append("Variables defined so far: " + ", ".join(names))
    return ("\n\n" + "\n".join(lines)) if lines else ""


def builtin_summary(old: list[Message]) -> str:
    """A summary without a model: earlier summaries, what was said, and each output's last lines."""
    parts: list[str] = []
    for m in old:
        if m.compacted_turns:
            parts.append(m.text.removeprefix(SUMMARY_HEADER).split("\n\nPlan: ")[0])
        elif m.role == "assistant":
            if m.text:
                parts.append(f"- said: {trim_middle(m.text, 300)}")
            for c in m.tool_calls:
                if c.name == "run_python":
                    parts.append(f"- ran: {trim_middle(str(c.arguments.get('code', '')), 300)}")
        elif m.role == "tool":
            for r in m.tool_results:
                parts.append(f"- {r.name} gave: {_last_lines(r)}")
        elif m.text:
            parts.append(f"- the user said: {trim_middle(m.text, 500)}")
    return "Earlier turns, in order:\n" + "\n".join(parts)


def _last_lines(r: ToolResult, n: int = 3) -> str:
    lines = [line for line in r.content.splitlines() if line.strip()]
    return trim_middle(" | ".join(lines[:1] + lines[-n:] if len(lines) > n + 1 else lines), 400)


def usage_from_estimate(manager: ContextManager, sent: list[Message], reply: Message) -> Usage:
    """Usage for a provider that reports none (the scripted model): counted by our estimate."""
    return Usage(input_tokens=manager.estimate(sent), output_tokens=math.ceil(_chars(reply) / 4) + 1,
                 requests=1, estimated=True)


def compaction_event_data(c: Compaction) -> dict[str, Any]:
    return {"tokens_before": c.tokens_before, "tokens_after": c.tokens_after, "turns": c.turns,
            "summary": c.summary, "by_model": c.by_model}
