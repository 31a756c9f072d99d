"""RunManager: the runs this Jupyter Server executes, and the API's way to act on them.

It keeps the active runs (one asyncio task each), resumes unfinished runs on start, answers,
cancels and pulls runs, and schedules blob GC. Driving one run (restore, agent loop, crash
recovery, the end) is ``driver.RunDriver``'s job; the manager builds the collaborators once and
calls them one way: driver -> journal, checkpoints, kernels, transport.

The server never unpickles: it moves chunk bytes and reads JSON manifests; only kernels load.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from handoff_magic.state import RunState

from ..blobs import BlobStore
from ..errors import PullTimeout, RunConflict, RunFailure
from ..notify import Notifier
from ..settings import HandoffSettings
from ..store import RunStore
from ..workspace import Workspace, check_run_id
from .checkpoints import Checkpoints, gc_blobs
from .driver import ActiveRun, RunDriver, Slots
from .journal import Journal
from .kernels import KernelPool
from .sandbox import SandboxState
from .transport import make_transport

log = logging.getLogger(__name__)

T = TypeVar("T")
RELOAD_HINT = "reload the run with GET /handoff/api/runs/<id>"
TIDY_NICE = 19   # the end-of-run tidy-up thread's niceness (it yields the CPU to everything else)


def _tidy_thread_priority() -> None:
    """Lower the calling thread's (only its own: Linux schedules threads one by one) CPU priority."""
    if sys.platform.startswith("linux"):   # elsewhere PRIO_PROCESS would name the whole server
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TIDY_NICE)
        except OSError as exc:
            log.debug("jupyter-handoff: tidy thread keeps its priority (%s)", exc)


class RunManager:
    """Owns the runs' tasks and slots (contract: docs/internals.md "Server internals")."""

    def __init__(self, settings: HandoffSettings, store: RunStore, blobs: BlobStore, kernel_manager: Any,
                 workspace: Workspace, *, notifier: Notifier | None = None, sandbox: SandboxState | None = None,
                 server_token: str = "") -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.ws = workspace
        self.notifier = notifier
        self.runs: dict[str, ActiveRun] = {}
        self.transport = make_transport(settings.transport, kernel_manager, workspace,
                                        sandbox.views if sandbox is not None else None)  # disk or channels
        self.checkpoints = Checkpoints(settings, store, blobs, workspace, self.transport)
        self.kernels = KernelPool(settings, kernel_manager, workspace, in_thread=self._call_in_thread,
                                  sandbox=sandbox, server_token=server_token,
                                  warm_allowed=self.transport.name == "shared", transfers_idle=blobs.idle_for)
        self._closing = threading.Event()     # the server is stopping: commit nothing more
        self.slots = Slots(settings.max_concurrent_runs, self._closing)
        self.driver = RunDriver(settings, store, blobs, workspace, self.transport, self.checkpoints,
                                self.kernels, self.slots, in_thread=self._in_thread, closing=self._closing)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._stuck_task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * settings.max_concurrent_runs + 2),
                                        thread_name_prefix="handoff-run")
        # removing an ended run's kernel-side checkpoint dir (unsandboxed, a copy of every chunk
        # it held: ~0.5 s of system time per GB) right when a pull back starts downloading that run
        # competed with the downloads for the CPU; at nice 19 it waits for a quiet moment
        self._tidy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handoff-tidy",
                                        initializer=_tidy_thread_priority)

    # -- public API ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume every unfinished run (after a restart or crash) from its last checkpoint."""
        loop = self._ensure_loop()
        self.kernels.remove_stale_spares()
        for run_id in self.store.unfinished_runs():
            log.info("jupyter-handoff: resuming run %s", run_id)
            try:
                self.submit(run_id)
            except Exception as exc:  # one bad stored run never stops the others (or the GC)
                log.exception("jupyter-handoff: run %r cannot be resumed; marking it failed", run_id)
                self.store.fail_unresumable(run_id, f"this run cannot be resumed: {exc}",
                                            "hand the run off again from the notebook")
        if self.settings.gc_interval > 0:
            self._gc_task = loop.create_task(self._gc_every(self.settings.gc_interval), name="handoff-blob-gc")
        if self.settings.stuck_after > 0:
            self._stuck_task = loop.create_task(self._watch_stuck(self.settings.stuck_after),
                                                name="handoff-stuck-watch")
        self.kernels.refill()

    async def stop(self) -> None:
        """Stop driving runs; they stay unfinished in the store and resume on the next start."""
        self._closing.set()
        for task in (self._gc_task, self._stuck_task):
            if task is not None:
                task.cancel()
        for run in list(self.runs.values()):
            run.pause.set()
            run.wake.set()
            if run.executor is not None:
                await asyncio.get_running_loop().run_in_executor(None, run.executor.interrupt)
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        if tasks:  # let them reach a boundary (and finish a kernel shutdown already under way:
            # the server's own shutdown_all must not race it)
            _, pending = await asyncio.wait(tasks, timeout=10)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.kernels.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._tidy.shutdown(wait=False)

    def submit(self, run_id: str) -> None:
        """Queue a run; at most ``max_concurrent_runs`` execute at once."""
        check_run_id(run_id)
        loop = self._ensure_loop()
        current = self.runs.get(run_id)
        if current is not None and current.task is not None and not current.task.done():
            return
        run = ActiveRun(id=run_id)
        self.runs[run_id] = run
        run.task = loop.create_task(self._run_task(run), name=f"handoff-run-{run_id}")

    async def answer(self, run_id: str, text: str) -> None:
        """Record the user's answer and wake the run waiting for it."""
        state = self.store.get_state(run_id)
        if state.is_terminal:
            raise RunConflict(f"run {run_id} is {state.status}; it takes no more answers", RELOAD_HINT)
        self.store.put_answer(run_id, text)
        run = self.runs.get(run_id)
        if run is not None:
            run.wake.set()

    async def cancel(self, run_id: str) -> None:
        """Interrupt the kernel and end the run as ``cancelled``."""
        state = self.store.get_state(run_id)
        if state.is_terminal:
            raise RunConflict(f"run {run_id} is already {state.status}", RELOAD_HINT)
        run = self.runs.get(run_id)
        if run is None or run.task is None or run.task.done():
            self._status_undriven(state, "cancelled", "cancelled by the user")
            return
        run.cancel_requested = True
        run.pause.set()
        run.wake.set()
        if run.executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, run.executor.interrupt)

    async def pull(self, run_id: str, timeout: float = 120) -> dict[str, Any]:
        """Pause at the next step boundary, checkpoint, end ``pulled``; returns the manifest."""
        state = self.store.get_state(run_id)
        if state.is_terminal:
            raise RunConflict(f"run {run_id} is {state.status}; only an unfinished run can be pulled back",
                              RELOAD_HINT)
        run = self.runs.get(run_id)
        if run is None or run.task is None or run.task.done():
            manifest = self.checkpoints.latest(run_id)[0]
            self._status_undriven(state, "pulled", "pulled back to a local kernel")
            return manifest
        if run.pull_result is None:
            run.pull_result = asyncio.get_running_loop().create_future()
        run.pull_requested = True
        run.pause.set()
        run.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(run.pull_result), timeout)
        except asyncio.TimeoutError:
            raise PullTimeout(f"run {run_id} did not reach a step boundary within {timeout:.0f}s; "
                              "it pauses after the current step: try pulling again in a moment",
                              "try again in a moment, or cancel the run") from None

    def gc(self, min_age: float = 3600.0) -> dict[str, int]:
        """Delete blobs no stored manifest references and older than ``min_age`` seconds (so an
        upload whose run is not created yet is spared). Never deletes a referenced chunk."""
        return gc_blobs(self.store, self.blobs, min_age=min_age, keep=self.settings.keep_checkpoints)

    # -- slots -----------------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- one run, start to end -------------------------------------------------------------------
    async def _run_task(self, run: ActiveRun) -> None:
        try:
            run.state = self.store.get_state(run.id)
            run.journal = self._journal(run.state, run)
            if run.state.is_terminal:
                return
            if not await self.slots.acquire(run):
                await self._finish_unstarted(run)
                return
            await self.driver.drive(run)
        except asyncio.CancelledError:
            if not self._closing.is_set():
                raise
        except RunFailure as exc:
            await self._fail(run, exc.message, exc.hint or "")
        except Exception as exc:
            log.exception("jupyter-handoff: run %s failed", run.id)
            await self._fail(run, f"the server-side runner failed: {type(exc).__name__}: {exc}",
                             "see the Jupyter Server log; the last checkpoint is kept and can be pulled back")
        finally:
            self.slots.release(run)
            if not self._closing.is_set():
                await self.driver.release_kernel(run)
            if run.state is not None and run.state.is_terminal:
                if self._closing.is_set():
                    self.checkpoints.finished(run.id)
                else:   # unlinking the checkpoint dir took seconds on a busy disk, on the event loop,
                    # holding up every GET of the pull back that had just ended the run
                    await asyncio.get_running_loop().run_in_executor(self._tidy, self.checkpoints.finished,
                                                                     run.id)
            if not self._closing.is_set():
                if run.pull_result is not None and not run.pull_result.done():
                    run.pull_result.set_exception(RunConflict(
                        f"run {run.id} ended as {run.state.status if run.state else 'unknown'} before it "
                        "could be pulled", RELOAD_HINT))
                if self.runs.get(run.id) is run:
                    del self.runs[run.id]

    async def _finish_unstarted(self, run: ActiveRun) -> None:
        if self._closing.is_set():
            return
        if run.pull_requested:
            manifest = self.checkpoints.latest(run.id)[0]
            run.log.status("pulled", reason="pulled back to a local kernel")
            if run.pull_result is not None and not run.pull_result.done():
                run.pull_result.set_result(manifest)
        elif run.cancel_requested:
            run.log.status("cancelled", reason="cancelled by the user")

    async def _fail(self, run: ActiveRun, message: str, hint: str) -> None:
        if run.state is None:  # it failed before the state was read
            try:
                run.state = self.store.get_state(run.id)
            except KeyError:
                return
            run.journal = self._journal(run.state, run)
        await self.driver.fail(run, message, hint)

    def _status_undriven(self, state: RunState, status: str, reason: str) -> None:
        """Status change for a run no task drives (not started, or already gone)."""
        state.question = None
        self._journal(state, None).status(status, reason=reason)

    def _journal(self, state: RunState, run: ActiveRun | None) -> Journal:
        def model() -> str:
            return (run.model if run is not None else "") or self.settings.model or state.model
        return Journal(self.store, state, notebook=None, notifier=self.notifier, model=model, closed=self._closing)

    # -- helpers ---------------------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def _call_in_thread(self, fn: Callable[[], T]) -> T:
        return await self._in_thread(fn)

    async def _gc_every(self, interval: float) -> None:
        """Scheduled blob GC (``c.HandoffApp.gc_interval`` seconds; 0 disables it)."""
        while not self._closing.is_set():
            await asyncio.sleep(interval)
            try:
                result = await self._in_thread(self.gc)
                log.info("jupyter-handoff: blob gc %s", result)
            except Exception:
                log.exception("jupyter-handoff: blob gc failed; it runs again in %.0fs", interval)

    async def _watch_stuck(self, stuck_after: float) -> None:
        """Notify ``stuck`` once per stall: a running run whose last event is older than
        ``stuck_after`` seconds (a hung kernel call, a model that never answers)."""
        while not self._closing.is_set():
            await asyncio.sleep(min(30.0, max(0.2, stuck_after / 4)))
            now = time.time()
            for run in list(self.runs.values()):
                state = run.state
                if state is None or state.status not in ("restoring", "running"):
                    continue
                if now - state.updated < stuck_after or run.stuck_since == state.updated:
                    continue
                run.stuck_since = state.updated
                log.warning("jupyter-handoff: run %s made no progress for %.0fs", run.id, now - state.updated)
                if self.notifier is not None:
                    try:
                        self.notifier.enqueue(run.id, "stuck")
                    except Exception:
                        log.exception("jupyter-handoff: queueing the stuck notice for %s failed", run.id)
