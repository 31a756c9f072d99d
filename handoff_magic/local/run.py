"""Local agent runs: one LocalRun per ``%agent`` task in this kernel.

A LocalRun ties a RunState to the AgentLoop (with an InProcessExecutor on this kernel's shell),
the provider and the RunWidget, and decides *where* the loop runs: in the cell (foreground,
Ctrl-C / kernel interrupt pauses it at a step boundary) or in a daemon thread (background,
the notebook stays usable, a pause request takes effect at the next step boundary).
The provider holds the model key; the RunState and the widget only ever see the spec name.

The remote buttons of a local run (hand off, reattach, diff, pull back) go through a
``RemoteSide`` this module never imports: ``handoff_magic.remote.journey_side()`` plugs the
journey in with ``use_remote`` (``%load_ext handoff_magic`` calls it, and so does the first use
of ``handoff_magic.remote.handoff``/``pull``...), so the dependency runs one way, remote -> local.

(Over 400 lines for one class: LocalRun's foreground/background/pause/cancel lifecycle and its
thread handling only make sense read together.)
"""
from __future__ import annotations

import html
import logging
import os
import platform
import socket
import threading
from importlib import metadata
from typing import Any, Protocol

from ..errors import RunError
from ..state import TERMINAL_STATUSES, Budgets, Event, Origin, RunState
from .shell import current_parent, get_shell, pin_outputs, renders_widgets
from .widget import STATUS_LABELS, RunWidget

log = logging.getLogger(__name__)

__all__ = ["LocalRun", "RunError", "RUNS", "current_run", "register_run", "RunTable", "RemoteSide", "use_remote"]

RUNS: dict[str, "LocalRun"] = {}
_current_id: str | None = None
_registry_lock = threading.Lock()

# statuses from which the loop can be (re)started
RESUMABLE = frozenset({"idle", "paused", "waiting_input", "failed"})


def current_run() -> "LocalRun | None":
    """The run ``%agent continue`` / ``%handoff`` act on: the most recently started or pulled one."""
    with _registry_lock:
        if _current_id is not None and _current_id in RUNS:
            return RUNS[_current_id]
        return next(reversed(RUNS.values()), None) if RUNS else None


class RemoteSide(Protocol):
    """What the remote side does for a local run (``handoff_magic.remote.journey`` is one)."""

    def handoff(self, run: "LocalRun") -> Any: ...
    def reattach(self, run_id: str | None = None, *, to: str | None = None) -> Any: ...
    def review_diff(self, run_id: str, *, to: str | None = None) -> Any: ...
    def pull(self, run_id: str, *, to: str | None = None, shell: Any = None) -> Any: ...


_remote: RemoteSide | None = None


def use_remote(side: RemoteSide) -> None:
    """Plug in the remote side (``handoff_magic.remote.journey_side()`` does, when the extension loads)."""
    global _remote
    _remote = side


def _remote_side() -> RemoteSide:
    if _remote is None:
        raise RunError("remote actions are not loaded in this kernel",
                       "run %load_ext handoff_magic (or call handoff_magic.remote.journey_side()) first")
    return _remote


def register_run(run: "LocalRun") -> None:
    """Add ``run`` to this kernel's runs and make it the current one (new, pulled back, taken back)."""
    global _current_id
    with _registry_lock:
        RUNS[run.state.id] = run
        _current_id = run.state.id


def _origin(shell: Any) -> Origin:
    """Where the run started (shown on the server); no environment values, no secrets."""
    notebook = os.environ.get("JPY_SESSION_NAME", "")
    if not notebook and shell is not None:
        notebook = str(getattr(shell, "user_ns", {}).get("__vsc_ipynb_file__", "") or "")
    packages = {}
    for dist in ("jupyter-handoff", "ipykernel", "numpy", "pandas"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return Origin(host=socket.gethostname(), notebook_path=notebook,
                  python=platform.python_version(), packages=packages)


class LocalRun:
    """One agent run in this kernel; also the RunWidget's controller while it is local."""

    def __init__(self, state: RunState, shell: Any = None, *, provider: Any = None,
                 executor: Any = None, widget: RunWidget | None = None, register: bool = True) -> None:
        self.shell = shell if shell is not None else get_shell()
        self._state = state
        self.remote: Any = None            # a remote.follow.RemoteRef once handed off
        self.pull_report: Any = None       # set by the pull back that brought this run here
        self.provider = provider           # built from state.model on first use
        self.executor = executor           # InProcessExecutor(shell) on first use
        self._loop: Any = None
        self._thread: threading.Thread | None = None
        # set while no background loop runs. Waiting on it, never Thread.join: a kernel interrupt
        # inside join() marks a live thread as stopped in CPython < 3.12 and the run's step breaks
        self._idle = threading.Event()
        self._idle.set()
        self._pause = threading.Event()
        self._cancel_requested = False
        self._run_lock = threading.Lock()  # one loop at a time per run
        self.widget = widget if widget is not None else RunWidget(state, controller=self)
        # terminal IPython shows no widgets: narrate the run as text lines instead
        self.narrate = not renders_widgets(shell)
        if register:
            register_run(self)

    @classmethod
    def new(cls, goal: str, *, shell: Any = None, model: str | None = None,
            max_steps: int | None = None, max_seconds: float | None = None,
            max_tokens: int | None = None, max_cost: float | None = None,
            provider: Any = None) -> "LocalRun":
        """A fresh run for ``goal``. The provider is built now, so a missing key or a bad model
        spec fails here, before anything is displayed or executed."""
        if not goal or not goal.strip():
            raise RunError("the task is empty: write what the agent should do, e.g. %agent clean sales.csv")
        if model is None:
            from ..config import resolve_model_spec
            model = resolve_model_spec(None)
        if provider is None:
            from ..agent.providers import make_provider
            provider = make_provider(model)
        budgets = Budgets()
        if max_steps is not None:
            budgets.max_steps = int(max_steps)
        if max_seconds is not None:
            budgets.max_seconds = float(max_seconds)
        budgets.max_tokens, budgets.max_cost = max_tokens, max_cost
        spec = getattr(provider, "spec", None) or model
        if max_cost is not None:
            from ..agent.pricing import price_for
            if price_for(spec) is None:
                raise RunError(f"--max-cost needs the price of {spec}, which jupyter-handoff does not know",
                               'add it to HANDOFF_PRICES, e.g. {"MODEL": {"input": 2.5, "output": 10}} '
                               "(USD per million tokens), or use --max-tokens")
        state = RunState(goal=goal.strip(), model=spec, budgets=budgets, origin=_origin(shell))
        return cls(state, shell, provider=provider)

    # -- state ------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._state

    @state.setter
    def state(self, value: RunState) -> None:
        """Replaced by a pull back: the next continue_ builds a loop over the new state."""
        if self.running:
            raise RunError(f"run {self._state.id} is running; pause it before replacing its state")
        global _current_id
        self._state = value
        self._loop = None
        with _registry_lock:
            RUNS[value.id] = self
            _current_id = value.id

    @property
    def id(self) -> str:
        return self._state.id

    @property
    def status(self) -> str:
        return self._state.status

    @property
    def running(self) -> bool:
        """True while the loop runs in a background thread (foreground runs block the cell)."""
        return not self._idle.is_set()

    def use_model(self, spec: str, provider: Any = None) -> None:
        """Switch the model for the next steps (e.g. a pulled-back run without the server's key)."""
        if provider is None:
            from ..agent.providers import make_provider
            provider = make_provider(spec)
        self.provider = provider
        self._state.model = getattr(provider, "spec", None) or spec
        self._loop = None

    # -- running ----------------------------------------------------------------------------
    def start(self, background: bool = False) -> None:
        """Run the loop from the beginning (status idle)."""
        if self._state.status != "idle":
            raise RunError(f"run {self.id} was already started ({self.status}); use %agent continue")
        self._launch(None, background)

    def continue_(self, answer: str | None = None, background: bool = False) -> None:
        """Resume a paused run, answer a waiting one, retry a failed one, or follow up a completed one."""
        self.check_continue(answer)
        register_run(self)   # the run you just resumed is the one %agent continue / %handoff act on
        self._launch(answer.strip() if answer else None, background)

    def check_continue(self, answer: str | None = None) -> None:
        """Raise RunError (saying what to do instead) if continue_(answer) cannot run now."""
        s = self._state
        if self.running:
            raise RunError(f"run {s.id} is already running in the background; "
                           "pause it (Pause button or %agent pause) before continuing")
        if s.status == "handed_off":
            where = f" to {self.remote.server_url} as {self.remote.run_id}" if self.remote is not None else ""
            rid = self.remote.run_id if self.remote is not None else "ID"
            raise RunError(f"run {s.id} was handed off{where}: follow it with %reattach {rid} "
                           f"or bring it back with %pull {rid}")
        if s.status == "completed" and answer and answer.strip():
            pass  # follow-up instructions: the loop goes on from the finished conversation
        elif s.status == "completed":
            raise RunError(f"run {s.id} is completed; give follow-up instructions with "
                           '%agent continue "what to do next", or start a new run with %agent TASK')
        elif s.status in TERMINAL_STATUSES:
            raise RunError(f"run {s.id} is {STATUS_LABELS.get(s.status, s.status)}; "
                           "start a new one with %agent TASK")
        elif s.status not in RESUMABLE and s.status != "running":
            raise RunError(f"run {s.id} is {s.status} and cannot be continued here")
        refused = bool(s.messages) and s.messages[-1].refusal   # a bare continue asks again
        if s.status == "waiting_input" and not (answer and answer.strip()) and not refused:
            raise RunError(f'the agent is waiting for your answer to: {s.question or "(no question)"}\n'
                           'answer with %agent continue "your answer"')

    def _launch(self, answer: str | None, background: bool) -> None:
        self._pause.clear()
        self._cancel_requested = False
        loop = self._ensure_loop()
        parent = current_parent(self.shell)
        # a background run's outputs go to the request that launched it: a cell shows them under
        # itself, but a widget click (comm message) has no output area, so the widget mirrors them
        self.widget.pausable = background
        self.widget.mirror_outputs = background and (
            parent is None or parent.get("header", {}).get("msg_type") != "execute_request")
        if background:
            t = threading.Thread(target=self._run_in_thread, args=(loop, answer, parent),
                                 name=f"handoff-agent-{self.id}", daemon=True)
            self._thread = t
            self._idle.clear()
            t.start()
        else:
            self._run_loop(loop, answer, False)

    def _ensure_loop(self) -> Any:
        if self._loop is not None and getattr(self._loop, "state", self._state) is self._state:
            return self._loop
        from ..agent.loop import AgentLoop
        if self.provider is None:
            from ..agent.providers import make_provider
            self.provider = make_provider(self._state.model or _default_spec())
        if self.executor is None:
            from ..agent.executors import InProcessExecutor
            self.executor = InProcessExecutor(self.shell)
        self._loop = AgentLoop(self._state, self.provider, self.executor,
                               on_event=self._on_event, should_pause=self._pause.is_set)
        return self._loop

    def _run_in_thread(self, loop: Any, answer: str | None, parent: dict[str, Any] | None) -> None:
        """Background body: this thread's outputs carry the launching request as parent, so
        they never show up under whatever cell the user happens to run next."""
        tokens = pin_outputs(self.shell, parent)
        try:
            self._run_loop(loop, answer, True)
        finally:
            for obj, token in tokens:
                try:
                    obj.reset_thread_parent(token)
                except (ValueError, RuntimeError) as exc:  # a token from another context
                    log.debug("could not reset the output parent of %r: %s", obj, exc)
            self._idle.set()

    def _run_loop(self, loop: Any, answer: str | None, background: bool) -> None:
        if not self._run_lock.acquire(blocking=False):
            raise RunError(f"run {self.id} is already running")
        try:
            loop.run(answer=answer)
        except KeyboardInterrupt:
            # an interrupt that landed between the loop's own guards: the step boundary is here
            if self._state.status == "running":
                self._emit_status("paused", reason="interrupted by the user; %agent continue resumes")
        except BaseException as exc:
            # a bug or an unexpected failure outside the loop's own error handling
            self._state.error = (f"the agent loop stopped with {type(exc).__name__}: {exc}. "
                                 "The plan and messages are kept: %agent continue retries.")
            self._emit_status("failed", reason=self._state.error)
            if background:
                log.exception("agent run %s failed in the background", self.id)
                return
            raise
        finally:
            if self._cancel_requested and self._state.status not in TERMINAL_STATUSES:
                self._emit_status("cancelled", reason="cancelled by the user")
            self._cancel_requested = False
            self._pause.clear()
            self._run_lock.release()

    def _emit_status(self, status: str, **data: Any) -> None:
        ev = self._state.set_status(status, **data)
        if ev is not None:
            self._on_event(self._state, ev)

    def _on_event(self, state: RunState, event: Event) -> None:
        if state is not self._state:
            return  # an event of a state this run no longer shows (replaced by a pull)
        try:
            self.widget.show_event(event)
            if self.narrate:
                line = narrate(event)
                if line:
                    print(line, flush=True)
        except Exception:  # the display must never stop the agent; the failure is logged
            log.exception("RunWidget could not show event %s of run %s", event.type, state.id)

    @property
    def pause_requested(self) -> bool:
        """True from a pause request (Pause button, %handoff) until the loop stops at the step
        boundary: what a long step may poll to end early, and what "pausing…" means."""
        return self.running and self._pause.is_set()

    def request_pause(self) -> None:
        """Pause at the next step boundary (the running step finishes first)."""
        if self.running:
            self._pause.set()
            self.widget.show_message("Pausing at the next step boundary…", "info")

    def pause(self) -> None:
        self.request_pause()

    def cancel_pause(self) -> bool:
        """Withdraw a pause request the running step has not reached yet (a cancelled handoff);
        True if the run goes on as if it had never been asked."""
        if self.running and self._pause.is_set() and not self._cancel_requested:
            self._pause.clear()
            self.widget.show_message("", "info")
            return True
        return False

    def wait_paused(self, timeout: float) -> bool:
        """Wait until the loop has stopped (paused, waiting, finished); False on timeout."""
        if self._thread is not None:
            return self._idle.wait(timeout)
        return self._state.status != "running"

    # -- RunController (what the widget's buttons call) --------------------------------------
    def answer(self, text: str) -> None:
        """The widget's Send button: resume in the background so the kernel stays responsive."""
        self.continue_(text, background=True)

    def resume(self) -> None:
        """The widget's Continue button: resume a paused (or retry a failed) run in the background."""
        self.continue_(background=True)

    def cancel(self) -> None:
        if self.remote is not None:
            self._remote_run().cancel()
            return
        if self.running:
            self._cancel_requested = True
            self._pause.set()
            self.widget.show_message("Cancelling at the next step boundary…", "warn")
        elif self._state.status not in TERMINAL_STATUSES and self._state.status != "handed_off":
            self._emit_status("cancelled", reason="cancelled by the user")

    def handoff(self) -> Any:
        return _remote_side().handoff(self)

    def _require_remote(self) -> Any:
        if self.remote is None:
            raise RunError(f"run {self.id} runs here, not on a server: Hand off first (%handoff)")
        return self.remote

    def _remote_run(self) -> Any:
        """The RemoteRun following our handed-off run (the widget's controller after a handoff)."""
        controller = getattr(self.widget, "controller", None)
        if controller is not None and controller is not self and hasattr(controller, "cancel"):
            return controller
        return self.reattach()

    def reattach(self) -> Any:
        ref = self._require_remote()
        return _remote_side().reattach(ref.run_id, to=ref.server_url)

    def review_diff(self) -> None:
        ref = self._require_remote()
        from IPython.display import display
        display(_remote_side().review_diff(ref.run_id, to=ref.server_url))

    def pull_back(self) -> Any:
        ref = self._require_remote()
        return _remote_side().pull(ref.run_id, to=ref.server_url, shell=self.shell)

    def open_notebook(self) -> None:
        self.widget.show_message("The run's notebook:", "info", link=self._require_remote().notebook_url())

    # -- display ----------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return self.widget._repr_mimebundle_(**kwargs)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self) if cycle else self.widget.to_text())

    def __repr__(self) -> str:
        return f"<LocalRun {self.id} {self.status}: {self._state.goal[:60]!r}>"

    def where(self) -> str:
        if self.remote is not None:
            return f"remote {getattr(self.remote, 'server_url', '?')} ({getattr(self.remote, 'run_id', '?')})"
        return "local"








def narrate(event: Event) -> str | None:
    """One short text line for an event, for front ends without widgets."""
    d = event.data or {}
    t = event.type
    if t == "status":
        reason = f": {d['reason']}" if d.get("reason") else ""
        return f"[agent] {STATUS_LABELS.get(str(d.get('status')), d.get('status'))}{reason}"
    if t == "plan":
        icons = {"pending": "○", "active": "◐", "done": "✓", "failed": "✗"}
        return "[agent] plan: " + " · ".join(f"{icons.get(str(s.get('status')), '○')} {s.get('text', '')}"
                                            for s in d.get("steps") or [] if isinstance(s, dict))
    if t == "assistant" and d.get("text"):
        first = str(d["text"]).strip().splitlines()[0] if str(d["text"]).strip() else ""
        return f"[agent] {first[:200]}" if first else None
    if t == "tool_call" and d.get("name") == "run_python":
        code = str((d.get("arguments") or {}).get("code", ""))
        n = len(code.splitlines())
        return f"[agent] running {n} line{'s' if n != 1 else ''} of code"
    if t == "question":
        return f'[agent] asks: {d.get("question", "")}\n        answer with %agent continue "your answer"'
    if t == "finish":
        return f"[agent] done: {d.get('summary', '')}"
    if t == "error":
        return f"[agent] error: {d.get('error', '')}" + (f" ({d['hint']})" if d.get("hint") else "")
    return None


def _default_spec() -> str:
    from ..config import resolve_model_spec
    return resolve_model_spec(None)


class RunTable:
    """``%runs``: the runs in this kernel, as an HTML table in notebooks and text elsewhere."""

    HEAD = ("id", "goal", "status", "steps", "usage", "where")

    def __init__(self, runs: list[LocalRun]) -> None:
        self.rows = [(r.id, " ".join(r.state.goal.split())[:60], r.status, str(r.state.steps),
                      r.state.usage.describe() or "-", r.where()) for r in runs]
        cur = current_run()
        self.current = cur.id if cur is not None else None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        if not self.rows:
            return "No agent runs in this kernel yet: start one with %agent TASK"
        rows = [self.HEAD] + self.rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEAD))]
        lines = []
        for r in rows:
            mark = "*" if r[0] == self.current else " "
            lines.append(mark + " " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return "\n".join(lines) + "\n(* = current run: %agent continue and %handoff act on it)"

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>No agent runs in this kernel yet: start one with <code>%agent TASK</code>.</p>"
        head = "".join(f"<th style='text-align:left'>{h}</th>" for h in self.HEAD)
        body = []
        for r in self.rows:
            cells = "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in r)
            style = " style='font-weight:600'" if r[0] == self.current else ""
            body.append(f"<tr{style}>{cells}</tr>")
        return (f"<table class='jh-runs'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
                "<p style='font-size:11px'>Bold: the current run (<code>%agent continue</code> and "
                "<code>%handoff</code> act on it).</p>")
