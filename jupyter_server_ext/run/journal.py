"""Journal: a run's event log, committed as the run goes.

Every event is committed to SQLite, and the run state with it, before the run goes on, so a
crash loses at most the step in flight. Two ordering rules are the journal's:

* a terminal status is committed only once ``result.ipynb`` shows it (the end is in the
  notebook before anyone is told), and it is the run's last event; a ``run_python`` call is
  in ``result.ipynb`` before its code runs (an open copy shows what the run is doing now);
* a question's checkpoint, taken before the question is announced, is announced right after it
  (the log reads ``question``, ``checkpoint``, ``status: waiting_input``).

Notifications are queued (outbox) for the statuses users are told about. The journal calls only
the store, the result notebook and the notifier; the manager and the agent loop call it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from handoff_magic.state import TERMINAL_STATUSES, Event, RunState

from ..notebook import ResultNotebook
from ..notify import Notifier
from ..store import RunStore
from .checkpoints import Taken

log = logging.getLogger(__name__)

NOTIFY_ON = frozenset({"completed", "failed", "cancelled", "waiting_input"})
NOTEBOOK_HINT = "the run goes on; its events are complete in the status page"

Outcome = Taken | str | None   # a checkpoint taken, why it failed, or nothing to take


class Journal:
    """The event log of one run (``state``); ``closed`` set: the server is going down, nothing
    more is committed (the store keeps the last committed step)."""

    def __init__(self, store: RunStore, state: RunState, *, notebook: ResultNotebook | None,
                 notifier: Notifier | None, model: Callable[[], str], closed: threading.Event) -> None:
        self.store = store
        self.state = state
        self.notebook = notebook
        self.notifier = notifier
        self.model = model
        self.closed = closed
        self.exec_count: int | None = None     # of the last run_python, for its tool_result
        self._after_question: Outcome = None

    # -- what callers use ------------------------------------------------------------------------
    def emit(self, type: str, **data: Any) -> Event:
        event = self.state.emit(type, **data)
        self.commit(event)
        return event

    def status(self, status: str, **data: Any) -> None:
        event = self.state.set_status(status, **data)
        if event is not None:
            self.commit(event)

    def on_loop_event(self, state: RunState, event: Event) -> None:
        """The agent loop's ``on_event``: the loop already appended the event to the state."""
        self.commit(event)

    def announce(self, outcome: Outcome, hint: str) -> None:
        """Announce a checkpoint now (``checkpoint`` event), or why it failed (``error``)."""
        if isinstance(outcome, Taken):
            self.emit("checkpoint", bytes_new=outcome.bytes_new, bytes_total=outcome.bytes_total)
        elif isinstance(outcome, str):
            self.emit("error", error=f"checkpoint failed: {outcome}", hint=hint)

    def announce_after_question(self, outcome: Outcome) -> None:
        """Hold the question's checkpoint until the question is committed."""
        self._after_question = outcome

    def write_notebook(self) -> None:
        """Rewrite result.ipynb now; a failure is reported in the log, never raised."""
        if self.notebook is None:
            return
        error = self.notebook.write(self.state, self.model())
        if error is not None:
            self.emit("error", error=error, hint=NOTEBOOK_HINT)

    # -- the commit ------------------------------------------------------------------------------
    def commit(self, event: Event) -> None:
        """Commit ``event`` (already in ``state.events``) and the state; the store numbers it."""
        if self.closed.is_set():
            return
        state = self.state
        if event.type == "tool_result" and event.data.get("name") == "run_python" and self.exec_count is not None:
            event.data["execution_count"] = self.exec_count
            self.exec_count = None
        if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES:
            self.write_notebook()  # the end is in result.ipynb before anyone is told
            if state.events and state.events[-1] is not event:  # an error about the notebook came after
                state.events.remove(event)
                event.seq = state.last_seq + 1
                state.events.append(event)
        stored = self.store.append_event(state.id, event.type, event.data)
        if stored.seq != event.seq:
            log.debug("jupyter-handoff: run %s event renumbered %d -> %d", state.id, event.seq, stored.seq)
            event.seq = stored.seq
        event.time = stored.time
        self.store.save_state(state)
        if event.type == "tool_call" and event.data.get("name") == "run_python":
            self.write_notebook()  # an open result.ipynb shows the code being run, not only steps done
        if event.type == "status" and event.data.get("status") in NOTIFY_ON and self.notifier is not None:
            try:
                self.notifier.enqueue(state.id, event.data["status"])
            except Exception:
                log.exception("jupyter-handoff: queueing a notification for %s failed", state.id)
        if event.type == "question" and self._after_question is not None:
            held, self._after_question = self._after_question, None
            self.announce(held, "the run goes on; a server restart now would redo the question's step")
