"""The journey, one function per step a user takes: hand a run off, reattach to it, review its
diff, pull it back. Each step is a short sequence of calls into the parts that do the work:
snapshot (capture/restore), upload/download (chunks straight to and from the server), http (the
server), cache (handoff records), follow
(RemoteRun) and views (what the notebook shows); the local run registry is only read and told
to adopt a pulled-back run. After ``handoff`` returns, the server needs nothing from this kernel.

(Over 400 lines because each of the four user actions is kept whole, in order, in one place:
handoff's pause -> capture -> create/upload -> switch the view, pull's fetch -> restore -> merge.)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict
from typing import Any

from ..errors import BundleError, ConfigError, JourneyError
from ..local.run import RUNS, LocalRun, register_run
from ..local.shell import get_shell
from ..local.widget import RunWidget
from ..manifest import Manifest
from ..snapshot.reports import fmt_bytes
from ..snapshot.restore import restore_from
from ..snapshot.trust import PullTrust
from ..state import STATUS_LABELS, Budgets, Event, RunState
from .cache import load_record, save_record
from .download import RemoteChunks
from .follow import REMOTE_DONE, HandoffTimings, RemoteRef, RemoteRun, state_from_summary
from .http import ClientError, HandoffClient, UploadReport
from .settings import server_settings
from .upload import forget, stream_capture
from .views import DiffView, PullReport, RunList, progress_done, progress_reporter, show, widget_message

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 120.0




# -- local bundle cache -----------------------------------------------------------------------












# -- display helpers --------------------------------------------------------------------------














# -- remote run ------------------------------------------------------------------------------






# -- handoff ---------------------------------------------------------------------------------
_CLIENTS: dict[tuple[str, str | None], HandoffClient] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(to: str | None, token: str | None, client: HandoffClient | None) -> HandoffClient:
    """One pooled HandoffClient per (server, token) in this kernel: connections and the
    client's setup (~50 ms) are reused by later handoffs and the follow threads."""
    if client is not None:
        return client
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
            widget_message(widget, "handoff cancelled, your run is unchanged", "warn")
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
        widget_message(widget, "pausing the run at the next step boundary...")
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
        shell = get_shell()
    sent_state = RunState.from_dict(copy.deepcopy(state.to_dict()))
    if sent_state.status not in ("paused", "waiting_input"):
        sent_state.set_status("paused", reason="handoff")
    # budgets count per run() call; a small local allowance (%agent --max-steps 2) is not meant
    # to stop the remote run, so the remote gets at least the default allowance
    sent_state.budgets.max_steps = max(sent_state.budgets.max_steps, Budgets().max_steps)

    # chunks stream to the server while the capture runs (hashed, compressed where it pays,
    # only what the server lacks is sent); the run is created once every chunk is there
    key = uuid.uuid4().hex
    t = time.perf_counter()
    for attempt in (1, 2):
        try:
            try:
                manifest, report, sink = stream_capture(cl, shell, run=sent_state,
                                                        progress=progress_reporter(widget, "upload"))
            finally:
                progress_done(widget)
        except ClientError as exc:
            widget_message(widget, f"handoff failed: {exc}", "error")
            raise JourneyError(f"handoff failed: {exc}. {intact}") from exc
        except Exception as exc:
            raise JourneyError(f"capturing the kernel state failed ({type(exc).__name__}: {exc}); "
                               f"nothing was sent. {intact}") from exc
        timings.upload = sink.seconds   # waiting for the last uploads once the capture was done
        timings.capture = time.perf_counter() - t - timings.upload
        left_out = [f["path"] for f in getattr(report, "skipped_files", None) or []]
        widget_message(widget, f"captured {len(manifest.get('variables') or [])} variables, "
                               f"{len(manifest.get('files') or [])} files: "
                               f"{fmt_bytes(getattr(report, 'bytes_total', 0))} handed off (only what the "
                               "server lacked was sent)"
                               + (f"; left out: {', '.join(left_out[:5])}" + (" ..." if len(left_out) > 5 else "")
                                  if left_out else ""))
        t = time.perf_counter()
        try:
            summary = cl.create_run(manifest, idempotency_key=key)
            break
        except ClientError as exc:
            if attempt == 1 and exc.status == 400 and isinstance(exc.body.get("missing"), list):
                forget(cl.url)   # its GC freed chunks we thought it had: capture and send again
                t = time.perf_counter()
                continue
            widget_message(widget, f"handoff failed: {exc}", "error")
            raise JourneyError(f"handoff failed: {exc}. {intact}") from exc
    stats = sink.stats
    up = UploadReport(chunks_total=stats.chunks_total, chunks_sent=stats.chunks_sent,
                      bytes_total=stats.bytes_total, bytes_sent=stats.bytes_sent, retries=stats.retries,
                      seconds=timings.capture + timings.upload)
    created.append(True)
    timings.create += time.perf_counter() - t
    timings.bytes_total, timings.bytes_sent = up.bytes_total, up.bytes_sent
    timings.chunks_total, timings.chunks_sent = up.chunks_total, up.chunks_sent
    remote_id = str(summary["id"])
    links = summary.get("links") or {}
    try:
        save_record(cl.url, remote_id, {
            "server": cl.url, "run_id": remote_id, "local_run_id": state.id,
            "root": os.getcwd(), "time": time.time(),
            "files": {f["path"]: f.get("sha256") for f in manifest.get("files") or []},
            "sent": PullTrust.sent_in(manifest),   # what %pull may load without --trust
        })
    except OSError as exc:  # the run exists remotely now; only pull's conflict check gets stricter
        widget_message(widget, f"could not record the handoff locally ({exc}); a later %pull will keep "
                                "every existing local file and write the run's versions as .remote", "warn")

    from_widget: Any   # the view that follows the remote run: a fork's own, else the run's
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
                       shell=shell, pull=_pull_into_view)
    remote.links = links
    if not fork:  # this widget already shows the sent events
        remote.last_seq = len(sent_events)
    if from_widget is not None:
        if hasattr(from_widget, "controller"):
            from_widget.controller = remote   # a pull back gives the view back to the local run
        from_widget.set_remote(cl.url, remote_id, links)   # %handoff displays remote.widget
    timings.total = time.perf_counter() - t0
    remote.timings, remote.upload = timings, up
    widget_message(from_widget, f"handed off as {remote_id}: sent {fmt_bytes(up.bytes_sent)} of "
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
    return {"run_id": r.run_id, "server": r.server_url, "timings": asdict(r.timings) if r.timings else {}}


def _new_widget(state: RunState, controller: Any) -> RunWidget:
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
    remote = RemoteRun(cl, run_id, state=state, pull=_pull_into_view)
    remote.links = summary.get("links") or {}
    widget = _new_widget(state, remote)
    remote.widget = widget
    if widget is not None:
        widget.set_remote(cl.url, run_id, remote.links)
        if display:
            show(widget)
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




ABSENT = "0" * 64   # "this file did not exist (or is unknown) at handoff"


def _file_conflicts(manifest: dict[str, Any], record: dict[str, Any] | None) -> dict[str, str]:
    """path -> sha256 of the file at handoff, for every incoming file. A file absent at handoff
    (or a pull without a handoff record, e.g. into another machine) maps to ABSENT, so an existing
    local file that differs from the incoming one is kept and the incoming one lands as .remote."""
    at_handoff = (record or {}).get("files") or {}
    return {f["path"]: at_handoff.get(f["path"]) or ABSENT for f in manifest.get("files") or []}


def pulled_here(server_url: str, run_id: str) -> Any:
    """The LocalRun of this kernel that remote run ``run_id`` was pulled back into, if any."""
    for local in RUNS.values():
        if any(ev.type == "pull" and ev.data.get("remote_id") == run_id and ev.data.get("server") == server_url
               for ev in local.state.events):
            return local
    return None


def pull(run_id: str, *, to: str | None = None, token: str | None = None, shell: Any = None,
         client: HandoffClient | None = None, display: bool = True, widget: Any = None,
         again: bool = False, trust: bool = False) -> Any:
    """Pause + checkpoint the remote run, restore its state here and make it a LocalRun.

    ``widget``: the view whose Pull back button was clicked (a %reattach view, a fork's view); it
    shows the download and then becomes the pulled-back LocalRun's view. A run pulled into this
    kernel before is refused unless ``again``: then its last checkpoint replaces that local run's
    state (same local run, no new id).

    Without ``trust`` only plain data and the groups of variables this laptop sent, unchanged, are
    loaded; the rest is listed in the report as left out (snapshot/trust.py)."""
    t0 = time.perf_counter()
    HandoffClient.check_run_id(run_id)   # before it names a cache dir or a record file
    cl = _client(to, token, client)
    shell = shell if shell is not None else get_shell()
    earlier = pulled_here(cl.url, run_id)
    if earlier is not None and not again:
        raise JourneyError(f"run {run_id} was already pulled back into this kernel as local run "
                           f"{earlier.id} ({STATUS_LABELS.get(earlier.status, earlier.status)})",
                           f"%agent continue goes on with it; %pull {run_id} --again restores the run's "
                           "last checkpoint once more, replacing that run's variables, files and state")
    record = load_record(cl.url, run_id)
    laptop = None if trust else PullTrust.from_sent((record or {}).get("sent"))
    progress_view = widget if widget is not None else _local_widget(record)
    try:
        summary = cl.get_run(run_id)
        if summary.get("status") in ("completed", "failed", "cancelled"):
            manifest = cl.bundle(run_id)   # ended: its last checkpoint is final, nothing to pause
        else:
            reply = cl.pull(run_id)
            manifest = reply.get("manifest") or cl.bundle(run_id)
        parsed = Manifest.parse(manifest)
    except (ClientError, BundleError) as exc:
        progress_done(progress_view)
        raise JourneyError(f"pull back failed: {exc}. Nothing changed in this kernel.") from exc

    # chunks stream from the server straight into the restored arrays (verified as they come);
    # nothing changes here unless every one of them arrived intact
    source = RemoteChunks(cl, parsed.chunks, progress=progress_reporter(progress_view, "pull"))
    try:
        report = restore_from(parsed, source, shell, file_conflicts=_file_conflicts(manifest, record),
                              trust=laptop)
    except (ClientError, BundleError) as exc:
        raise JourneyError(f"pull back failed: {exc}. Nothing changed in this kernel.") from exc
    except Exception as exc:
        raise JourneyError(f"restoring the pulled state failed ({type(exc).__name__}: {exc}); "
                           f"nothing changed in this kernel. The checkpoint stays on the server "
                           f"(run {run_id}).") from exc
    finally:
        progress_done(progress_view)
    downloaded = source.done

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
        show(result)
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
    run = RUNS.get((record or {}).get("local_run_id") or "")
    return getattr(run, "widget", None)


def _merge_into_local(remote_state: RunState, record: dict[str, Any] | None, server_url: str,
                      run_id: str, shell: Any, earlier: Any = None) -> Any:
    """The remote's plan, messages, steps and events become the local run's, status paused."""
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
        cand = RUNS.get(key) if key else None
        if cand is not None and cand.state.status == "handed_off":
            existing = cand
            break
    if existing is not None:
        existing.state = state
        existing.remote = None
        widget = getattr(existing, "widget", None)
        if widget is not None and hasattr(widget, "show_state"):
            if hasattr(widget, "controller"):
                widget.controller = existing
            widget.show_state(state)
        register_run(existing)  # becomes the current run: %agent continue acts on it
        return existing
    if state.id in RUNS:
        state.id = run_id if run_id not in RUNS else f"{run_id}-pulled-{uuid.uuid4().hex[:4]}"
    return LocalRun(state, shell=shell)   # registers itself as the current run


def _pull_into_view(remote: RemoteRun) -> Any:
    """A RemoteRun's Pull back button: pull over its own connection into its own view."""
    return pull(remote.run_id, client=remote.client, shell=remote.shell, widget=remote.widget)
