"""The result notebook of a remote run: ``<workspace>/result.ipynb``.

Rebuilt from the run's event log after every step, so it always tells the whole story (also
steps that ran locally before the handoff, interruptions and recoveries) and is written
atomically: a reader (JupyterLab, a notification link) never sees a half-written file, and
the file passes ``nbformat.validate`` at every moment.
"""
from __future__ import annotations

import copy
import datetime as _dt
import functools
import html
import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterable

import nbformat
from nbformat import v4

from handoff_magic.atomic import atomic_write_text
from handoff_magic.state import Event, RunState, describe_compaction

log = logging.getLogger(__name__)

_STATUS_MARK = {"completed": "✔", "failed": "✘", "cancelled": "■", "pulled": "↩", "waiting_input": "?",
                "running": "▶", "restoring": "…", "queued": "…", "paused": "‖"}  # text glyphs, no emoji font needed
_PLAN_MARK = {"pending": "☐", "active": "▶", "done": "☑", "failed": "☒"}
_OUTPUT_KEYS = {
    "stream": ("name", "text"),
    "display_data": ("data", "metadata"),
    "execute_result": ("data", "metadata", "execution_count"),
    "error": ("ename", "evalue", "traceback"),
}


def _when(ts: float | None) -> str:
    if not ts:
        return "unknown"
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _md_escape(text: Any) -> str:
    """Keep user/agent text from breaking the markdown table or injecting raw HTML."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _clean_output(out: Any) -> nbformat.NotebookNode | None:
    """One nbformat v4 output from an executor dict, or None if it is not a valid output."""
    if not isinstance(out, dict):
        return None
    kind = out.get("output_type")
    if kind not in _OUTPUT_KEYS:
        return None
    kw = {k: out[k] for k in _OUTPUT_KEYS[kind] if k in out}
    if kind == "stream":
        kw.setdefault("name", "stdout")
        if kw["name"] not in ("stdout", "stderr"):
            kw["name"] = "stdout"
        text = kw.get("text", "")
        kw["text"] = "".join(text) if isinstance(text, list) else str(text)
    elif kind in ("display_data", "execute_result"):
        data = kw.get("data")
        if not isinstance(data, dict):
            return None
        kw["data"] = {k: ("".join(v) if isinstance(v, list) and k.startswith("text/") else v)
                      for k, v in data.items() if isinstance(k, str)}
        if not isinstance(kw.get("metadata"), dict):
            kw["metadata"] = {}
        if kind == "execute_result" and not isinstance(kw.get("execution_count"), int):
            kw["execution_count"] = None
    elif kind == "error":
        kw["ename"] = str(kw.get("ename", "Error"))
        kw["evalue"] = str(kw.get("evalue", ""))
        tb = kw.get("traceback", [])
        kw["traceback"] = [str(line) for line in tb] if isinstance(tb, list) else [str(tb)]
    return v4.new_output(kind, **kw)


def _header(state: RunState, model: str | None) -> str:
    handoff = next((e for e in state.events if e.type == "handoff"), None)
    origin = state.origin
    lines = [
        f"# Agent run `{state.id}`",
        "",
        f"**Goal:** {_md_escape(state.goal)}",
        "",
        f"**Status:** {_STATUS_MARK.get(state.status, '')} {state.status.replace('_', ' ')}".replace(":**  ", ":** ")
        + (f" — {_md_escape(state.error)}" if state.error else "")
        + (f"\n\n**Waiting for your answer:** {_md_escape(state.question)}" if state.status == "waiting_input"
           and state.question else ""),
        "",
        "| | |",
        "|---|---|",
        f"| Origin notebook | {_md_escape(origin.notebook_path or 'unknown')} |",
        f"| Origin host | {_md_escape(origin.host or 'unknown')} |",
        f"| Handed off | {_when(handoff.time if handoff else origin.time)} |",
        f"| Last update | {_when(state.updated)} |",
        f"| Model | {_md_escape(model or state.model or 'unknown')} |",
        f"| Steps | {state.steps} |",
        *([f"| Usage | {_md_escape(state.usage.describe())} |"] if state.usage.requests else []),
        "",
        "## Plan",
        "",
    ]
    if state.plan:
        lines += [f"{i}. {_PLAN_MARK.get(p.status, '☐')} {_md_escape(p.text)} *({p.status})*"
                  for i, p in enumerate(state.plan, 1)]
    else:
        lines.append("*(no plan yet)*")
    return "\n".join(lines)


def fmt_seconds(value: Any) -> str:
    """0.01753 -> '0.02 s', 83.4 -> '1 min 23 s': what a reader wants, not float noise."""
    try:
        sec = float(value)
    except (TypeError, ValueError):
        return str(value)
    if sec < 10:
        return f"{sec:.2f} s"
    if sec < 60:
        return f"{sec:.1f} s"
    minutes, rest = divmod(round(sec), 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _names(items: list[Any], limit: int = 50) -> str:
    shown = [str(i.get("path") or i.get("name") or json.dumps(i, ensure_ascii=False)) if isinstance(i, dict)
             else str(i) for i in items]
    text = ", ".join(f"`{_md_escape(x)}`" for x in shown[:limit])
    return text + (f" … ({len(shown) - limit} more)" if len(shown) > limit else "")


_SOURCE = {"handoff": "the handed-off bundle", "checkpoint": "the last checkpoint"}


def restore_table(report: dict[str, Any] | None) -> str:
    """Markdown of a RestoreReport.to_dict(): one sentence first (what came back, how long),
    then the restored variables, then what did not come back and why."""
    if not report:
        return "## Restore\n\n*(no restore report)*"
    variables = [v for v in report.get("variables") or [] if isinstance(v, dict)]
    imports = [v for v in variables if v.get("method") == "import"]
    skipped = [v for v in variables if v.get("outcome") == "skipped" or v.get("method") == "skipped"]
    rows = [v for v in variables if v not in imports and v not in skipped]
    files = report.get("files") or []
    sentence = (f"Restored **{len(rows) + len(imports)} variable{'s' if len(rows) + len(imports) != 1 else ''}**"
                + (f" ({len(imports)} as imports)" if imports else "")
                + f" and **{len(files)} file{'s' if len(files) != 1 else ''}**")
    if "seconds" in report:
        sentence += f" in {fmt_seconds(report['seconds'])}"
    source = _SOURCE.get(str(report.get("source") or ""))
    if source:
        sentence += f", from {source}"
    if report.get("reason") and report.get("reason") != report.get("source"):
        sentence += f" ({_md_escape(report['reason'])})"
    lines = ["## Restore report", "", sentence + "."]
    if skipped:
        lines[-1] += f" **{len(skipped)} not restored** (below)."
    if rows:
        lines += ["", "| variable | type | method | outcome | note |", "|---|---|---|---|---|"]
        for v in rows:
            lines.append("| {} | {} | {} | {} | {} |".format(*(
                _md_escape(str(v[k]) if v.get(k) is not None else "")
                for k in ("name", "type", "method", "outcome", "reason"))))
    if report.get("variables_not_listed"):
        lines += ["", f"*…and {int(report['variables_not_listed'])} more variables not listed.*"]
    if imports:
        lines += ["", "**Imports:** " + _names([v.get("name") for v in imports])]
    if files:
        lines += ["", "**Files written:** " + _names(files)]
    if skipped:
        lines += ["", "**Not restored:**", ""]
        lines += [f"- `{_md_escape(v.get('name', '?'))}` ({_md_escape(v.get('type') or '')}): "
                  f"{_md_escape(v.get('reason') or 'skipped')}" for v in skipped[:50]]
    conflicts = [c for c in report.get("conflicts") or [] if isinstance(c, dict)]
    if conflicts:
        lines += ["", "**File conflicts** (your newer file was kept; the incoming one is beside it):", ""]
        lines += [f"- `{_md_escape(c.get('path', '?'))}` → `{_md_escape(c.get('written_as') or c.get('error') or '')}`"
                  for c in conflicts[:50]]
    return "\n".join(lines)


def _cell_id(prefix: str, seq: int) -> str:
    return f"{prefix}-{seq}"


@functools.lru_cache(maxsize=1)
def kernel_metadata() -> tuple[dict[str, str], dict[str, Any]]:
    """The kernelspec and language_info exactly as JupyterLab writes them once it has connected
    a python3 kernel: equal values leave the opened notebook unmodified (no unsaved mark, so no
    autosave racing the runner's rewrites and no "file changed on disk" dialog)."""
    spec = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
        found = KernelSpecManager().get_kernel_spec("python3")
        spec = {"name": "python3", "display_name": found.display_name, "language": found.language}
    except (ImportError, NoSuchKernel, OSError, ValueError) as exc:
        log.info("no python3 kernel spec (%s); the result notebook names the default one", exc)
    from ipykernel.ipkernel import IPythonKernel   # what the kernel's kernel_info reply says
    return spec, dict(IPythonKernel.language_info)


def build_result_notebook(state: RunState, *, model: str | None = None,
                          events: Iterable[Event] | None = None) -> nbformat.NotebookNode:
    """A notebook telling the run's story from its events; pure function of the state."""
    events = list(events if events is not None else state.events)
    nb = v4.new_notebook()
    kernelspec, language_info = kernel_metadata()
    nb.metadata["kernelspec"] = dict(kernelspec)
    nb.metadata["language_info"] = copy.deepcopy(language_info)
    nb.metadata["handoff"] = {"run_id": state.id, "status": state.status, "last_seq": state.last_seq}
    cells = [v4.new_markdown_cell(_header(state, model), id="header")]
    restores = [e for e in events if e.type == "restore"]
    if restores:
        cells.append(v4.new_markdown_cell(restore_table(restores[0].data.get("report")), id="restore"))
    code_cells: dict[str, nbformat.NotebookNode] = {}
    for ev in events:
        d = ev.data or {}
        t = ev.type
        if t == "assistant" and d.get("text"):
            cells.append(v4.new_markdown_cell(str(d["text"]), id=_cell_id("say", ev.seq)))
        elif t == "tool_call" and d.get("name") == "run_python":
            args = d.get("arguments") or {}
            cell = v4.new_code_cell(str(args.get("code", "")), id=_cell_id("code", ev.seq))
            code_cells[str(d.get("id"))] = cell
            cells.append(cell)
        elif t == "tool_result":
            cell = code_cells.get(str(d.get("id")))
            if cell is None:
                continue
            outs = [o for o in (_clean_output(x) for x in d.get("outputs") or []) if o is not None]
            if not outs and d.get("content") and d.get("is_error"):
                outs = [v4.new_output("stream", name="stderr", text=str(d["content"]))]
            cell.outputs = outs
            count = d.get("execution_count")
            if not isinstance(count, int):
                count = next((o.get("execution_count") for o in outs
                              if o.get("output_type") == "execute_result"), None)
            cell.execution_count = count if isinstance(count, int) else None
        elif t == "question":
            cells.append(v4.new_markdown_cell(f"**The agent asked:** {d.get('question', '')}",
                                              id=_cell_id("ask", ev.seq)))
        elif t == "answer":
            cells.append(v4.new_markdown_cell(f"**Answer:** {d.get('answer', '')}",
                                              id=_cell_id("ans", ev.seq)))
        elif t == "interrupted":
            cells.append(v4.new_markdown_cell(
                f"> ⚠️ **Step interrupted** ({_when(ev.time)}): {d.get('reason', '')}",
                id=_cell_id("int", ev.seq)))
        elif t == "handoff":
            cells.append(v4.new_markdown_cell(
                f"---\n*Handed off to {d.get('server', 'the server')} at {_when(ev.time)}; "
                "the steps below ran remotely.*", id=_cell_id("hand", ev.seq)))
        elif t == "restore" and ev is not restores[0]:
            cells.append(v4.new_markdown_cell(
                f"*Kernel restored again at {_when(ev.time)} "
                f"({(d.get('report') or {}).get('reason', 'recovery')}).*", id=_cell_id("rst", ev.seq)))
        elif t == "error":
            cells.append(v4.new_markdown_cell(
                f"> ❌ **Error:** {d.get('error', '')}" + (f"\n>\n> {d['hint']}" if d.get("hint") else ""),
                id=_cell_id("err", ev.seq)))
        elif t == "refusal":
            cells.append(v4.new_markdown_cell(f"> 🚫 **The model refused:** {_md_escape(str(d.get('text', '')))}",
                                              id=_cell_id("ref", ev.seq)))
        elif t == "compacted":
            cells.append(v4.new_markdown_cell(
                f"*{describe_compaction(d)}.*\n\n<details><summary>Summary the model continues from</summary>\n\n"
                f"{_md_escape(str(d.get('summary', '')))}\n\n</details>", id=_cell_id("cmp", ev.seq)))
        elif t == "finish":
            cells.append(v4.new_markdown_cell(f"## Summary\n\n{d.get('summary', '')}",
                                              id=_cell_id("fin", ev.seq)))
        elif t == "status" and d.get("status") in ("failed", "cancelled", "pulled"):
            reason = f": {d['reason']}" if d.get("reason") else ""
            cells.append(v4.new_markdown_cell(f"**Run {d['status']}**{reason}",
                                              id=_cell_id("st", ev.seq)))
    nb.cells = cells
    return nb


def _fallback_outputs(nb: nbformat.NotebookNode) -> None:
    """Replace outputs that fail validation by a text note, so the file stays valid."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        good = []
        for out in cell.outputs:
            probe = v4.new_notebook(cells=[v4.new_code_cell("", outputs=[out], id="probe")])
            try:
                nbformat.validate(probe)
                good.append(out)
            except nbformat.ValidationError as exc:
                good.append(v4.new_output("stream", name="stderr",
                                          text=f"[output not shown: invalid ({exc.message})]\n"))
        cell.outputs = good


def write_result_notebook(path: Path, nb: nbformat.NotebookNode) -> None:
    """Validate, then write atomically (temp file in the same dir, fsync, rename)."""
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError:
        _fallback_outputs(nb)
        nbformat.validate(nb)
    atomic_write_text(path, nbformat.writes(nb, version=4), mode=0o644)


def write_for_state(path: Path, state: RunState, *, model: str | None = None) -> None:
    """Build and write in one call: what the runner does after every step."""
    write_result_notebook(path, build_result_notebook(state, model=model))


class ResultNotebook:
    """One run's ``result.ipynb``, rewritten from its state: one writer at a time, and a state
    already on disk (same last event, same status) is not written again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._written: tuple[int, str] = (0, "")

    def write(self, state: RunState, model: str) -> str | None:
        """Write it now (milliseconds: callers run off the event loop). The notebook is a
        report, so a failure never stops the run: it is logged and its text returned for the
        run's event log."""
        snap = copy.copy(state)  # the lists are copied: the loop may go on appending to them
        snap.events, snap.messages, snap.plan = list(state.events), list(state.messages), list(state.plan)
        with self._lock:
            key = (snap.last_seq, snap.status)
            if key == self._written:
                return None
            try:
                write_for_state(self.path, snap, model=model)
            except Exception as exc:
                log.exception("jupyter-handoff: writing %s failed", self.path)
                return f"result.ipynb could not be written: {exc}"
            self._written = key
        return None
