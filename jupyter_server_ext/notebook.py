"""The result notebook of a remote run: ``<workspace>/result.ipynb``.

Rebuilt from the run's event log after every step, so it always tells the whole story (also
steps that ran locally before the handoff, interruptions and recoveries) and is written
atomically: a reader (JupyterLab, a notification link) never sees a half-written file, and
the file passes ``nbformat.validate`` at every moment.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import nbformat
from nbformat import v4

from handoff_magic.state import Event, RunState

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


def _md_escape(text: str) -> str:
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
        f"**Status:** {state.status}" + (f" — {_md_escape(state.error)}" if state.error else ""),
        "",
        "| | |",
        "|---|---|",
        f"| Origin notebook | {_md_escape(origin.notebook_path or 'unknown')} |",
        f"| Origin host | {_md_escape(origin.host or 'unknown')} |",
        f"| Handed off | {_when(handoff.time if handoff else origin.time)} |",
        f"| Model | {_md_escape(model or state.model or 'unknown')} |",
        f"| Steps | {state.steps} |",
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


def restore_table(report: dict[str, Any] | None) -> str:
    """Markdown table of a RestoreReport.to_dict(): what came back, how, and what did not."""
    if not report:
        return "## Restore\n\n*(no restore report)*"
    lines = ["## Restore report", ""]
    variables = report.get("variables") or []
    if variables:
        lines += ["| variable | type | method | outcome | note |", "|---|---|---|---|---|"]
        for v in variables:
            if not isinstance(v, dict):
                continue
            lines.append("| {} | {} | {} | {} | {} |".format(*(
                _md_escape(v.get(k) if v.get(k) is not None else "")
                for k in ("name", "type", "method", "outcome", "reason"))))
    else:
        lines.append("*(no variables)*")
    for key, title in (("files", "Files"), ("imports", "Imports"), ("conflicts", "File conflicts"),
                       ("skipped", "Skipped")):
        items = report.get(key)
        if items:
            shown = [i if isinstance(i, str) else json.dumps(i, ensure_ascii=False) for i in items]
            lines += ["", f"**{title}:** " + ", ".join(_md_escape(s) for s in shown[:50])
                      + (f" … ({len(shown) - 50} more)" if len(shown) > 50 else "")]
    for key in ("seconds", "bytes"):
        if key in report:
            lines.append(f"\n**{key}:** {report[key]}")
    return "\n".join(lines)


def _cell_id(prefix: str, seq: int) -> str:
    return f"{prefix}-{seq}"


def build_result_notebook(state: RunState, *, model: str | None = None,
                          events: Iterable[Event] | None = None) -> nbformat.NotebookNode:
    """A notebook telling the run's story from its events; pure function of the state."""
    events = list(events if events is not None else state.events)
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
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
    text = nbformat.writes(nb, version=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".result-", suffix=".ipynb.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_for_state(path: Path, state: RunState, *, model: str | None = None) -> None:
    """Build and write in one call: what the runner does after every step."""
    write_result_notebook(path, build_result_notebook(state, model=model))
