"""What the remote actions show: in a notebook the server's run list, a diff, a pull report and the
small display helpers they share (progress and messages on a widget); in a terminal (CLI, MCP)
an event as plain text lines.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Callable

from ..diff import render_diff_html
from ..sanitize import sanitize_view
from ..snapshot.reports import fmt_bytes
from ..state import STATUS_LABELS, Event

def show(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:
        print(obj)
        return
    display(obj)


def widget_message(widget: Any, text: str, level: str = "info") -> None:
    if widget is not None and hasattr(widget, "show_message"):
        widget.show_message(text, level)


def progress_done(widget: Any) -> None:
    """Hide the bar once the transfer it measured is over (it must not linger for the whole run)."""
    if widget is not None and hasattr(widget, "set_progress"):
        widget.set_progress("", 0, 0)


PROGRESS_EVERY = 0.1   # seconds between bar updates: each one is a comm message to the browser


def progress_reporter(widget: Any, label: str) -> Callable[[int, int], None]:
    """A bar update at most every PROGRESS_EVERY seconds (a 1 GB upload reports thousands of
    pieces; drawing each cost the kernel more CPU than sending it), and always the last one."""
    if widget is None or not hasattr(widget, "set_progress"):
        return lambda done, total: None
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or (total and done >= total):
            last[0] = now
            widget.set_progress(label, done, total)
    return report


def _ago(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


class RunList(list):
    """The server's runs; shows as an HTML table in the notebook and a text table elsewhere."""

    def __init__(self, server_url: str, runs: list[dict[str, Any]]) -> None:
        super().__init__(runs)
        self.server_url = server_url

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(r.get("id", ""), STATUS_LABELS.get(r.get("status", ""), r.get("status", "")), str(r.get("steps", "")),
                 _ago(r.get("updated")), (r.get("goal") or "")[:60]) for r in self]

    def text(self, hint: str = "%reattach ID follows one") -> str:
        """A plain-text table; ``hint`` says how to go on from where it is shown."""
        if not self:
            return f"no runs on {self.server_url}"
        head = ("id", "status", "steps", "updated", "goal")
        rows = [head] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return f"runs on {self.server_url}:\n" + "\n".join(lines) + f"\n{hint}"

    def __str__(self) -> str:
        return self.text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        if not self:
            return f"<p>No runs on {html.escape(self.server_url)}.</p>"
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._rows())
        return (f"<p>Runs on {html.escape(self.server_url)} — <code>%reattach ID</code> follows one.</p>"
                "<table><tr><th>id</th><th>status</th><th>steps</th><th>updated</th><th>goal</th></tr>"
                f"{rows}</table>")


class DiffView:
    """The server's diff (files + variables) between the handoff and the latest checkpoint."""

    def __init__(self, data: dict[str, Any], run_id: str = "", server_url: str = "") -> None:
        self.data = data
        self.run_id = run_id
        self.server_url = server_url

    @property
    def title(self) -> str:
        """What is compared with what: the state sent at handoff vs the run's latest checkpoint."""
        run = f"run {self.run_id}" + (f" on {self.server_url}" if self.server_url else "") if self.run_id else "the run"
        return f"What {run} changed: the handoff vs its latest checkpoint"

    def _repr_html_(self) -> str:
        return render_diff_html(self.data, self.title)

    def __str__(self) -> str:
        lines = []
        for f in self.data.get("files") or []:
            size = f.get("size_after") if f.get("size_after") is not None else f.get("size_before")
            lines.append(f"file {_change(f):8} {f.get('path')} ({size} bytes)")
            if f.get("unified_diff"):
                lines.append(str(f["unified_diff"]).rstrip())
        for v in self.data.get("variables") or []:
            summary = v.get("summary_after") or v.get("summary_before") or ""
            lines.append(f"var  {_change(v):8} {v.get('name')}: {v.get('type_after') or v.get('type_before')} "
                         f"{_short(summary)}".rstrip())
        return "\n".join([self.title] + (lines or ["no changes since the handoff"]))

    __repr__ = __str__


def _change(entry: dict[str, Any]) -> str:
    return str(entry.get("change") or entry.get("status") or "?")


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = value.get("summary") or value.get("type") or json.dumps(value)[:80]
    return str(value)[:120]


@dataclass
class PullReport:
    run_id: str
    server_url: str
    bytes_downloaded: int
    restore: Any
    conflicts: list[Any]
    seconds: float

    def __str__(self) -> str:
        lines = [f"pulled run {self.run_id} from {self.server_url}: downloaded "
                 f"{fmt_bytes(self.bytes_downloaded)} in {self.seconds:.2f}s"]
        if self.restore is not None:
            lines.append(str(self.restore))
        for c in self.conflicts:
            lines.append(f"conflict: {_conflict_text(c)}")
        lines.append(self.next_step())
        return "\n".join(lines)

    def next_step(self) -> str:
        """What to do now, for the status the run had when it was pulled."""
        run = getattr(self.restore, "run", None)
        status = getattr(run, "status", "paused")
        if status == "completed":
            return ('the run had completed; its results are here. %agent continue "what next" '
                    "gives it follow-up instructions")
        if status == "failed":
            return "the run had failed; %agent continue retries the step that failed"
        if status == "waiting_input":
            question = getattr(run, "question", None) or ""
            return f'the agent waits for your answer: {question} -> %agent continue "your answer"'
        if status == "cancelled":
            return "the run had been cancelled; its variables and files are here. Start a new one with %agent TASK"
        return "%agent continue goes on here with the full plan and messages"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        body = self.restore._repr_html_() if hasattr(self.restore, "_repr_html_") else ""
        conflicts = "".join(f"<li>{html.escape(_conflict_text(c))}</li>" for c in self.conflicts)
        # names, types, reasons, paths and the waiting question come from the remote run's checkpoint
        return sanitize_view(f"<p>Pulled run <b>{html.escape(self.run_id)}</b> from {html.escape(self.server_url)} "
                             f"({fmt_bytes(self.bytes_downloaded)} downloaded in {self.seconds:.2f}s). "
                             f"{html.escape(self.next_step())}.</p>{body}"
                             + (f"<p>Conflicts:</p><ul>{conflicts}</ul>" if conflicts else ""))


def _conflict_text(c: Any) -> str:
    if isinstance(c, dict):
        if c.get("error"):
            return f"{c.get('path')}: {c['error']}"
        return (f"{c.get('path')} changed here since the handoff: your version was kept, the run's "
                f"version is in {c.get('written_as')}")
    return str(c)


# -- what a terminal shows (the CLI and the MCP server) --------------------------------------
MAX_OUTPUT_LINES = 20


def _indent(text: str, max_lines: int | None = None) -> list[str]:
    lines = str(text).rstrip("\n").splitlines() or [""]
    if max_lines is not None and len(lines) > max_lines:
        hidden = len(lines) - max_lines
        lines = lines[:max_lines] + [f"... ({hidden} more lines; the run's notebook has them all)"]
    return ["  " + line for line in lines]


def plan_text(steps: Iterable[dict[str, Any]]) -> list[str]:
    marks = {"done": "[x]", "active": "[>]", "failed": "[!]"}
    return [f"{marks.get(str(s.get('status')), '[ ]')} {s.get('text', '')}" for s in steps]


def event_text(ev: Event) -> list[str]:
    """One event as plain-ASCII lines (any locale prints them), the first naming what happened;
    [] for the bookkeeping events a reader does not need (checkpoints, usage)."""
    d = ev.data or {}
    if ev.type == "assistant":
        return ["agent:"] + _indent(str(d.get("text") or ""))
    if ev.type in ("tool_call", "tool_result") and d.get("name") != "run_python":
        return []   # plan updates, questions and the finish have events of their own
    if ev.type == "tool_call":
        args = d.get("arguments") or {}
        return ["python:"] + _indent(args.get("code", "") if isinstance(args, dict) else str(args))
    if ev.type == "tool_result":
        content = str(d.get("content") or "")
        label = "error:" if d.get("is_error") else "output:"
        return [label] + (_indent(content, MAX_OUTPUT_LINES) if content.strip() else [])
    if ev.type == "plan":
        return ["plan:"] + ["  " + line for line in plan_text(d.get("steps") or [])]
    if ev.type == "status":
        status = str(d.get("status") or "")
        reason = f" ({d['reason']})" if d.get("reason") else ""
        return [f"status: {STATUS_LABELS.get(status, status)}{reason}"]
    if ev.type == "error":
        return [f"error: {d.get('error')}" + (f" ({d['hint']})" if d.get("hint") else "")]
    one_line = {"question": lambda: f"question: {d.get('question')}",
                "answer": lambda: f"answer: {d.get('answer')}",
                "finish": lambda: f"finished: {d.get('summary')}",
                "interrupted": lambda: f"interrupted: {d.get('reason') or ''}",
                "compacted": lambda: "compacted the older conversation into a summary",
                "handoff": lambda: f"handed off to {d.get('server')} as {d.get('remote_id')}",
                "pull": lambda: "pulled back into a notebook",
                "restore": lambda: "restored the handed-off kernel state"}
    return [one_line[ev.type]().rstrip()] if ev.type in one_line else []
