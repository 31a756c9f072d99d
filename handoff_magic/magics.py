"""IPython magics: %snapshot, %agent/%%agent, %handoff, %reattach, %pull, %runs.

Each magic is a thin parser; the work lives in snapshot/ (save/load), local/run.py (LocalRun)
and remote/journey.py (handoff, reattach, pull).
Bad arguments raise IPython's UsageError (a one-line red message with the usage, no traceback);
a run that cannot do what was asked says why and what to type instead.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .errors import HandoffError

__all__ = ["HandoffMagics", "UsageError", "parse_agent_line"]

AGENT_USAGE = """usage:
  %agent [--model SPEC] [--max-steps N] [--max-tokens N] [--max-cost USD] [--background] TASK
  %%agent [--model SPEC] [--max-steps N] [--max-tokens N] [--max-cost USD] [--background]   (the cell body is the task)
  %agent continue [--background] [--model SPEC] ["answer or follow-up"]
  %agent pause | %agent cancel
SPEC is openai:MODEL, anthropic:MODEL or scripted:PATH (default: HANDOFF_MODEL, ~/.jupyter/handoff.json, demo)."""
HANDOFF_USAGE = "usage: %handoff [--to URL] [--token TOKEN] [--fork] [--dry-run] [RUN_ID]"
REATTACH_USAGE = "usage: %reattach [RUN_ID] [--to URL] [--token TOKEN]   (no RUN_ID: list the server's runs)"
PULL_USAGE = "usage: %pull RUN_ID [--again] [--trust] [--to URL] [--token TOKEN]"

_FLAGS = {"--background"}
_VALUED = {"--model", "--max-steps", "--max-tokens", "--max-cost"}
_OPT_RE = re.compile(r"(--?[A-Za-z][\w-]*)(=|(?=\s|$))")


def _take_value(text: str, name: str, usage: str) -> tuple[str, str]:
    """One option value at the start of ``text`` (bare or quoted) and the rest."""
    text = text.lstrip()
    if not text:
        raise UsageError(f"option {name} needs a value\n{usage}")
    if text[0] in "\"'":
        end = text.find(text[0], 1)
        if end < 0:
            raise UsageError(f"the value of {name} has an unclosed quote\n{usage}")
        return text[1:end], text[end + 1:]
    parts = text.split(None, 1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text[0] not in text[1:-1]:
        return text[1:-1]
    return text


def parse_agent_line(line: str, usage: str = AGENT_USAGE) -> tuple[dict[str, Any], str]:
    """Leading ``--options`` and the free text after them (kept verbatim: quotes, apostrophes).

    ``--`` ends the options, so a task may itself start with a dash.
    """
    opts: dict[str, Any] = {"model": None, "max_steps": None, "max_tokens": None, "max_cost": None,
                            "background": False}
    rest = line.strip()
    while rest.startswith("-"):
        if rest == "--" or rest.startswith("-- "):
            rest = rest[2:].strip()
            break
        m = _OPT_RE.match(rest)
        if not m:
            break
        name, has_eq = m.group(1), m.group(2) == "="
        after = rest[m.end():]
        if name in _FLAGS:
            if has_eq:
                raise UsageError(f"{name} takes no value\n{usage}")
            opts[name[2:].replace("-", "_")] = True
        elif name in _VALUED:
            if has_eq and (not after or after[0].isspace()):
                raise UsageError(f"option {name} needs a value\n{usage}")
            value, after = _take_value(after, name, usage)
            if not value:
                raise UsageError(f"option {name} needs a value\n{usage}")
            opts[name[2:].replace("-", "_")] = value
        else:
            raise UsageError(f"unknown option {name}\n{usage}")
        rest = after.strip()
    for key, kind in (("max_steps", int), ("max_tokens", int), ("max_cost", float)):
        if opts[key] is not None:
            opts[key] = _positive(opts[key], key, kind, usage)
    return opts, rest


def _positive(raw: str, key: str, kind: type, usage: str) -> Any:
    """A budget option's value: a positive whole number (steps, tokens) or amount (USD)."""
    flag = "--" + key.replace("_", "-")
    what = "a whole number" if kind is int else "an amount in USD, e.g. 0.50"
    try:
        value = kind(raw.lstrip("$"))
    except ValueError:
        raise UsageError(f"{flag} needs {what}, got {raw!r}\n{usage}") from None
    if value < 1 if kind is int else value <= 0:
        raise UsageError(f"{flag} must be {'at least 1' if kind is int else 'more than 0'}, got {raw}\n{usage}")
    return value


class _ArgParser(argparse.ArgumentParser):
    """argparse that raises UsageError (with the usage line) instead of exiting the kernel."""

    def __init__(self, usage: str, **kwargs: Any) -> None:
        super().__init__(add_help=False, usage=argparse.SUPPRESS, **kwargs)
        self._usage_text = usage

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\n{self._usage_text}")

    @classmethod
    def for_server(cls, usage: str, run_id_optional: bool) -> "_ArgParser":
        """A magic that reaches a server: RUN_ID, ``--to URL`` and ``--token T``."""
        p = cls(usage)
        p.add_argument("run_id", nargs="?" if run_id_optional else None)
        p.add_argument("--to")
        p.add_argument("--token")
        return p


def _split(line: str, usage: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the arguments ({exc})\n{usage}") from None


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an action; our own errors become one clean line (they already say what to do)."""
    try:
        return fn(*args, **kwargs)
    except HandoffError as exc:
        raise UsageError(str(exc)) from exc


_AGENT_QUESTION = re.compile(r"^(\s*)%agent\s+(.*\?)\s*$")


def protect_agent_questions(lines: list[str]) -> list[str]:
    """Input transformer: `%agent what drives sales?` is a task, not IPython's `sales?` help.

    IPython turns a line ending in ``?`` into object introspection before any magic runs;
    rewriting such %agent lines into the explicit call keeps the question mark in the task.
    """
    out = []
    for line in lines:
        m = _AGENT_QUESTION.match(line)
        if m:
            nl = "\n" if line.endswith("\n") else ""
            line = f"{m.group(1)}get_ipython().run_line_magic('agent', {m.group(2).strip()!r}){nl}"
        out.append(line)
    return out


def _display(obj: Any) -> Any:
    """Display ``obj`` and return its display handle (None when there is nothing to show)."""
    from IPython.display import display
    if obj is None:
        return None
    return display(obj, display_id=True)


def _show_remote_result(result: Any) -> None:
    """A remote action returns a run (shown as its live widget) or a report/list (shown as is)."""
    widget = getattr(result, "widget", None)
    _display(widget if widget is not None else result)


def _refresh(handle: Any, obj: Any) -> None:
    """Re-publish a finished foreground run's widget so its text/plain form (nbconvert, terminals,
    saved notebooks without widget state) shows the final status rather than the starting one."""
    if handle is not None:
        handle.update(obj)


@magics_class
class HandoffMagics(Magics):
    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        cleanup = getattr(shell, "input_transformers_cleanup", None)
        if cleanup is not None and protect_agent_questions not in cleanup:
            cleanup.append(protect_agent_questions)

    @line_magic
    def snapshot(self, line: str) -> Any:
        """%snapshot save PATH | %snapshot load PATH | %snapshot verify PATH [--no-files] | %snapshot check

        save: variables, imports, In/Out history and working-directory files into bundle PATH;
        load: restore PATH into this kernel (nothing changes if the bundle is damaged);
        verify: check every chunk's hash. --no-files leaves working-directory files out;
        check: what a handoff would carry, by which method, its size, and what stays behind and why.
        """
        from IPython.core.error import UsageError as IPyUsageError

        from . import load_state, save_state

        args = shlex.split(line)
        files = "--no-files" not in args
        args = [a for a in args if a != "--no-files"]
        if args == ["check"]:
            from .snapshot.preflight import preflight
            return preflight(self.shell)
        if len(args) != 2 or args[0] not in ("save", "load", "verify"):
            raise IPyUsageError("usage: %snapshot save PATH | %snapshot load PATH | %snapshot verify PATH "
                                "[--no-files] | %snapshot check")
        action, path = args
        if action == "save":
            return save_state(path, self.shell, files=files)
        if action == "verify":
            from .manifest import verify
            verify(Path(path))
            print(f"{path}: manifest and every chunk verified")
            return None
        return load_state(path, self.shell, files=files)

    # -- %agent -----------------------------------------------------------------------------
    @line_magic
    def agent(self, line: str) -> None:
        """Run an agent on TASK in this kernel; `%agent continue ["answer"]` resumes it.

        %agent [--model SPEC] [--max-steps N] [--background] TASK
        %agent continue [--background] [--model SPEC] ["answer or follow-up"]
        %agent pause | %agent cancel
        """
        stripped = line.strip()
        word, _, tail = stripped.partition(" ")
        if word == "continue":
            self._continue(tail)
            return
        if stripped in ("pause", "cancel"):
            self._pause_or_cancel(stripped)
            return
        opts, task = parse_agent_line(line)
        self._start(_unquote(task), opts)

    @cell_magic("agent")  # type: ignore[arg-type]  # IPython types only the bare @cell_magic form
    def agent_cell(self, line: str, cell: str) -> None:
        """%%agent [--model SPEC] [--max-steps N] [--background] — the cell body is the task."""
        opts, extra = parse_agent_line(line)
        task = "\n".join(p for p in (_unquote(extra), cell.strip()) if p)
        self._start(task, opts)

    def _start(self, task: str, opts: dict[str, Any]) -> None:
        from .config import resolve_model_spec
        from .local.run import RUNS, LocalRun

        if not task:
            raise UsageError(f"no task given: say what the agent should do\n{AGENT_USAGE}")
        busy = [r for r in list(RUNS.values()) if r.running]
        if busy:
            raise UsageError(f"run {busy[0].id} is still running in the background and uses this kernel: "
                             "%agent pause (or its Pause button) first, or wait for it to finish")
        try:
            spec = resolve_model_spec(opts["model"])
            run = LocalRun.new(task, shell=self.shell, model=spec, max_steps=opts["max_steps"],
                               max_tokens=opts["max_tokens"], max_cost=opts["max_cost"])
        except HandoffError as exc:
            raise UsageError(str(exc)) from exc
        handle = _display(run.widget)
        run.start(background=opts["background"])
        if not opts["background"]:
            _refresh(handle, run.widget)

    def _continue(self, tail: str) -> None:
        from .local.run import RUNS, current_run

        usage = AGENT_USAGE
        opts, rest = parse_agent_line(tail, usage)
        if any(opts[k] is not None for k in ("max_steps", "max_tokens", "max_cost")):
            raise UsageError("--max-steps, --max-tokens and --max-cost apply when a run starts; %agent "
                             f"continue gives each resume a fresh allowance\n{usage}")
        run = current_run()
        if run is None:
            raise UsageError("no agent run in this kernel to continue: start one with %agent TASK")
        busy = [r for r in list(RUNS.values()) if r.running and r is not run]
        if busy:
            raise UsageError(f"run {busy[0].id} is running in the background: %agent pause it first")
        answer = _unquote(rest) or None
        try:
            run.check_continue(answer)
            if opts["model"]:
                run.use_model(opts["model"])
            handle = _display(run.widget)
            run.continue_(answer, background=opts["background"])
            if not opts["background"]:
                _refresh(handle, run.widget)
        except HandoffError as exc:
            raise UsageError(str(exc)) from exc

    def _pause_or_cancel(self, what: str) -> None:
        from .local.run import current_run
        run = current_run()
        if run is None:
            raise UsageError("no agent run in this kernel: start one with %agent TASK")
        if what == "cancel":
            _call(run.cancel)
            print(f"run {run.id}: cancel requested" if run.running else f"run {run.id} is {run.status}")
            return
        if not run.running:
            raise UsageError(f"run {run.id} is not running in the background (it is {run.status}); "
                             "a foreground run pauses with the stop button / kernel interrupt")
        run.request_pause()
        if run.wait_paused(30.0):
            print(f"run {run.id} is {run.status}: %agent continue resumes it")
        else:
            print(f"run {run.id} will pause when its current step ends (still {run.status})")

    # -- %runs --------------------------------------------------------------------------------
    @line_magic
    def runs(self, line: str) -> Any:
        """List the agent runs in this kernel: id, goal, status, steps, where they run."""
        from .local.run import RUNS, RunTable
        if line.strip():
            raise UsageError("usage: %runs   (no arguments; %reattach lists the runs on a server)")
        seen: list[Any] = []
        for r in list(RUNS.values()):
            if all(r is not s for s in seen):
                seen.append(r)
        return RunTable(seen)

    # -- remote actions -------------------------------------------------------------------------
    def _resolve_run(self, run_id: str | None, usage: str) -> Any:
        from .local.run import RUNS, current_run
        if run_id:
            run = RUNS.get(run_id)
            if run is None:
                known = ", ".join(RUNS) or "none"
                raise UsageError(f"no agent run {run_id!r} in this kernel (runs here: {known}); "
                                 f"%runs lists them\n{usage}")
            return run
        run = current_run()
        if run is None:
            raise UsageError(f"no agent run in this kernel to hand off: start one with %agent TASK\n{usage}")
        return run

    @line_magic
    def handoff(self, line: str) -> None:
        """Hand the current (or RUN_ID) run and this kernel's state off to a Jupyter Server."""
        p = _ArgParser.for_server(HANDOFF_USAGE, run_id_optional=True)
        p.add_argument("--fork", action="store_true")
        p.add_argument("--dry-run", action="store_true")
        a = p.parse_args(_split(line, HANDOFF_USAGE))
        if a.dry_run:   # what would travel and how, before anything is sent (no run or server needed)
            from IPython.display import display

            from .snapshot.preflight import preflight
            display(preflight(self.shell))
            return
        run = self._resolve_run(a.run_id, HANDOFF_USAGE)
        from . import remote
        result = _call(remote.handoff, run, to=a.to, token=a.token, fork=a.fork, shell=self.shell)
        _show_remote_result(result)

    @line_magic
    def reattach(self, line: str) -> None:
        """Follow a remote run here (works in a new kernel); no RUN_ID lists the server's runs."""
        p = _ArgParser.for_server(REATTACH_USAGE, run_id_optional=True)
        a = p.parse_args(_split(line, REATTACH_USAGE))
        from . import remote
        result = _call(remote.reattach, a.run_id, to=a.to, token=a.token, display=False)
        _show_remote_result(result)

    @line_magic
    def pull(self, line: str) -> None:
        """Bring a remote run back: its variables, files, plan and conversation; then %agent continue."""
        p = _ArgParser.for_server(PULL_USAGE, run_id_optional=False)
        p.add_argument("--again", action="store_true")   # re-restore a run pulled here before
        p.add_argument("--trust", action="store_true",
                       help="also load what can run code on load (objects the remote run made)")
        a = p.parse_args(_split(line, PULL_USAGE))
        from . import remote
        result = _call(remote.pull, a.run_id, to=a.to, token=a.token, shell=self.shell, display=False,
                       again=a.again, trust=a.trust)
        report = getattr(result, "pull_report", None)
        _display(report)
        _show_remote_result(result)
