"""RunWidget: a live view of one agent run (local or remote) built from stock ipywidgets.

No custom front-end JS: the header, plan, step log and messages are ``ipywidgets.HTML`` with a
scoped stylesheet (``jh-`` classes, JupyterLab theme variables), the actions are plain Buttons.
The widget only *shows* a run and forwards clicks to a ``RunController``; it never touches the
agent, the network or any secret. Updates may come from a background thread: every update takes
the widget's lock and is batched with ``hold_sync``; all child widgets are created up front, in
the thread that builds the RunWidget. What it shows is computed by render.py (pure functions);
this module is the widget itself (over 400 lines: one class whose updates must all take its lock).
"""
from __future__ import annotations

import json
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Protocol, runtime_checkable

import ipywidgets as W

from ..errors import HandoffError
from ..sanitize import safe_output
from ..snapshot.reports import fmt_bytes
from ..state import STATUS_LABELS, TERMINAL_STATUSES, Event, RunState
from .render import (OUTPUT_TYPES, PLAN_ICONS, esc, pulled_back, render_header_html, render_log_html,
                     render_message_html, render_plan_html, render_text, short, view_from_state)

log = logging.getLogger(__name__)

__all__ = ["RunController", "RunWidget", "button_states", "STATUS_LABELS", "PLAN_ICONS"]

MAX_OUTPUTS = 30
MAX_OUTPUT_BYTES = 4_000_000


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




























# -- the widget --------------------------------------------------------------------------------

class RunWidget(W.VBox):
    """Live view of one run. Build it on the main thread; update it from any thread."""

    def __init__(self, state: RunState, controller: RunController | None = None, **kwargs: Any) -> None:
        self.controller = controller
        self._lock = threading.RLock()
        self._state = state
        self._view = view_from_state(state)

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
            self._view = view_from_state(state)
            self._view.progress = keep_progress
            if keep_remote is not None and not pulled_back(state) and (
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
        keep = [safe_output(o) for o in outputs if isinstance(o, dict) and o.get("output_type") in OUTPUT_TYPES]
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
            self._question.value = (f'<div class="jh-question">The agent asks: {esc(v.question or "")}</div>'
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
        text = f"{esc(label)}: {fmt_bytes(done)}"
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
                self.show_message(f"{label} failed unexpectedly ({type(exc).__name__}: {short(str(exc), 300)}). "
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
