"""RunWidget: a live view of one agent run (local or remote) built from stock ipywidgets.

No custom front-end JS: the header, plan, step log and messages are ``ipywidgets.HTML`` with a
scoped stylesheet (``jh-`` classes, JupyterLab theme variables), the actions are plain Buttons.
The widget only *shows* a run and forwards clicks to a ``RunController``; it never touches the
agent, the network or any secret. Updates may come from a background thread: every update takes
the widget's lock and is batched with ``hold_sync``; all child widgets are created up front, in
the thread that builds the RunWidget.
"""
from __future__ import annotations

import html
import json
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import ipywidgets as W

from ..errors import HandoffError
from ..sanitize import safe_output
from ..snapshot.reports import fmt_bytes
from ..state import STATUS_LABELS, TERMINAL_STATUSES, Event, RunState, describe_compaction, describe_usage
from .widget_css import CSS

log = logging.getLogger(__name__)

__all__ = ["RunController", "RunWidget", "button_states", "STATUS_LABELS", "PLAN_ICONS"]

PLAN_ICONS: dict[str, str] = {"pending": "○", "active": "◐", "done": "✓", "failed": "✗"}
MAX_LOG_ENTRIES = 40        # older steps are summarised as "N earlier steps"
MAX_CODE_CHARS = 4000
MAX_RESULT_CHARS = 800
MAX_RESULT_LINES = 12
MAX_GOAL_CHARS = 240
MAX_OUTPUTS = 30
MAX_OUTPUT_BYTES = 4_000_000
_OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})


@runtime_checkable
class RunController(Protocol):
    """What the buttons call; LocalRun and remote.RemoteRun both implement it."""

    def handoff(self) -> None: ...
    def reattach(self) -> None: ...
    def review_diff(self) -> None: ...
    def pull_back(self) -> None: ...
    def open_notebook(self) -> None: ...
    def cancel(self) -> None: ...
    def answer(self, text: str) -> None: ...


# -- pure view model and rendering ------------------------------------------------------------

BUTTONS: tuple[tuple[str, str, str], ...] = (
    # (key, label, controller method)
    ("handoff", "Hand off", "handoff"),
    ("reattach", "Reattach", "reattach"),
    ("diff", "Review diff", "review_diff"),
    ("pull", "Pull back", "pull_back"),
    ("notebook", "Open notebook", "open_notebook"),
    ("continue", "Continue", "resume"),
    ("pause", "Pause", "request_pause"),
    ("cancel", "Cancel", "cancel"),
)
REMOTE_ACTIONS = frozenset({"handoff", "reattach", "diff", "pull", "notebook"})
# actions whose controller may display something (a diff, a pull report, a link): shown in the
# widget's action area; the others (answer, pause, cancel) only change the run
DISPLAY_ACTIONS = frozenset({"handoff", "reattach", "diff", "pull", "notebook"})
_ACTION_LABELS: dict[str, str] = {k: label for k, label, _ in BUTTONS}
_ACTION_LABELS["answer"] = "Sending the answer"
def action_error_text(label: str, exc: BaseException) -> str:
    """``"<label> failed: <what happened and what to do>"`` without doubling a prefix the
    message already has (``"Hand off failed: handoff failed: …"``)."""
    msg = str(exc).strip() or type(exc).__name__
    head, sep, rest = msg.partition(":")
    norm = lambda t: "".join(t.lower().split()).replace("-", "")  # noqa: E731
    if sep and norm(head).endswith("failed") and (
            norm(head).startswith(norm(label)[:4]) or norm(label).startswith(norm(head)[:4])):
        msg = rest.strip()
    hint = getattr(exc, "hint", None)
    if hint and str(hint) not in msg:
        msg += f" {hint}"
    return f"{label} failed: {msg}"
_HANDOFF_OK = frozenset({"idle", "running", "paused", "waiting_input"})


def button_states(status: str, remote: bool, pausable: bool = True) -> dict[str, tuple[bool, str]]:
    """Which actions make sense for a run in ``status``; returns key -> (enabled, tooltip).

    ``remote`` is True once the run lives on a server (a handed-off local run or a remote run).
    The tooltip says why a button is disabled, so a greyed button is never a mystery.
    """
    terminal = status in TERMINAL_STATUSES
    s: dict[str, tuple[bool, str]] = {}
    if remote:
        s["handoff"] = (False, "already on a server; use Pull back to bring it here")
        s["reattach"] = (status != "pulled", "follow the remote run here" if status != "pulled"
                         else "the run was pulled back")
        s["diff"] = (True, "what the remote run changed: files and variables")
        pull_ok = status not in ("cancelled", "pulled")
        s["pull"] = (pull_ok, "bring the run and its kernel state back into this kernel" if pull_ok
                     else f"nothing to pull: the run is {STATUS_LABELS.get(status, status)}")
        s["notebook"] = (True, "open the remote result notebook")
        s["pause"] = (False, "remote runs pause through Pull back")
        s["continue"] = (False, "the remote run goes on by itself; answer its question in the box")
        cancel_ok = not terminal
        s["cancel"] = (cancel_ok, "stop the remote run" if cancel_ok
                       else f"the run is already {STATUS_LABELS.get(status, status)}")
    else:
        h_ok = status in _HANDOFF_OK
        s["handoff"] = (h_ok, "send this run and the kernel state to a server" if h_ok
                        else f"cannot hand off a run that is {STATUS_LABELS.get(status, status)}")
        for key in ("reattach", "diff", "pull", "notebook"):
            s[key] = (False, "only for a run that was handed off to a server")
        if status == "running" and not pausable:
            # the cell is busy, so a click would only arrive after the run ended
            s["pause"] = (False, "this run is in the cell: interrupt the kernel (■) to pause it")
        else:
            s["pause"] = (status == "running", "pause at the next step boundary" if status == "running"
                          else "only while the run is running")
        go_on = status in ("paused", "failed")
        s["continue"] = (go_on, ("resume the run here, in the background" if status == "paused" else
                                 "retry the step that failed") if go_on
                         else "only for a paused or failed run")
        cancel_ok = status in ("idle", "running", "paused", "waiting_input")
        s["cancel"] = (cancel_ok, "stop this run" if cancel_ok
                       else f"the run is {STATUS_LABELS.get(status, status)}")
    return s


def _short(text: str, chars: int, lines: int | None = None) -> str:
    text = text or ""
    if lines is not None:
        parts = text.splitlines()
        if len(parts) > lines:
            text = "\n".join(parts[:lines]) + f"\n… ({len(parts) - lines} more lines)"
    if len(text) > chars:
        text = text[:chars] + f"… ({len(text) - chars} more characters)"
    return text


@dataclass
class _Call:
    id: str
    name: str
    arguments: dict[str, Any]
    result: str | None = None
    is_error: bool = False


@dataclass
class _Entry:
    text: str = ""
    calls: list[_Call] = field(default_factory=list)
    note: str = ""          # e.g. "you answered: …"


@dataclass
class _View:
    goal: str = ""
    model: str = ""
    run_id: str = ""
    status: str = "idle"
    steps: int = 0
    max_steps: int | None = None
    plan: list[tuple[str, str]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    question: str | None = None
    summary: str | None = None
    message: tuple[Any, ...] | None = None   # (text, level, link | None[, details]): details = a traceback
    remote: tuple[str, str, dict[str, Any]] | None = None  # (server_url, run_id, links)
    progress: tuple[str, int, int] | None = None
    usage: dict[str, Any] | None = None    # the run's usage totals (RunState.usage as a dict)
    transient: bool = False      # the message is a passing notice (a retry) cleared by progress

    def apply(self, ev: Event) -> None:
        """Fold one event into the view (the same rules for live and replayed events)."""
        d = ev.data or {}
        t = ev.type
        if self.transient and t in ("assistant", "tool_call", "tool_result", "status"):
            self.message, self.transient = None, False   # the retry notice is over
        if t == "status":
            self.status = str(d.get("status", self.status))
            if self.status != "waiting_input":
                self.question = None
            reason = d.get("reason")
            if reason and self.status == "waiting_input":
                self.message = None  # the question itself is shown above the answer box
            elif reason and self.status == "running":
                self.message = (f"Still working: {reason}", "warn", None)   # e.g. a model retry
                self.transient = True
            elif reason:
                level = {"failed": "error", "paused": "warn", "completed": "success"}.get(self.status, "info")
                self.message = (f"{STATUS_LABELS.get(self.status, self.status).capitalize()}: {reason}",
                                level, None)
            elif self.status == "running" and self.message and self.message[1] != "error":
                self.message = None
        elif t == "plan":
            steps = d.get("steps") or []
            self.plan = [(str(s.get("text", "")), str(s.get("status", "pending")))
                         for s in steps if isinstance(s, dict)]
        elif t == "assistant":
            self.entries.append(_Entry(text=str(d.get("text") or "")))
            self._count_turn()
        elif t == "tool_call":
            # a turn without words starts with its first call; the loop emits a turn's calls
            # before any of their results, so a call after a result belongs to a new turn
            last = self.entries[-1] if self.entries else None
            if last is None or last.note or any(c.result is not None for c in last.calls):
                self.entries.append(_Entry())
                self._count_turn()
            args: dict[str, Any] = d["arguments"] if isinstance(d.get("arguments"), dict) else {}
            self.entries[-1].calls.append(_Call(str(d.get("id", "")), str(d.get("name", "")), args))
        elif t == "tool_result":
            call = self._find_call(str(d.get("id", "")))
            if call is None:   # result without a visible call (e.g. replayed from the middle)
                if not self.entries:
                    self.entries.append(_Entry())
                call = _Call(str(d.get("id", "")), str(d.get("name", "")), {})
                self.entries[-1].calls.append(call)
            call.result = str(d.get("content") or "")
            call.is_error = bool(d.get("is_error"))
        elif t == "question":
            self.question = str(d.get("question") or "")
        elif t == "answer":
            self.question = None
            self.entries.append(_Entry(note=f"You answered: {d.get('answer', '')}"))
        elif t == "finish":
            self.summary = str(d.get("summary") or "")
            self.message = (f"Done: {self.summary}" if self.summary else "Done.", "success", None)
        elif t == "error":
            text = str(d.get("error") or "error")
            hint = d.get("hint")
            self.message = (f"{text}\n{hint}" if hint else text, "error", None)
        elif t == "interrupted":
            self.message = (f"Interrupted: {d.get('reason', '')}. Resume with %agent continue.", "warn", None)
        elif t == "handoff":
            self.progress = None   # the upload it measured is over
            if d.get("server") and d.get("remote_id") and (
                    self.remote is None or self.remote[1] != str(d["remote_id"])):
                self.remote = (str(d["server"]), str(d["remote_id"]), {})
            self.message = (f"Handed off to {d.get('server', '?')} as run {d.get('remote_id', '?')}.",
                            "info", None)
        elif t == "pull":
            self.remote = None   # the run lives here again
            self.progress = None  # the download it measured is over
            self.message = (f"Pulled back into this kernel from {d.get('server', '?')} "
                            f"(run {d.get('remote_id', '?')}).", "info", None)
        elif t == "checkpoint":
            pass  # progress is shown by set_progress; a checkpoint is not news for the user
        elif t == "refusal":
            self.entries.append(_Entry(text=f"The model refused: {d.get('text', '')}"))
        elif t == "compacted":
            self.entries.append(_Entry(note=describe_compaction(d)))
        if t in ("usage", "compacted") and isinstance(d.get("total"), dict):
            self.usage = d["total"]

    def _count_turn(self) -> None:
        """A model turn seen in a remote run's events: its state here (the one handed off, or
        a reattach mirror) does not count them, the server does. A local run's own state counts
        its turns (``steps``), so events never add to that."""
        if self.remote is not None:
            self.steps += 1

    def _find_call(self, call_id: str) -> _Call | None:
        for entry in reversed(self.entries[-5:]):
            for call in entry.calls:
                if call.id == call_id:
                    return call
        return None


def _view_from_state(state: RunState) -> _View:
    v = _View(goal=state.goal, model=state.model, run_id=state.id, status=state.status,
              steps=state.steps, max_steps=state.budgets.max_steps if state.budgets else None)
    for ev in list(state.events):
        v.apply(ev)
    # the state's own fields are the truth; events only fill in the log and messages
    v.status = state.status
    v.steps = state.steps
    v.plan = [(p.text, p.status) for p in list(state.plan)]
    v.question = state.question if state.status == "waiting_input" else None
    v.summary = state.summary
    if state.usage.requests:
        v.usage = state.usage.to_dict()
    if state.status == "failed" and state.error:
        v.message = (state.error, "error", None)
    return v


def _pulled_back(state: RunState) -> bool:
    """True if the state's last handoff/pull event is a pull: the run lives here again."""
    for ev in reversed(state.events):
        if ev.type in ("handoff", "pull"):
            return ev.type == "pull"
    return False


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def render_header_html(v: _View) -> str:
    goal = _short(v.goal.strip().splitlines()[0] if v.goal.strip() else "(no goal)", MAX_GOAL_CHARS)
    label = STATUS_LABELS.get(v.status, v.status)
    meta = [f"model <b>{_esc(v.model or 'default')}</b>"]
    if v.remote:
        server, rid, links = v.remote
        where = f"remote · {_esc(server)} · run {_esc(rid)}"
        status_page = links.get("status_page") if isinstance(links, dict) else None
        if status_page:
            where += f' · <a href="{_esc(status_page)}" target="_blank" rel="noopener">status page</a>'
        meta.append(where)
    else:
        meta.append(f"local · run {_esc(v.run_id)}")
    steps = f"{v.steps} step{'s' if v.steps != 1 else ''}"
    if v.max_steps:
        steps += f" of max {v.max_steps}"
    meta.append(f'<span class="jh-nw">{steps}</span>')
    used = describe_usage(v.usage)
    if used:
        meta.append(f'<span class="jh-nw jh-usage">{_esc(used)}</span>')
    return (f"<style>{CSS}</style>"
            f'<div class="jh-header"><span class="jh-goal" title="{_esc(v.goal)}">{_esc(goal)}</span>'
            f'<span class="jh-badge jh-s-{_esc(v.status)}" data-status="{_esc(v.status)}">{_esc(label)}</span>'
            f'</div><div class="jh-meta">{" · ".join(meta)}</div>')


def render_plan_html(plan: list[tuple[str, str]]) -> str:
    if not plan:
        return '<div class="jh-section">Plan</div><div class="jh-empty">No plan yet.</div>'
    rows = []
    for text, status in plan:
        icon = PLAN_ICONS.get(status, "○")
        spin = " jh-spin" if status == "active" else ""
        rows.append(f'<li class="jh-p-{_esc(status)}" data-status="{_esc(status)}">'
                    f'<span class="jh-ico{spin}">{icon}</span><span class="jh-txt">{_esc(text)}</span></li>')
    done = sum(1 for _, s in plan if s == "done")
    return (f'<div class="jh-section">Plan · {done}/{len(plan)} done</div>'
            f'<ul class="jh-plan">{"".join(rows)}</ul>')


def _call_html(call: _Call) -> str:
    a = call.arguments
    if call.name == "run_python":
        body = f'<pre class="jh-code">{_esc(_short(str(a.get("code", "")), MAX_CODE_CHARS))}</pre>'
    elif call.name == "update_plan":
        body = '<div class="jh-tool">updated the plan</div>'
    elif call.name == "ask_user":
        body = f'<div class="jh-tool">asked you: {_esc(str(a.get("question", "")))}</div>'
    elif call.name == "finish":
        body = f'<div class="jh-tool">finished: {_esc(_short(str(a.get("summary", "")), 400))}</div>'
    else:
        body = (f'<div class="jh-tool">{_esc(call.name)}'
                f'({_esc(_short(json.dumps(a, ensure_ascii=False, default=str), 300))})</div>')
    if call.result is not None and call.name not in ("update_plan", "finish") and (
            call.name == "run_python" or call.is_error):
        cls = "jh-result jh-err" if call.is_error else "jh-result"
        result = call.result
        if result.startswith("[ok]\n") or result == "[ok]":
            result = result[5:]          # the model's status header; success needs no label here
        body += f'<div class="{cls}">{_esc(_short(result, MAX_RESULT_CHARS, MAX_RESULT_LINES) or "(no output)")}</div>'
    return body


def render_log_html(entries: list[_Entry]) -> str:
    if not entries:
        return '<div class="jh-empty">No steps yet.</div>'
    shown = entries[-MAX_LOG_ENTRIES:]
    skipped = len(entries) - len(shown)
    parts = []
    if skipped:
        parts.append(f'<div class="jh-empty">{skipped} earlier entr{"ies" if skipped != 1 else "y"} not shown</div>')
    n = sum(1 for e in entries[:skipped] if not e.note)
    for e in shown:
        if e.note:
            parts.append(f'<div class="jh-step jh-note"><div class="jh-tool">{_esc(e.note)}</div></div>')
            continue
        n += 1
        inner = f'<div class="jh-step-n">#{n}</div>'
        if e.note:
            inner += f'<div class="jh-tool">{_esc(e.note)}</div>'
        if e.text:
            inner += f'<div class="jh-words">{_esc(_short(e.text, 2000))}</div>'
        inner += "".join(_call_html(c) for c in e.calls)
        parts.append(f'<div class="jh-step">{inner}</div>')
    # column-reverse on the outer box keeps the newest step in view without any JavaScript
    return f'<div class="jh-log"><div>{"".join(parts)}</div></div>'


def render_message_html(message: tuple[Any, ...] | None) -> str:
    if not message or not message[0]:
        return ""
    text, level, link, *rest = message
    details = rest[0] if rest else None
    level = {"warning": "warn", "danger": "error"}.get(level, level)
    level = level if level in ("info", "success", "warn", "error") else "info"
    body = _esc(text)
    if link:
        body += f' <a href="{_esc(link)}" target="_blank" rel="noopener">{_esc(link)}</a>'
    if details:   # a traceback for a bug report: collapsed, never red noise under the widget
        body += (f'<details class="jh-details"><summary>Technical details</summary>'
                 f'<pre>{_esc(details)}</pre></details>')
    return f'<div class="jh-msg jh-m-{level}" data-level="{level}">{body}</div>'


def render_text(v: _View) -> str:
    """Plain-text rendering for terminals, nbconvert text and logs."""
    label = STATUS_LABELS.get(v.status, v.status)
    where = f"remote {v.remote[0]} run {v.remote[1]}" if v.remote else f"local run {v.run_id}"
    steps = f"{v.steps} step{'s' if v.steps != 1 else ''}" + (f"/{v.max_steps}" if v.max_steps else "")
    goal = _short(" ".join(v.goal.split()), 200)
    lines = [f"Agent run [{label}] {goal}", f"  model {v.model or 'default'} · {where} · {steps}"]
    if v.plan:
        done = sum(1 for _, s in v.plan if s == "done")
        lines.append(f"  Plan ({done}/{len(v.plan)} done):")
        lines += [f"    {PLAN_ICONS.get(s, '○')} {t}" for t, s in v.plan]
    if v.entries:
        last = v.entries[-1]
        words = last.text or last.note or (last.calls[0].name if last.calls else "")
        if words:
            lines.append(f"  Last step: {_short(' '.join(words.split()), 160)}")
    if v.progress:
        label_p, done_b, total_b = v.progress
        pct = f" ({100 * done_b / total_b:.0f}%)" if total_b else ""
        lines.append(f"  {label_p}: {fmt_bytes(done_b)}" + (f" of {fmt_bytes(total_b)}" if total_b else "") + pct)
    if v.message and v.message[0]:
        text, level, link, *_ = v.message
        prefix = {"error": "Error: ", "warn": "Note: "}.get(level, "")
        lines.append("  " + prefix + text.replace("\n", "\n  ") + (f" {link}" if link else ""))
    if v.status == "waiting_input" and v.question:
        lines.append(f"  Question: {v.question}")
        lines.append('  Answer with: %agent continue "your answer"')
    return "\n".join(lines)


# -- the widget --------------------------------------------------------------------------------

class RunWidget(W.VBox):
    """Live view of one run. Build it on the main thread; update it from any thread."""

    def __init__(self, state: RunState, controller: RunController | None = None, **kwargs: Any) -> None:
        self.controller = controller
        self._lock = threading.RLock()
        self._state = state
        self._view = _view_from_state(state)

        self._header = W.HTML()
        self._plan = W.HTML()
        self._log = W.HTML()
        self._log_box = W.Accordion(children=[self._log], titles=("Step log",), selected_index=0)
        self._log_box.add_class("jh-log-acc")
        self._progress_label = W.HTML()
        self._progress_label.add_class("jh-progress-label")
        self._progress_bar = W.FloatProgress(value=0.0, min=0.0, max=1.0,
                                             layout=W.Layout(width="auto", flex="1 1 auto"))
        self._progress = W.HBox([self._progress_label, self._progress_bar],
                                layout=W.Layout(display="none", align_items="center", grid_gap="8px"))
        # rich outputs of steps that ran where this cell cannot show them (background thread,
        # remote kernel), mirrored from tool_result events; plain trait updates, so they arrive
        # even after the cell finished
        self.mirror_outputs = False
        self.pausable = True       # False while a run occupies the cell (its clicks would queue)
        self.outputs = W.Output(layout=W.Layout(max_height="420px", overflow="auto"))
        self._outputs_box = W.Accordion(children=[self.outputs], titles=("Outputs",), selected_index=0,
                                        layout=W.Layout(display="none"))
        self._outputs_box.add_class("jh-outputs")
        self._n_outputs = 0
        # what the buttons display (a diff, a link, a pull report) lands here, not in a cell
        self.action_output = W.Output()
        self._message = W.HTML()
        self._busy: Counter[str] = Counter()   # actions under way: their buttons stay disabled
        self.buttons: dict[str, W.Button] = {}
        for key, label, method in BUTTONS:
            b = W.Button(description=label, layout=W.Layout(width="auto"))
            b.add_class("jh-btn")
            b.add_class(f"jh-btn-{key}")
            b.on_click(self._make_handler(key, method))
            self.buttons[key] = b
        self.buttons["cancel"].button_style = ""
        self._buttons_box = W.HBox(list(self.buttons.values()))
        self._buttons_box.add_class("jh-buttons")
        self._question = W.HTML()
        self.answer_text = W.Text(placeholder="Type your answer for the agent",
                                  layout=W.Layout(flex="1 1 auto", width="auto"))
        self.answer_button = W.Button(description="Send", button_style="primary",
                                      layout=W.Layout(width="auto"))
        self.answer_button.on_click(self._on_send)
        self.answer_box = W.VBox([self._question, W.HBox([self.answer_text, self.answer_button])],
                                 layout=W.Layout(display="none"))
        self.answer_box.add_class("jh-answer")
        super().__init__([self._header, self._plan, self._log_box, self._outputs_box, self._progress,
                          self._message, self.answer_box, self._buttons_box, self.action_output], **kwargs)
        self.add_class("jh-run")
        self._render()

    # -- public API (thread-safe) -------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._view.status

    def show_state(self, state: RunState) -> None:
        """Full refresh from a RunState (e.g. after a restore, a pull, or a remote summary)."""
        with self._lock:
            keep_remote, keep_progress = self._view.remote, self._view.progress
            self._state = state
            self._view = _view_from_state(state)
            self._view.progress = keep_progress
            if keep_remote is not None and not _pulled_back(state) and (
                    self._view.remote is None or self._view.remote[1] == keep_remote[1]):
                self._view.remote = keep_remote   # a remote mirror state has no handoff event
            self._render()

    def show_event(self, event: Event) -> None:
        """Incremental update for one event; cheap enough to call for every event."""
        with self._lock:
            self._view.apply(event)
            if self._state is not None:
                self._view.steps = max(self._view.steps, self._state.steps)
                self._view.goal = self._state.goal or self._view.goal
            self._render(event.type)
            if event.type == "tool_result" and (self.mirror_outputs or self._view.remote is not None):
                self.show_outputs((event.data or {}).get("outputs") or [])

    def show_outputs(self, outputs: list[dict[str, Any]]) -> None:
        """Append nbformat output dicts (stream, display_data, execute_result, error) to the
        Outputs area, sanitised (they may come from a remote run: text, images and clean HTML
        only, see sanitize.py); only the newest MAX_OUTPUTS / MAX_OUTPUT_BYTES are kept."""
        keep = [safe_output(o) for o in outputs if isinstance(o, dict) and o.get("output_type") in _OUTPUT_TYPES]
        if not keep:
            return
        with self._lock:
            current = list(self.outputs.outputs) + keep
            current = current[-MAX_OUTPUTS:]
            while len(current) > 1 and len(json.dumps(current, default=str)) > MAX_OUTPUT_BYTES:
                current.pop(0)
            self._n_outputs += len(keep)
            with self.outputs.hold_sync(), self._outputs_box.hold_sync():
                self.outputs.outputs = tuple(current)
                shown = len(current)
                more = f" (newest {shown} of {self._n_outputs})" if shown < self._n_outputs else ""
                self._outputs_box.titles = (f"Outputs of background steps{more}",)
            self._outputs_box.layout.display = ""

    def set_remote(self, server_url: str, run_id: str, links: dict[str, Any] | None = None) -> None:
        """Mark the run as living on ``server_url`` as ``run_id``; switches the buttons to remote mode."""
        with self._lock:
            self._view.remote = (server_url, run_id, dict(links or {}))
            self._render()

    def set_progress(self, label: str, done: int, total: int) -> None:
        """Show an upload/restore/pull bar; ``set_progress("", 0, 0)`` hides it."""
        with self._lock:
            self._view.progress = (label, int(done), int(total)) if label else None
            self._render_progress()

    def show_message(self, text: str, level: str = "info", *, link: str | None = None,
                     details: str | None = None) -> None:
        """A one-line notice under the log (errors should say what to do); empty text clears it.
        ``details`` (e.g. a traceback) is shown collapsed under the line."""
        with self._lock:
            self._view.message = ((text, level, link, details) if details else (text, level, link)) \
                if text else None
            self._message.value = render_message_html(self._view.message)

    def to_text(self) -> str:
        with self._lock:
            return render_text(self._view)

    # -- rendering ----------------------------------------------------------------------------
    def _render(self, what: str | None = None) -> None:
        v = self._view
        widgets = [self._header, self._plan, self._log, self._log_box, self._message,
                   self._question, self.answer_box, self.answer_box.layout, self.answer_button,
                   *self.buttons.values()]
        with ExitStack() as stack:
            for w in widgets:
                stack.enter_context(w.hold_sync())
            if what in (None, "status", "plan", "assistant", "tool_call", "handoff", "pull", "restore", "usage",
                        "compacted"):
                self._header.value = render_header_html(v)
            if what in (None, "plan"):
                self._plan.value = render_plan_html(v.plan)
            if what in (None, "assistant", "tool_call", "tool_result", "answer", "refusal", "compacted"):
                self._log.value = render_log_html(v.entries)
                n = sum(1 for e in v.entries if not e.note)
                self._log_box.titles = (f"Step log · {n} step{'s' if n != 1 else ''}",)
            self._message.value = render_message_html(v.message)
            waiting = v.status == "waiting_input"
            self._question.value = (f'<div class="jh-question">The agent asks: {_esc(v.question or "")}</div>'
                                    if waiting else "")
            self.answer_box.layout.display = "" if waiting else "none"
            self.answer_button.disabled = not waiting
            for key, (enabled, tip) in button_states(v.status, v.remote is not None, self.pausable).items():
                b = self.buttons[key]
                b.disabled = not enabled or key in self._busy
                b.tooltip = f"{_ACTION_LABELS[key]}: in progress" if key in self._busy else tip
            self.buttons["pause"].layout.display = "none" if v.remote else ""
            self.buttons["continue"].layout.display = "none" if v.remote else ""
        if what in (None, "handoff", "pull"):   # a handoff/pull event ends its transfer's bar
            self._render_progress()

    def _render_progress(self) -> None:
        p = self._view.progress
        if not p:
            self._progress.layout.display = "none"
            return
        label, done, total = p
        text = f"{_esc(label)}: {fmt_bytes(done)}"
        if total > 0:
            frac = min(max(done / total, 0.0), 1.0)
            text += f" of {fmt_bytes(total)} ({frac * 100:.0f}%)"
        else:
            frac = 0.0
        with self._progress_label.hold_sync(), self._progress_bar.hold_sync():
            self._progress_label.value = text
            self._progress_bar.value = frac
            self._progress_bar.bar_style = "success" if total and done >= total else ""
        self._progress.layout.display = ""

    # -- buttons ------------------------------------------------------------------------------
    @contextmanager
    def busy(self, key: str) -> Iterator[None]:
        """Keep the ``key`` button disabled while its action is under way (a handoff pausing
        the run, a pull downloading), so a second click cannot start it twice."""
        with self._lock:
            self._busy[key] += 1   # re-entrant: the button's click and the handoff both hold it
            self._render("buttons")
        try:
            yield
        finally:
            with self._lock:
                self._busy[key] -= 1
                self._busy += Counter()   # drops the keys at zero
                self._render("buttons")

    def _make_handler(self, key: str, method: str) -> Callable[[W.Button], None]:
        def handler(_button: W.Button) -> None:
            self._invoke(key, method)
        return handler

    def _invoke(self, key: str, method: str, *args: Any) -> None:
        c = self.controller
        fn = getattr(c, method, None) if c is not None else None
        if fn is None and method == "request_pause":
            fn = getattr(c, "pause", None)
        if fn is None:
            if key in REMOTE_ACTIONS:
                self.show_message("Not connected to a server: set HANDOFF_SERVER_URL and HANDOFF_TOKEN, "
                                  "or run %handoff --to URL --token TOKEN.", "warn")
            else:
                self.show_message("This view is not attached to a run any more; use %runs to find it.", "warn")
            return
        label = _ACTION_LABELS.get(key, key)

        def call() -> Exception | None:
            # caught here, inside any Output context: Output.__exit__ would print a red traceback
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - shown in the widget just below
                return exc
            return None

        if key in self._busy:
            return   # the same action is under way (a click that queued behind it)
        with self.busy(key):
            if key in DISPLAY_ACTIONS:
                self.action_output.outputs = ()
                with self.action_output:      # a diff view, a link, a report: shown in the widget
                    exc = call()
            else:
                # answer/pause/cancel display nothing; a background run they start must not have
                # its first outputs caught by the action area while the click is handled
                exc = call()
        if exc is not None:   # one clear line; a (collapsed) traceback only for bugs
            if isinstance(exc, HandoffError):   # says what happened and what to do
                log.debug("RunWidget: %s failed: %s", method, exc, exc_info=True)
                self.show_message(action_error_text(label, exc), "error")
            else:
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                log.debug("RunWidget: %s failed unexpectedly", method, exc_info=True)
                self.show_message(f"{label} failed unexpectedly ({type(exc).__name__}: {_short(str(exc), 300)}). "
                                  "Nothing was lost: try again, and if it keeps failing report it with "
                                  "the details below.", "error", details=tb)

    def _on_send(self, _button: W.Button) -> None:
        text = self.answer_text.value.strip()
        if not text:
            self.show_message("Type an answer first, then press Send.", "warn")
            return
        self.answer_button.disabled = True
        self.answer_text.value = ""
        self._invoke("answer", "answer", text)

    # -- fallbacks without a widget front end ---------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.to_text()
        return data

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("RunWidget(...)" if cycle else self.to_text())

    def __repr__(self) -> str:  # never "VBox(children=...)"
        return self.to_text()
