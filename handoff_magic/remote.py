"""The client side of the journey: hand a run off, reattach to it, review its diff, pull it back.

``handoff`` snapshots the kernel into a per-kernel bundle cache (so a second handoff writes and
uploads only changed chunks), uploads what the server lacks and creates the remote run; after it
returns, the server needs nothing more from this kernel. ``RemoteRun`` follows a remote run's
events in a background thread and drives the same RunWidget a local run uses.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import html
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import webbrowser
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_write_bytes
from .chunks import CHUNKS, ChunkStore
from .client import ClientError, HandoffClient, UploadReport
from .diff import render_diff_html
from .errors import HandoffError as HandoffError  # re-exported: callers catch remote.HandoffError
from .errors import JourneyError
from .manifest import write_manifest
from .snapshot.reports import fmt_bytes
from .state import STATUS_LABELS, TERMINAL_STATUSES, Budgets, Event, PlanStep, RunState, StateError

log = logging.getLogger(__name__)

# statuses after which a remote run needs nothing more from anyone
REMOTE_DONE = frozenset(TERMINAL_STATUSES)
PAUSE_TIMEOUT = 120.0


@dataclass
class RemoteRef:
    """Where a handed-off run lives now (``LocalRun.remote``)."""
    server_url: str
    run_id: str
    links: dict[str, str] = field(default_factory=dict)
    handed_off: float = field(default_factory=time.time)


# -- local bundle cache -----------------------------------------------------------------------
def cache_root() -> Path:
    """~/.cache/jupyter-handoff (XDG_CACHE_HOME respected), else a temp dir."""
    base = os.environ.get("HANDOFF_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    root = Path(xdg) / "jupyter-handoff"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "jupyter-handoff"


def kernel_key(fallback: str) -> str:
    """This kernel's id (from its connection file) so each kernel reuses one bundle cache."""
    try:
        from ipykernel import get_connection_file
        name = Path(get_connection_file()).stem          # kernel-<id>
        return name.removeprefix("kernel-") or fallback
    except (ImportError, RuntimeError, AttributeError):  # not inside an ipykernel
        return fallback


def bundle_cache(key: str) -> Path:
    path = cache_root() / "bundles" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(server_url: str, run_id: str) -> Path:
    server = hashlib.sha256(server_url.encode()).hexdigest()[:12]
    return cache_root() / "handoffs" / f"{server}-{run_id}.json"


def save_record(server_url: str, run_id: str, record: dict[str, Any]) -> None:
    """What pull needs from the handoff moment: file hashes (conflict detection) and the cache dir."""
    atomic_write_bytes(_record_path(server_url, run_id), json.dumps(record).encode())


def load_record(server_url: str, run_id: str) -> dict[str, Any] | None:
    path = _record_path(server_url, run_id)
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JourneyError(f"the handoff record {path} is unreadable ({exc}): delete it and "
                           "run %pull again (local files will then be kept, remote ones saved as .remote)") from exc


# -- display helpers --------------------------------------------------------------------------
def _display(obj: Any) -> None:
    try:
        from IPython.display import display
    except ImportError:
        print(obj)
        return
    display(obj)


def _widget_message(widget: Any, text: str, level: str = "info") -> None:
    if widget is not None and hasattr(widget, "show_message"):
        widget.show_message(text, level)


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
        return [(r.get("id", ""), r.get("status", ""), str(r.get("steps", "")),
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


# -- remote run ------------------------------------------------------------------------------
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
                 state: RunState | None = None, shell: Any = None) -> None:
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
                    _widget_message(self.widget, f"lost contact with the server, retrying: {exc}", "warn")
                self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            except Exception as exc:  # a malformed event or a display bug: say so, stop following
                log.exception("following run %s failed", self.run_id)
                self.follow_error = f"{type(exc).__name__}: {exc}"
                _widget_message(self.widget, f"stopped following the run ({self.follow_error}); "
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
        _widget_message(self.widget, "this run already runs remotely", "info")

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
        _display(self.diff())

    def notebook_url(self) -> str:
        link = self.links.get("notebook") or self.links.get("lab")
        if link and link.startswith("http"):
            return link
        return f"{self.server_url}/lab/tree/handoff-runs/{self.run_id}/result.ipynb"

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
            _display(HTML(f'<a href="{html.escape(url)}" target="_blank">Open the run\'s notebook: '
                          f'{html.escape(url)}</a>'))
        except ImportError:
            print(url)

    def pull_back(self) -> Any:
        """The Pull back button: the run comes into this kernel and this view shows it from then
        on as a local run (local status and buttons, the pull report in its action area)."""
        view = self.widget
        following = bool(self._thread and self._thread.is_alive())
        self.stop()   # the remote's own "pulled" status must not land on the view after the switch
        try:
            local = pull(self.run_id, client=self.client, shell=self.shell, widget=view)
        except Exception:
            if following:
                self.follow()
            raise
        self.widget = None   # this RemoteRun no longer drives any view
        return local


# -- handoff ---------------------------------------------------------------------------------
_CLIENTS: dict[tuple[str, str | None], HandoffClient] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(to: str | None, token: str | None, client: HandoffClient | None) -> HandoffClient:
    """One pooled HandoffClient per (server, token) in this kernel: connections and the
    client's setup (~50 ms) are reused by later handoffs and the follow threads."""
    if client is not None:
        return client
    from .config import ConfigError, server_settings
    try:
        url, tok = server_settings(to, token)
    except ConfigError as exc:
        raise JourneyError(str(exc)) from exc
    with _CLIENTS_LOCK:
        cached = _CLIENTS.get((url, tok))
        if cached is None:
            try:
                cached = _CLIENTS[(url, tok)] = HandoffClient(url, tok)
            except ClientError as exc:
                raise JourneyError(str(exc)) from exc
        return cached


def _progress_done(widget: Any) -> None:
    """Hide the bar once the transfer it measured is over (it must not linger for the whole run)."""
    if widget is not None and hasattr(widget, "set_progress"):
        widget.set_progress("", 0, 0)


def _progress(widget: Any, label: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if widget is not None and hasattr(widget, "set_progress"):
            widget.set_progress(label, done, total)
    return report


@dataclass
class HandoffTimings:
    pause: float = 0.0
    capture: float = 0.0
    upload: float = 0.0
    create: float = 0.0
    total: float = 0.0
    bytes_total: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0
    chunks_total: int = 0


def handoff(run: Any, *, to: str | None = None, token: str | None = None, fork: bool = False,
            client: HandoffClient | None = None, shell: Any = None) -> RemoteRun:
    """Hand ``run`` (a LocalRun) to a server; returns a RemoteRun that follows it.

    On any failure the local run is left as it was (paused at a step boundary if it was running)
    and the error says what to do. The run's Hand off button stays disabled meanwhile (pausing
    can take a whole step), whether the button or %handoff started it.
    """
    widget = getattr(run, "widget", None)
    busy = getattr(widget, "busy", None)
    created: list[bool] = []   # set once the server holds the run: from then on it is not undone
    with busy("handoff") if busy is not None else contextlib.nullcontext():
        try:
            return _handoff(run, to=to, token=token, fork=fork, client=client, shell=shell, created=created)
        except KeyboardInterrupt:
            # a kernel interrupt while pausing, capturing or uploading cancels the handoff only:
            # a pause request the running step has not reached yet is withdrawn, so a background
            # step finishes as if nothing happened
            if created:
                raise
            cancel_pause = getattr(run, "cancel_pause", None)
            resumed = cancel_pause() if callable(cancel_pause) else False
            _widget_message(widget, "handoff cancelled, your run is unchanged", "warn")
            paused = not resumed and run.state.status == "paused"
            raise JourneyError("handoff cancelled, your run is unchanged" +
                               (" (it had reached a step boundary and is paused: %agent continue resumes it)"
                                if paused else "")) from None


def _handoff(run: Any, *, to: str | None, token: str | None, fork: bool,
             client: HandoffClient | None, shell: Any, created: list[bool]) -> RemoteRun:
    t0 = time.perf_counter()
    timings = HandoffTimings()
    cl = _client(to, token, client)
    widget = getattr(run, "widget", None)
    state: RunState = run.state
    if state.status == "handed_off" and getattr(run, "remote", None) is not None and not fork:
        raise JourneyError(f"run {state.id} was already handed off to {run.remote.server_url} as "
                           f"{run.remote.run_id}: %reattach {run.remote.run_id} follows it")
    if state.is_terminal:
        raise JourneyError(f"run {state.id} is {state.status}; start a new one with %agent TASK")
    paused_here = False
    if state.status == "running" or getattr(run, "running", False):
        _widget_message(widget, "pausing the run at the next step boundary...")
        run.request_pause()
        paused_here = True
        if not run.wait_paused(PAUSE_TIMEOUT):
            raise JourneyError(f"run {state.id} did not reach a step boundary within {PAUSE_TIMEOUT:.0f}s: "
                               "interrupt the kernel and run %handoff again")
    timings.pause = time.perf_counter() - t0
    intact = ("The local run is unchanged" + (" (paused at a step boundary: %agent continue resumes "
                                              "it here)." if paused_here else "."))

    try:
        cl.check()   # a dead server or a wrong token fails now, before capturing anything
    except ClientError as exc:
        raise JourneyError(f"handoff failed: {exc}. {intact}") from exc

    if shell is None:
        shell = _get_shell()
    key = kernel_key(state.id)
    bundle_dir = bundle_cache(key)
    sent_state = RunState.from_dict(copy.deepcopy(state.to_dict()))
    if sent_state.status not in ("paused", "waiting_input"):
        sent_state.set_status("paused", reason="handoff")
    # budgets count per run() call; a small local allowance (%agent --max-steps 2) is not meant
    # to stop the remote run, so the remote gets at least the default allowance
    sent_state.budgets.max_steps = max(sent_state.budgets.max_steps, Budgets().max_steps)

    t = time.perf_counter()
    from . import save_state
    try:
        report = save_state(bundle_dir, shell, run=sent_state)
    except Exception as exc:
        raise JourneyError(f"capturing the kernel state failed ({type(exc).__name__}: {exc}); "
                           f"nothing was sent. {intact}") from exc
    manifest = report.manifest
    timings.capture = time.perf_counter() - t
    left_out = [f["path"] for f in getattr(report, "skipped_files", None) or []]
    # said before the upload starts: a 2 GB handoff should not be a surprise
    _widget_message(widget, f"captured {len(manifest.get('variables') or [])} variables, "
                            f"{len(manifest.get('files') or [])} files: "
                            f"{fmt_bytes(getattr(report, 'bytes_total', 0))} to hand off (only what the "
                            "server lacks is sent)"
                            + (f"; left out: {', '.join(left_out[:5])}" + (" ..." if len(left_out) > 5 else "")
                               if left_out else ""))

    # create first: if the server already has every chunk (or refuses the bundle as too large)
    # we know without uploading a byte; a 400 listing missing chunks means: upload, then create
    key = uuid.uuid4().hex
    chunks = manifest.get("chunks") or {}
    up = UploadReport(chunks_total=len(chunks),
                      bytes_total=sum(int((m or {}).get("stored") or 0) for m in chunks.values()))
    t = time.perf_counter()
    try:
        try:
            summary = cl.create_run(manifest, idempotency_key=key)
        except ClientError as exc:
            if exc.status != 400 or not isinstance(exc.body.get("missing"), list):
                raise
            timings.create = time.perf_counter() - t
            t = time.perf_counter()
            try:
                up = cl.upload_bundle(bundle_dir, progress=_progress(widget, "upload"), manifest=manifest)
            finally:
                _progress_done(widget)
            timings.upload = time.perf_counter() - t
            t = time.perf_counter()
            summary = cl.create_run(manifest, idempotency_key=key)
    except ClientError as exc:
        _widget_message(widget, f"handoff failed: {exc}", "error")
        raise JourneyError(f"handoff failed: {exc}. {intact}") from exc
    created.append(True)
    timings.create += time.perf_counter() - t
    timings.bytes_total, timings.bytes_sent = up.bytes_total, up.bytes_sent
    timings.chunks_total, timings.chunks_sent = up.chunks_total, up.chunks_sent
    remote_id = str(summary["id"])
    links = summary.get("links") or {}
    try:
        save_record(cl.url, remote_id, {
            "server": cl.url, "run_id": remote_id, "local_run_id": state.id, "bundle_dir": str(bundle_dir),
            "root": os.getcwd(), "time": time.time(),
            "files": {f["path"]: f.get("sha256") for f in manifest.get("files") or []},
        })
    except OSError as exc:  # the run exists remotely now; only pull's conflict check gets stricter
        _widget_message(widget, f"could not record the handoff locally ({exc}); a later %pull will keep "
                                "every existing local file and write the run's versions as .remote", "warn")

    if fork:
        from_widget = _new_widget(state_from_summary(summary, []), None)
    else:
        state.set_status("handed_off")
        ev = state.emit("handoff", server=cl.url, remote_id=remote_id)
        run.remote = RemoteRef(cl.url, remote_id, links)
        from_widget = widget
        if widget is not None:
            widget.show_event(ev)
    # the server copied the sent events as seq 1..n: the mirror starts from them, so the view
    # keeps the local steps (and their numbers) when it is rebuilt from the mirror at the end
    sent_events = [] if fork else list(sent_state.events)
    remote = RemoteRun(cl, remote_id, widget=from_widget, state=state_from_summary(summary, sent_events),
                       shell=shell)
    remote.links = links
    if not fork:  # this widget already shows the sent events
        remote.last_seq = len(sent_events)
    if from_widget is not None:
        if hasattr(from_widget, "controller"):
            run._local_controller = from_widget.controller  # restored by pull back
            from_widget.controller = remote
        from_widget.set_remote(cl.url, remote_id, links)   # %handoff displays remote.widget
    timings.total = time.perf_counter() - t0
    remote.timings = timings  # type: ignore[attr-defined]
    remote.upload = up        # type: ignore[attr-defined]
    _widget_message(from_widget, f"handed off as {remote_id}: sent {fmt_bytes(up.bytes_sent)} of "
                                 f"{fmt_bytes(up.bytes_total)} in {timings.total:.2f}s; "
                                 "you can close this notebook now")
    remote.follow()
    global LAST_HANDOFF
    LAST_HANDOFF = remote
    return remote


LAST_HANDOFF: RemoteRun | None = None


def last_handoff_info() -> dict[str, Any] | None:
    """The latest handoff from this kernel: remote id, timings (s) and bytes (for demo/bench)."""
    r = LAST_HANDOFF
    if r is None:
        return None
    from dataclasses import asdict
    return {"run_id": r.run_id, "server": r.server_url,
            "timings": asdict(r.timings)}  # type: ignore[attr-defined]


def _get_shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _new_widget(state: RunState, controller: Any) -> Any:
    try:
        from .widget import RunWidget
    except ImportError:
        return None
    return RunWidget(state, controller)


# -- reattach --------------------------------------------------------------------------------
def reattach(run_id: str | None = None, *, to: str | None = None, token: str | None = None,
             client: HandoffClient | None = None, follow: bool = True,
             display: bool = True) -> "RemoteRun | RunList":
    """No id: the server's runs. With an id: rebuild the run's widget from its event log and
    follow it live (works in a brand-new kernel)."""
    cl = _client(to, token, client)
    try:
        if run_id is None:
            return RunList(cl.url, cl.list_runs())
        summary = cl.get_run(run_id)
        events: list[Event] = []
        after = 0
        while True:  # the whole log, page by page
            data = cl.events(run_id, after=after, timeout=0)
            page = [Event.from_dict(e) for e in data.get("events") or []]
            if not page:
                break
            events.extend(page)
            after = page[-1].seq
            if after >= int(data.get("last_seq") or 0):
                break
    except ClientError as exc:
        raise JourneyError(f"cannot reattach: {exc}") from exc
    state = state_from_summary(summary, events)
    remote = RemoteRun(cl, run_id, state=state)
    remote.links = summary.get("links") or {}
    widget = _new_widget(state, remote)
    remote.widget = widget
    if widget is not None:
        widget.set_remote(cl.url, run_id, remote.links)
        if display:
            _display(widget)
    if follow and state.status not in REMOTE_DONE:
        remote.follow()
    global LAST_REATTACH
    LAST_REATTACH = remote
    return remote


LAST_REATTACH: RemoteRun | None = None


def review_diff(run_id: str, *, to: str | None = None, token: str | None = None,
                client: HandoffClient | None = None) -> DiffView:
    cl = _client(to, token, client)
    try:
        return DiffView(cl.diff(run_id), run_id, cl.url)
    except ClientError as exc:
        raise JourneyError(f"cannot get the diff of {run_id}: {exc}") from exc


# -- pull back -------------------------------------------------------------------------------
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
        return (f"<p>Pulled run <b>{html.escape(self.run_id)}</b> from {html.escape(self.server_url)} "
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


ABSENT = "0" * 64   # "this file did not exist (or is unknown) at handoff"


def _file_conflicts(manifest: dict[str, Any], record: dict[str, Any] | None) -> dict[str, str]:
    """path -> sha256 of the file at handoff, for every incoming file. A file absent at handoff
    (or a pull without a handoff record, e.g. into another machine) maps to ABSENT, so an existing
    local file that differs from the incoming one is kept and the incoming one lands as .remote."""
    at_handoff = (record or {}).get("files") or {}
    return {f["path"]: at_handoff.get(f["path"]) or ABSENT for f in manifest.get("files") or []}


def pulled_here(server_url: str, run_id: str) -> Any:
    """The LocalRun of this kernel that remote run ``run_id`` was pulled back into, if any."""
    from . import runs
    for local in runs.RUNS.values():
        if any(ev.type == "pull" and ev.data.get("remote_id") == run_id and ev.data.get("server") == server_url
               for ev in local.state.events):
            return local
    return None


def pull(run_id: str, *, to: str | None = None, token: str | None = None, shell: Any = None,
         client: HandoffClient | None = None, display: bool = True, widget: Any = None,
         again: bool = False) -> Any:
    """Pause + checkpoint the remote run, restore its state here and make it a LocalRun.

    ``widget``: the view whose Pull back button was clicked (a %reattach view, a fork's view); it
    shows the download and then becomes the pulled-back LocalRun's view. A run pulled into this
    kernel before is refused unless ``again``: then its last checkpoint replaces that local run's
    state (same local run, no new id)."""
    t0 = time.perf_counter()
    HandoffClient.check_run_id(run_id)   # before it names a cache dir or a record file
    cl = _client(to, token, client)
    shell = shell if shell is not None else _get_shell()
    earlier = pulled_here(cl.url, run_id)
    if earlier is not None and not again:
        raise JourneyError(f"run {run_id} was already pulled back into this kernel as local run "
                           f"{earlier.id} ({STATUS_LABELS.get(earlier.status, earlier.status)})",
                           f"%agent continue goes on with it; %pull {run_id} --again restores the run's "
                           "last checkpoint once more, replacing that run's variables, files and state")
    record = load_record(cl.url, run_id)
    bundle_dir = Path(record["bundle_dir"]) if record and record.get("bundle_dir") else \
        bundle_cache(f"pull-{run_id}")
    bundle_dir.mkdir(parents=True, exist_ok=True)
    progress_view = widget if widget is not None else _local_widget(record)
    try:
        summary = cl.get_run(run_id)
        if summary.get("status") in ("completed", "failed", "cancelled"):
            manifest = cl.bundle(run_id)   # ended: its last checkpoint is final, nothing to pause
        else:
            reply = cl.pull(run_id)
            manifest = reply.get("manifest") or cl.bundle(run_id)
        downloaded = cl.download_chunks(manifest, ChunkStore(bundle_dir / CHUNKS),
                                        progress=_progress(progress_view, "pull"))
    except ClientError as exc:
        raise JourneyError(f"pull back failed: {exc}. Nothing changed in this kernel.") from exc
    finally:
        _progress_done(progress_view)

    write_manifest(bundle_dir, manifest)
    conflicts = _file_conflicts(manifest, record)
    from . import load_state
    try:
        report = load_state(bundle_dir, shell, file_conflicts=conflicts)
    except Exception as exc:
        raise JourneyError(f"restoring the pulled state failed ({type(exc).__name__}: {exc}); "
                           f"nothing changed in this kernel. The checkpoint stays on the server "
                           f"(run {run_id}).") from exc

    if hasattr(report, "title"):   # not the local cache dir it was restored from
        report.title = f"Restored run {run_id} from {cl.url}"
    remote_state = getattr(report, "run", None)
    if remote_state is None and manifest.get("run"):
        remote_state = RunState.from_dict(manifest["run"])
    if remote_state is None:
        raise JourneyError(f"run {run_id}'s checkpoint carries no run state; the variables were "
                           "restored but the agent cannot continue: start a new %agent run")
    local = _merge_into_local(remote_state, record, cl.url, run_id, shell, earlier)
    if widget is not None and getattr(local, "widget", None) is not widget:
        _adopt_view(local, widget)
    result = PullReport(run_id, cl.url, downloaded, report, list(getattr(report, "conflicts", []) or []),
                        time.perf_counter() - t0)
    local.pull_report = result
    if display:
        _display(result)
    return local


def _adopt_view(local: Any, widget: Any) -> None:
    """``widget`` (a remote view) becomes the view and controls of the pulled-back ``local`` run."""
    local.widget = widget
    if hasattr(widget, "controller"):
        widget.controller = local
    if hasattr(widget, "show_state"):
        widget.show_state(local.state)


def _local_widget(record: dict[str, Any] | None) -> Any:
    """The widget of the run this kernel handed off (to show the pull's download progress)."""
    from . import runs
    run = runs.RUNS.get((record or {}).get("local_run_id") or "")
    return getattr(run, "widget", None)


def _merge_into_local(remote_state: RunState, record: dict[str, Any] | None, server_url: str,
                      run_id: str, shell: Any, earlier: Any = None) -> Any:
    """The remote's plan, messages, steps and events become the local run's, status paused."""
    from . import runs
    state = RunState.from_dict(copy.deepcopy(remote_state.to_dict()))
    # a finished, failed or waiting run keeps its status (continue with follow-up text, retry or
    # an answer); one that was live remotely is paused here at the step boundary it reached
    if state.status not in ("completed", "failed", "cancelled", "waiting_input", "paused"):
        state.set_status("paused", reason="pulled back from the server; %agent continue goes on here")
    state.emit("pull", server=server_url, remote_id=run_id)
    # the run handed off from this kernel takes its state back; a fork (or a run that went on
    # here) is left alone and the pulled run becomes a run of its own, named by its remote id
    local_id = (record or {}).get("local_run_id")
    existing = earlier   # a re-pull (--again) refreshes the run it was pulled into
    for key in () if existing is not None else (local_id, state.id):
        cand = runs.RUNS.get(key) if key else None
        if cand is not None and cand.state.status == "handed_off":
            existing = cand
            break
    if existing is not None:
        existing.state = state
        existing.remote = None
        widget = getattr(existing, "widget", None)
        if widget is not None and hasattr(widget, "show_state"):
            if hasattr(widget, "controller") and hasattr(existing, "_local_controller"):
                widget.controller = existing._local_controller
            widget.show_state(state)
        runs._register(existing)  # becomes the current run: %agent continue acts on it
        return existing
    if state.id in runs.RUNS:
        state.id = run_id if run_id not in runs.RUNS else f"{run_id}-pulled-{uuid.uuid4().hex[:4]}"
    return runs.LocalRun(state, shell=shell)   # registers itself as the current run
