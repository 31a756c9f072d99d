"""The MCP server (stdio) behind ``jupyter handoff mcp``: another agent reaches the runs.

Claude Code, Cursor or Jupyter AI start it as a subprocess and call its tools: the same
actions as the CLI (list, show, follow, answer, cancel, diff) plus ``start_run``, which
delegates a task with some working files to the Jupyter Server: a fresh run in the server's
sandbox, with the server's own model key. Built on the official SDK's ``MCPServer``; stdout is
the protocol channel, so nothing here prints.

Files sent by ``start_run`` must lie inside the directory the server was started in (the
agent's project): a model cannot send the machine's other files away by naming them.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, link_or_copy
from .snapshot.files import IGNORE_DIRS
from .remote.http import HandoffClient
from .errors import HandoffError
from .remote.follow import STOP_STATUSES, cancel, follow
from .remote.views import DiffView, event_text
from .state import STATUS_LABELS, Event, RunState

MAX_EVENTS = 200            # per follow_run call; the model calls again with after=last_seq
MAX_EVENT_CHARS = 4000

INSTRUCTIONS = """\
jupyter-handoff runs LLM agents inside a remote Jupyter Server: each run has a goal, a plan, a \
sandboxed Python kernel and a result notebook; it may stop to ask a question. Use start_run to \
delegate a notebook/data task (with the files it needs) to the server, follow_run to watch it \
until it finishes or asks something, answer_run to reply, diff_run to see what it changed. \
Runs handed off from a notebook appear in list_runs too."""


class StartError(HandoffError):
    """start_run was given something it cannot send; the message says what to change."""


def _describe(run: dict[str, Any]) -> dict[str, Any]:
    """A run summary with its status in words and what a caller can do next."""
    out = dict(run)
    status = str(run.get("status") or "")
    out["status_text"] = STATUS_LABELS.get(status, status)
    rid = run.get("id")
    if status == "waiting_input":
        out["next"] = f"the run asks: {run.get('question')!r}; reply with answer_run(run_id={rid!r}, answer=...)"
    elif status in STOP_STATUSES:
        out["next"] = f"the run has ended; diff_run(run_id={rid!r}) shows what it changed"
    else:
        out["next"] = f"follow_run(run_id={rid!r}, after={run.get('last_seq', 0)}) waits for its next steps"
    return out


def _event_item(ev: Event) -> dict[str, Any]:
    text = "\n".join(event_text(ev))
    if len(text) > MAX_EVENT_CHARS:
        text = text[:MAX_EVENT_CHARS] + "\n... (trimmed; the result notebook has it all)"
    return {"seq": ev.seq, "type": ev.type, "text": text}


# -- start_run: delegate a fresh remote run with files -------------------------------------------------
def _inside(root: Path, path: str) -> tuple[Path, str]:
    """(absolute path, path relative to root) or StartError when it lies outside root."""
    full = (root / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    try:
        rel = full.relative_to(root.resolve())
    except ValueError:
        raise StartError(f"{path!r} is outside {root}, the directory this MCP server works in; "
                         "only files of that project can be sent") from None
    if not str(rel) or str(rel) == ".":
        return full, ""
    return full, rel.as_posix()


def stage_files(files: list[str] | dict[str, str], root: Path, stage: Path) -> None:
    """Lay out the run's working files in ``stage``: local paths (files or directories inside
    ``root``) are linked in at their relative place; a dict writes each text at its path."""
    if isinstance(files, dict):
        for rel, text in files.items():
            if not isinstance(text, str):
                raise StartError(f"the content of {rel!r} must be text")
            _, clean = _inside(stage, rel)
            if not clean:
                raise StartError(f"{rel!r} is not a file name")
            atomic_write_text(stage / clean, text)
        return
    for path in files:
        full, rel = _inside(root, path)
        if full.is_file():
            link_or_copy(full, stage / (rel or full.name))
        elif full.is_dir():
            for dirpath, dirnames, filenames in os.walk(full):
                dirnames[:] = [d for d in dirnames if d not in IGNORE_DIRS]
                for name in filenames:
                    src = Path(dirpath) / name
                    if src.is_file() and not src.is_symlink():
                        link_or_copy(src, stage / src.relative_to(root.resolve()))
        else:
            raise StartError(f"{path!r} does not exist in {root}")


def delegate(client: HandoffClient, goal: str, files: list[str] | dict[str, str] | None = None,
              model: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Capture ``files`` (no variables) through the normal bundle path, upload what the server
    lacks and create the run. Returns the run summary plus the files sent and left out."""
    if not goal or not goal.strip():
        raise StartError("the goal is empty: say what the run should do")
    root = Path(root or os.getcwd())
    from . import save_state
    with tempfile.TemporaryDirectory(prefix="handoff-start-") as tmp:
        stage, bundle = Path(tmp) / "work", Path(tmp) / "bundle"
        stage.mkdir()
        stage_files(files or [], root, stage)
        state = RunState(goal=goal.strip(), model=(model or "").strip(), status="paused")
        state.origin.host = socket.gethostname()
        report = save_state(bundle, ns={}, run=state, root=stage)
        client.upload_bundle(bundle, manifest=report.manifest)
        summary = client.create_run(report.manifest)
        shutil.rmtree(stage, ignore_errors=True)
    out = _describe(summary)
    out["files_sent"] = [f["path"] for f in report.files]
    out["files_left_out"] = report.skipped_files
    return out


# -- the server -------------------------------------------------------------------------------
def build_server(url: str | None = None, token: str | None = None, *, max_wait: float = 120.0,
                 root: Path | None = None) -> Any:
    """The MCPServer with the handoff tools; the client is made at the first call, so a missing
    setting is reported to the calling model (who can tell its user) instead of a dead server."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    server = MCPServer("jupyter-handoff", instructions=INSTRUCTIONS)
    lock = threading.Lock()
    made: list[HandoffClient] = []

    def client() -> HandoffClient:
        with lock:
            if not made:
                made.append(HandoffClient(url, token))
            return made[0]

    def call(fn: Any) -> Any:
        try:
            return fn(client())
        except HandoffError as exc:
            raise ToolError(exc.message + (f" (what to do: {exc.hint})" if exc.hint else "")) from exc

    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=True)

    @server.tool(annotations=read_only)
    def list_runs() -> dict[str, Any]:
        """List the runs on the Jupyter Server, newest first: id, status, goal, steps taken, last
        update. Use a run's id with show_run, follow_run, answer_run, cancel_run or diff_run."""
        runs = call(lambda cl: cl.list_runs())
        keep = ("id", "status", "goal", "steps", "updated", "question", "last_seq")
        return {"runs": [{**{k: r.get(k) for k in keep},
                          "status_text": STATUS_LABELS.get(r.get("status", ""), r.get("status")),
                          "notebook": (r.get("links") or {}).get("notebook")} for r in runs]}

    @server.tool(annotations=read_only)
    def show_run(run_id: str) -> dict[str, Any]:
        """One run in full: status, goal, plan, steps, the question it waits on (status
        waiting_input), its summary or error, last event number (last_seq) and links (status
        page, result notebook). 'next' says what to call next."""
        return _describe(call(lambda cl: cl.get_run(run_id)))

    @server.tool(annotations=read_only)
    def follow_run(run_id: str, after: int = 0, wait_seconds: float = 30.0) -> dict[str, Any]:
        """The run's events after event number `after` (0 = from the start): the agent's words,
        the Python it ran and its output, plan changes, questions, status changes. Waits up to
        `wait_seconds` for the run to finish or ask a question, returning early when it does.
        Call again with after=last_seq to go on. status 'waiting_input' means: read 'question'
        and reply with answer_run."""
        wait = max(0.0, min(float(wait_seconds), max_wait))
        events: list[Event] = []
        remote = call(lambda cl: follow(cl, run_id, events.append, after=after,
                                        deadline=time.monotonic() + wait))
        shown = events[:MAX_EVENTS]
        last = shown[-1].seq if shown else max(after, 0)
        out = {"run_id": run_id, "status": remote.status,
               "status_text": STATUS_LABELS.get(remote.status, remote.status),
               "events": [_event_item(ev) for ev in shown], "last_seq": last,
               "more": len(events) > len(shown)}
        if remote.status == "waiting_input":
            out["question"] = remote.state.question
        if remote.status == "completed":
            out["summary"] = remote.state.summary
        if remote.status == "failed":
            out["error"] = remote.state.error
        return out

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             open_world_hint=True))
    def answer_run(run_id: str, answer: str) -> dict[str, Any]:
        """Reply to the question a run asked (only while its status is waiting_input); the run
        then goes on. Follow it with follow_run(run_id, after=last_seq)."""
        return _describe(call(lambda cl: cl.answer(run_id, answer)))

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                             open_world_hint=True))
    def cancel_run(run_id: str) -> dict[str, Any]:
        """Stop a run for good: its kernel is shut down; its notebook and last checkpoint stay.
        Only do this when the user wants the run stopped."""
        return _describe(call(lambda cl: (cancel(cl, run_id), cl.get_run(run_id))[1]))

    @server.tool(annotations=read_only)
    def diff_run(run_id: str) -> dict[str, Any]:
        """What the run changed since it started (its latest checkpoint vs what it was given):
        files added/modified/deleted with unified diffs, and variables with before/after
        summaries. 'text' is the same as a readable report."""
        cl = call(lambda cl: cl)
        diff = call(lambda cl: cl.diff(run_id))
        return {"run_id": run_id, "text": str(DiffView(diff, run_id, cl.url)), **diff}

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                             idempotent_hint=False, open_world_hint=True))
    def start_run(goal: str, files: list[str] | dict[str, str] | None = None,
                  model: str | None = None) -> dict[str, Any]:
        """Delegate a task to the Jupyter Server: a fresh agent run starts there in a sandboxed
        Python kernel, with `files` as its working directory, and works on `goal` (write it as
        you would brief a colleague: data, what to compute, what to save). `files` is either a
        list of paths (files or directories) inside this project, sent with their relative
        paths, or an object {relative path: text content}. `model` is a preference such as
        'openai:gpt-4o'; the server's configured model and key decide. Returns the new run's id
        (the 'id' field) and which files were sent or left out (secrets files, too large);
        then call follow_run with that id."""
        return call(lambda cl: delegate(cl, goal, files, model, root=root))

    return server


def serve(url: str | None = None, token: str | None = None, *, max_wait: float = 120.0) -> None:
    """Run the MCP server on stdin/stdout until the client closes it."""
    build_server(url, token, max_wait=max_wait).run("stdio")
