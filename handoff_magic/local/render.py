"""What a RunWidget shows, as pure functions of a run: the view model (``View``, folded from a
RunState and its events) and its HTML/text renderings (header, plan, step log, message). No
widgets, no threads: the same run always renders the same text, so these are tested directly and
the widget only decides when to re-render.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

from ..sanitize import IMAGE_MAGIC, image_data_uri, join_text, safe_output
from ..snapshot.reports import fmt_bytes
from ..state import STATUS_LABELS, Event, RunState, describe_compaction, describe_usage
from .widget_css import CSS

PLAN_ICONS: dict[str, str] = {"pending": "○", "active": "◐", "done": "✓", "failed": "✗"}


MAX_LOG_ENTRIES = 40        # older steps are summarised as "N earlier steps"


MAX_CODE_CHARS = 4000


MAX_RESULT_CHARS = 800


MAX_RESULT_LINES = 12


MAX_GOAL_CHARS = 240


MAX_HTML_CHARS = 20_000     # a bigger HTML output shows as its text/plain in the log


MAX_LOG_IMAGE_BYTES = 512 * 1024   # the log is re-sent whole on each update; bigger images stay in Outputs


OUTPUT_TYPES = frozenset({"stream", "display_data", "execute_result", "error"})


def short(text: str, chars: int, lines: int | None = None) -> str:
    text = text or ""
    if lines is not None:
        parts = text.splitlines()
        if len(parts) > lines:
            text = "\n".join(parts[:lines]) + f"\n… ({len(parts) - lines} more lines)"
    if len(text) > chars:
        text = text[:chars] + f"… ({len(text) - chars} more characters)"
    return text


@dataclass
class Call:
    id: str
    name: str
    arguments: dict[str, Any]
    result: str | None = None
    is_error: bool = False
    shown: list[str] = field(default_factory=list)   # the outputs as log HTML, when one is rich HTML


@dataclass
class Entry:
    text: str = ""
    calls: list[Call] = field(default_factory=list)
    note: str = ""          # e.g. "you answered: …"


@dataclass
class View:
    goal: str = ""
    model: str = ""
    run_id: str = ""
    status: str = "idle"
    steps: int = 0
    max_steps: int | None = None
    plan: list[tuple[str, str]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
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
            self.entries.append(Entry(text=str(d.get("text") or "")))
            self._count_turn()
        elif t == "tool_call":
            # a turn without words starts with its first call; the loop emits a turn's calls
            # before any of their results, so a call after a result belongs to a new turn
            last = self.entries[-1] if self.entries else None
            if last is None or last.note or any(c.result is not None for c in last.calls):
                self.entries.append(Entry())
                self._count_turn()
            args: dict[str, Any] = d["arguments"] if isinstance(d.get("arguments"), dict) else {}
            self.entries[-1].calls.append(Call(str(d.get("id", "")), str(d.get("name", "")), args))
        elif t == "tool_result":
            call = self._find_call(str(d.get("id", "")))
            if call is None:   # result without a visible call (e.g. replayed from the middle)
                if not self.entries:
                    self.entries.append(Entry())
                call = Call(str(d.get("id", "")), str(d.get("name", "")), {})
                self.entries[-1].calls.append(call)
            call.result = str(d.get("content") or "")
            call.is_error = bool(d.get("is_error"))
            call.shown = [] if call.is_error else _outputs_html(d.get("outputs"))
        elif t == "question":
            self.question = str(d.get("question") or "")
        elif t == "answer":
            self.question = None
            self.entries.append(Entry(note=f"You answered: {d.get('answer', '')}"))
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
            self.entries.append(Entry(text=f"The model refused: {d.get('text', '')}"))
        elif t == "compacted":
            self.entries.append(Entry(note=describe_compaction(d)))
        if t in ("usage", "compacted") and isinstance(d.get("total"), dict):
            self.usage = d["total"]

    def _count_turn(self) -> None:
        """A model turn seen in a remote run's events: its state here (the one handed off, or
        a reattach mirror) does not count them, the server does. A local run's own state counts
        its turns (``steps``), so events never add to that."""
        if self.remote is not None:
            self.steps += 1

    def _find_call(self, call_id: str) -> Call | None:
        for entry in reversed(self.entries[-5:]):
            for call in entry.calls:
                if call.id == call_id:
                    return call
        return None


def _result_div(text: str, error: bool = False) -> str:
    cls = "jh-result jh-err" if error else "jh-result"
    return f'<div class="{cls}">{esc(short(text, MAX_RESULT_CHARS, MAX_RESULT_LINES))}</div>'


def _output_html(o: dict[str, Any]) -> tuple[str, bool]:
    """One sanitised output as log HTML, and whether it is rich (a table or an image) rather
    than text the step's text result already says."""
    if o["output_type"] == "stream":
        return _result_div(join_text(o.get("text", "")), o.get("name") == "stderr"), False
    if o["output_type"] == "error":
        return _result_div(f"{o.get('ename', 'Error')}: {o.get('evalue', '')}", True), False
    data = o["data"]
    html_out = data.get("text/html")
    if html_out and len(html_out) <= MAX_HTML_CHARS:
        return f'<div class="jh-html">{html_out}</div>', True
    for mime in IMAGE_MAGIC:
        if mime in data:   # safe_output kept it, so it is a real image of that type
            uri = image_data_uri(mime, data[mime], MAX_LOG_IMAGE_BYTES)
            if uri is None:
                size = fmt_bytes(len(join_text(data[mime])) * 3 // 4)
                return _result_div(f"[{mime} image of {size}: too big for the step log]"), True
            return f'<img class="jh-img" alt="{esc(mime)} output" src="{uri}">', True
    return _result_div(join_text(data.get("text/plain", ""))), bool(html_out)


def _outputs_html(outputs: Any) -> list[str]:
    """A step's outputs as log HTML when one of them is rich (a DataFrame's table, a plot), else
    [] (the text result says it all). Everything is sanitised: it may come from a remote run."""
    safe = [safe_output(o) for o in outputs or [] if isinstance(o, dict) and o.get("output_type") in OUTPUT_TYPES]
    shown = [_output_html(o) for o in safe]
    return [part for part, _ in shown] if any(rich for _, rich in shown) else []


def view_from_state(state: RunState) -> View:
    v = View(goal=state.goal, model=state.model, run_id=state.id, status=state.status,
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


def pulled_back(state: RunState) -> bool:
    """True if the state's last handoff/pull event is a pull: the run lives here again."""
    for ev in reversed(state.events):
        if ev.type in ("handoff", "pull"):
            return ev.type == "pull"
    return False


def esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def render_header_html(v: View) -> str:
    goal = short(v.goal.strip().splitlines()[0] if v.goal.strip() else "(no goal)", MAX_GOAL_CHARS)
    label = STATUS_LABELS.get(v.status, v.status)
    meta = [f"model <b>{esc(v.model or 'default')}</b>"]
    if v.remote:
        server, rid, links = v.remote
        where = f"remote · {esc(server)} · run {esc(rid)}"
        status_page = links.get("status_page") if isinstance(links, dict) else None
        if status_page:
            where += f' · <a href="{esc(status_page)}" target="_blank" rel="noopener">status page</a>'
        meta.append(where)
    else:
        meta.append(f"local · run {esc(v.run_id)}")
    steps = f"{v.steps} step{'s' if v.steps != 1 else ''}"
    if v.max_steps:
        steps += f" of max {v.max_steps}"
    meta.append(f'<span class="jh-nw">{steps}</span>')
    used = describe_usage(v.usage)
    if used:
        meta.append(f'<span class="jh-nw jh-usage">{esc(used)}</span>')
    return (f"<style>{CSS}</style>"
            f'<div class="jh-header"><span class="jh-goal" title="{esc(v.goal)}">{esc(goal)}</span>'
            f'<span class="jh-badge jh-s-{esc(v.status)}" data-status="{esc(v.status)}">{esc(label)}</span>'
            f'</div><div class="jh-meta">{" · ".join(meta)}</div>')


def render_plan_html(plan: list[tuple[str, str]]) -> str:
    if not plan:
        return '<div class="jh-section">Plan</div><div class="jh-empty">No plan yet.</div>'
    rows = []
    for text, status in plan:
        icon = PLAN_ICONS.get(status, "○")
        spin = " jh-spin" if status == "active" else ""
        rows.append(f'<li class="jh-p-{esc(status)}" data-status="{esc(status)}">'
                    f'<span class="jh-ico{spin}">{icon}</span><span class="jh-txt">{esc(text)}</span></li>')
    done = sum(1 for _, s in plan if s == "done")
    return (f'<div class="jh-section">Plan · {done}/{len(plan)} done</div>'
            f'<ul class="jh-plan">{"".join(rows)}</ul>')


def _call_html(call: Call) -> str:
    a = call.arguments
    if call.name == "run_python":
        body = f'<pre class="jh-code">{esc(short(str(a.get("code", "")), MAX_CODE_CHARS))}</pre>'
    elif call.name == "update_plan":
        body = '<div class="jh-tool">updated the plan</div>'
    elif call.name == "ask_user":
        body = f'<div class="jh-tool">asked you: {esc(str(a.get("question", "")))}</div>'
    elif call.name == "finish":
        body = f'<div class="jh-tool">finished: {esc(short(str(a.get("summary", "")), 400))}</div>'
    else:
        body = (f'<div class="jh-tool">{esc(call.name)}'
                f'({esc(short(json.dumps(a, ensure_ascii=False, default=str), 300))})</div>')
    if call.shown:
        body += "".join(call.shown)
    elif call.result is not None and call.name not in ("update_plan", "finish") and (
            call.name == "run_python" or call.is_error):
        result = call.result
        if result.startswith("[ok]\n") or result == "[ok]":
            result = result[5:]          # the model's status header; success needs no label here
        body += _result_div(result or "(no output)", call.is_error)
    return body


def render_log_html(entries: list[Entry]) -> str:
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
            parts.append(f'<div class="jh-step jh-note"><div class="jh-tool">{esc(e.note)}</div></div>')
            continue
        n += 1
        inner = f'<div class="jh-step-n">#{n}</div>'
        if e.note:
            inner += f'<div class="jh-tool">{esc(e.note)}</div>'
        if e.text:
            inner += f'<div class="jh-words">{esc(short(e.text, 2000))}</div>'
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
    body = esc(text)
    if link:
        body += f' <a href="{esc(link)}" target="_blank" rel="noopener">{esc(link)}</a>'
    if details:   # a traceback for a bug report: collapsed, never red noise under the widget
        body += (f'<details class="jh-details"><summary>Technical details</summary>'
                 f'<pre>{esc(details)}</pre></details>')
    return f'<div class="jh-msg jh-m-{level}" data-level="{level}">{body}</div>'


def render_text(v: View) -> str:
    """Plain-text rendering for terminals, nbconvert text and logs."""
    label = STATUS_LABELS.get(v.status, v.status)
    where = f"remote {v.remote[0]} run {v.remote[1]}" if v.remote else f"local run {v.run_id}"
    steps = f"{v.steps} step{'s' if v.steps != 1 else ''}" + (f"/{v.max_steps}" if v.max_steps else "")
    goal = short(" ".join(v.goal.split()), 200)
    lines = [f"Agent run [{label}] {goal}", f"  model {v.model or 'default'} · {where} · {steps}"]
    if v.plan:
        done = sum(1 for _, s in v.plan if s == "done")
        lines.append(f"  Plan ({done}/{len(v.plan)} done):")
        lines += [f"    {PLAN_ICONS.get(s, '○')} {t}" for t, s in v.plan]
    if v.entries:
        last = v.entries[-1]
        words = last.text or last.note or (last.calls[0].name if last.calls else "")
        if words:
            lines.append(f"  Last step: {short(' '.join(words.split()), 160)}")
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
