"""A run on a server as seen from a notebook: ``RemoteRun`` mirrors its state from the event log
(long-poll in a background thread) and drives the same RunWidget a local run uses.
"""
from __future__ import annotations

import html
import logging
import os
import threading
import time
import webbrowser
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import JourneyError
from ..state import TERMINAL_STATUSES, Event, PlanStep, RunState, StateError
from .http import ClientError, HandoffClient, UploadReport
from .views import DiffView, show, widget_message

log = logging.getLogger(__name__)

# statuses after which a remote run needs nothing more from anyone
REMOTE_DONE = frozenset(TERMINAL_STATUSES)


@dataclass
class RemoteRef:
    """Where a handed-off run lives now (``LocalRun.remote``)."""
    server_url: str
    run_id: str
    links: dict[str, str] = field(default_factory=dict)
    handed_off: float = field(default_factory=time.time)

    def notebook_url(self) -> str:
        """The run's result.ipynb in the server's JupyterLab: the server's own absolute link when it
        gave one (its public URL), else built from the URL this laptop reaches it by."""
        link = self.links.get("notebook") or self.links.get("lab")
        if link and link.startswith("http"):
            return link
        return f"{self.server_url.rstrip('/')}/lab/tree/handoff-runs/{self.run_id}/result.ipynb"


@dataclass
class HandoffTimings:
    """Seconds per phase and bytes/chunks sent by the handoff that created a RemoteRun (demo, benchmarks)."""
    pause: float = 0.0
    capture: float = 0.0
    upload: float = 0.0
    create: float = 0.0
    total: float = 0.0
    bytes_total: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0
    chunks_total: int = 0


def state_from_summary(summary: dict[str, Any], events: list[Event]) -> RunState:
    """A RunState mirror of a remote run, rebuilt from its summary and event log."""
    state = RunState(goal=str(summary.get("goal") or ""), id=str(summary["id"]))
    state.events = list(events)
    state.model = str(summary.get("model") or "")
    state.steps = int(summary.get("steps") or 0)
    for ev in events:
        _apply(state, ev)
    status = summary.get("status")
    if status:
        try:
            state.status = status
            state.__post_init__()
        except StateError:
            state.status = "running"
    state.question = summary.get("question") or state.question
    state.summary = summary.get("summary") or state.summary
    state.error = summary.get("error") or state.error
    if summary.get("plan"):
        state.plan = [PlanStep.from_dict(p) for p in summary["plan"]]
    return state


def _apply(state: RunState, ev: Event) -> None:
    """Fold one event into the mirror state (the server owns the truth)."""
    d = ev.data
    if ev.type == "status" and d.get("status"):
        try:
            RunState(goal="", status=d["status"])
            state.status = d["status"]
        except StateError:
            pass  # a status this client version does not know: keep the last known one
        if state.status != "waiting_input":
            state.question = None
    elif ev.type == "plan":
        state.plan = [PlanStep.from_dict(p) for p in d.get("steps") or []]
    elif ev.type == "question":
        state.question = d.get("question")
    elif ev.type == "finish":
        state.summary = d.get("summary")
    elif ev.type == "error":
        state.error = d.get("error")
    state.updated = ev.time


class RemoteRun:
    """A run on a server, as seen from a notebook: implements the widget's RunController."""

    def __init__(self, client: HandoffClient, run_id: str, *, widget: Any = None,
                 state: RunState | None = None, shell: Any = None,
                 pull: Callable[["RemoteRun"], Any] | None = None) -> None:
        """``pull``: what the Pull back button does (journey.pull into this view); None: no button."""
        self.client = client
        self.server_url = client.url
        self.run_id = run_id
        self.shell = shell
        self.state = state or RunState(goal="", id=run_id, status="queued")
        self.widget = widget
        self.links: dict[str, str] = {}
        self.last_seq = self.state.last_seq
        self.follow_error: str | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.on_event: Callable[[Event], None] | None = None
        self._pull = pull
        self.timings: HandoffTimings | None = None   # set by the handoff that created this run
        self.upload: UploadReport | None = None

    def __repr__(self) -> str:
        return f"<RemoteRun {self.run_id} on {self.server_url}: {self.state.status}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a RemoteRun holds a server connection and token and is never captured; "
                        f"reattach with %reattach {self.run_id}")

    @property
    def status(self) -> str:
        return self.state.status

    # -- following -----------------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        summary = self.client.get_run(self.run_id)
        self.links = summary.get("links") or self.links
        return summary

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """One long-poll: fetch events after the last seen one and feed them to the widget.
        Returns the events new to this view."""
        data = self.client.events(self.run_id, after=self.last_seq, timeout=timeout)
        events = [Event.from_dict(e) for e in data.get("events") or []]
        events = [ev for ev in events if ev.seq > self.last_seq]  # never show an event twice
        for ev in events:
            self.state.events.append(ev)
            _apply(self.state, ev)
            self.last_seq = ev.seq
            if self.widget is not None:
                self.widget.show_event(ev)
            if self.on_event:
                self.on_event(ev)
        status = data.get("status")
        if status and status != self.state.status and not events:
            self.state.status = status
        with self._changed:
            self._changed.notify_all()
        return events

    def follow(self) -> "RemoteRun":
        """Follow live in a daemon thread until the run ends (or stop())."""
        if self._thread and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._follow_loop, name=f"handoff-follow-{self.run_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def _follow_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                # once the run has ended only drain what is already committed (a reattach may
                # need several pages of events); stop at the first empty page
                done = self.state.status in REMOTE_DONE
                events = self.poll(timeout=0.0 if done else 20.0)
                failures = 0
                self.follow_error = None
            except ClientError as exc:
                failures += 1
                self.follow_error = str(exc)
                if failures == 1:
                    widget_message(self.widget, f"lost contact with the server, retrying: {exc}", "warn")
                self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            except Exception as exc:  # a malformed event or a display bug: say so, stop following
                log.exception("following run %s failed", self.run_id)
                self.follow_error = f"{type(exc).__name__}: {exc}"
                widget_message(self.widget, f"stopped following the run ({self.follow_error}); "
                                             f"%reattach {self.run_id} starts again", "error")
                break
            if self.state.status in REMOTE_DONE and not events:
                if self.widget is not None and hasattr(self.widget, "show_state"):
                    self._refresh_steps()
                    self.widget.show_state(self.state)
                break
        with self._changed:
            self._changed.notify_all()

    def _refresh_steps(self) -> None:
        """The server's step count (the events do not carry it) for the final view."""
        try:
            self.state.steps = int(self.refresh().get("steps") or self.state.steps)
        except ClientError as exc:   # the view keeps the count it has; following is over anyway
            log.info("could not refresh run %s: %s", self.run_id, exc)

    def stop(self) -> None:
        self._stop.set()

    def wait(self, statuses: set[str] | frozenset[str] = REMOTE_DONE | {"waiting_input"},
             timeout: float = 300.0) -> str:
        """Block until the run reaches one of ``statuses`` (polls itself if not following)."""
        deadline = time.monotonic() + timeout
        while self.state.status not in statuses:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run {self.run_id} is still {self.state.status} after {timeout:.0f}s")
            if self._thread and self._thread.is_alive():
                with self._changed:
                    self._changed.wait(min(left, 1.0))
            else:
                self.poll(timeout=min(left, 10.0))
        if self.state.status in REMOTE_DONE and not (self._thread and self._thread.is_alive()):
            while self.poll(timeout=0.0):  # events committed with the end that the last page left out
                pass
        return self.state.status

    # -- RunController -------------------------------------------------------------------
    def handoff(self) -> None:
        widget_message(self.widget, "this run already runs remotely", "info")

    def reattach(self) -> None:
        self.follow()

    def answer(self, text: str) -> None:
        self.client.answer(self.run_id, text)
        if not (self._thread and self._thread.is_alive()):
            self.follow()

    def cancel(self) -> None:
        self.client.cancel(self.run_id)

    def diff(self) -> DiffView:
        return DiffView(self.client.diff(self.run_id), self.run_id, self.server_url)

    def review_diff(self) -> None:
        show(self.diff())

    def notebook_url(self) -> str:
        return RemoteRef(self.server_url, self.run_id, self.links).notebook_url()

    def open_notebook(self) -> None:
        url = self.notebook_url()
        if self.widget is not None and hasattr(self.widget, "show_message"):
            self.widget.show_message("The run's notebook:", "info", link=url)
        else:
            self._show_link(url)
        if os.environ.get("DISPLAY") or os.environ.get("BROWSER"):
            webbrowser.open(url)

    @staticmethod
    def _show_link(url: str) -> None:
        try:
            from IPython.display import HTML
            show(HTML(f'<a href="{html.escape(url)}" target="_blank">Open the run\'s notebook: '
                          f'{html.escape(url)}</a>'))
        except ImportError:
            print(url)

    def pull_back(self) -> Any:
        """The Pull back button: the run comes into this kernel and this view shows it from then
        on as a local run (local status and buttons, the pull report in its action area)."""
        if self._pull is None:
            raise JourneyError(f"this view cannot pull run {self.run_id} back", f"run %pull {self.run_id}")
        following = bool(self._thread and self._thread.is_alive())
        self.stop()   # the remote's own "pulled" status must not land on the view after the switch
        try:
            local = self._pull(self)
        except Exception:
            if following:
                self.follow()
            raise
        self.widget = None   # this RemoteRun no longer drives any view
        return local


# -- following from a terminal (the CLI and the MCP server) ---------------------------------
STOP_STATUSES = REMOTE_DONE | {"waiting_input"}   # where `follow` stops: nothing happens by itself


def follow(client: HandoffClient, run_id: str, on_event: Callable[[Event], None], *, after: int = 0,
           deadline: float | None = None, poll_seconds: float = 25.0,
           until: frozenset[str] = STOP_STATUSES) -> RemoteRun:
    """Feed the run's events after ``after`` to ``on_event`` as the server commits them, until
    the run reaches a status in ``until`` (default: it ends or waits for input) or ``deadline``
    (a ``time.monotonic()`` value) passes.
    Returns the RemoteRun mirror: its ``status``, ``state.question`` and ``last_seq``."""
    summary = client.get_run(run_id)
    remote = RemoteRun(client, run_id, state=state_from_summary(summary, []))
    remote.links = summary.get("links") or {}
    remote.last_seq = max(0, after)
    remote.on_event = on_event
    while True:
        settled = remote.status in until
        wait = 0.0 if settled else poll_seconds
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        events = remote.poll(timeout=wait)
        if not events and (remote.status in until
                           or (deadline is not None and time.monotonic() >= deadline)):
            return remote


def cancel(client: HandoffClient, run_id: str, wait: float = 60.0) -> str:
    """Cancel the run and wait (up to ``wait`` s) until the server shows it ended; its status."""
    run = client.cancel(run_id)
    status = str(run.get("status") or "")
    if status in REMOTE_DONE:
        return status
    return follow(client, run_id, lambda ev: None, after=int(run.get("last_seq") or 0),
                  deadline=time.monotonic() + wait, until=REMOTE_DONE).status
