"""RunManager: executes handed-off runs inside this Jupyter Server.

Per run one asyncio task: workspace ``<root_dir>/handoff-runs/<id>/``, the bundle materialised
there from the BlobStore (hard links), a fresh kernel from the server's own kernel manager with
a scrubbed environment, ``load_state`` inside it, then the shared ``AgentLoop`` in a worker
thread with a ``KernelExecutor`` and the server's model credentials. Every event is committed
to SQLite before the loop goes on; after every step ``result.ipynb`` is rewritten and an
incremental checkpoint (``save_state`` inside the kernel) is ingested, so a server crash or a
kernel crash resumes from the last step boundary and the cut-off step is redone.

The server never unpickles: it moves chunk bytes and reads JSON manifests; only kernels load.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jupyter_core.utils import ensure_async

from handoff_magic.agent.context import turn_index
from handoff_magic.atomic import atomic_write_json, link_or_copy
from handoff_magic.chunks import chunk_relpath, is_sha
from handoff_magic.errors import BundleError
from handoff_magic.manifest import Manifest
from handoff_magic.secrets import is_secret_name
from handoff_magic.state import (TERMINAL_STATUSES, Event, Message, PlanStep, RunState, StateError,
                                 check_run_id)

from .kernel_executor import KernelExecutor
from .notebook import write_for_state
from .transport import KernelGone, TransportError, make_transport

log = logging.getLogger(__name__)

NOTIFY_ON = frozenset({"completed", "failed", "cancelled", "waiting_input"})
REPORT_MARK = "@@HANDOFF-JSON@@"
SDK_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
DROP_ENV = frozenset({"JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN", "JUPYTER_PASSWORD",
                      "HANDOFF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "JPY_SESSION_NAME"})
INLINE_MPL = "module://matplotlib_inline.backend_inline"
MAX_CRASHES_PER_STEP = 2
GC_INTERVAL = 6 * 3600.0    # seconds between scheduled blob GCs
MAX_REPORT_VARIABLES = 500  # rows of the restore report kept in its event
KEEP_CHECKPOINTS = 3        # checkpoint manifests kept per unfinished run (a finished run keeps 1)


class RunConflict(ValueError):
    """The request does not fit the run's status (e.g. cancelling a finished run) → HTTP 409."""


class RunFailure(RuntimeError):
    """Ends a run as ``failed``; ``hint`` says what the user can do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _kernel_code(func_body: str, name: str) -> str:
    """Code that runs ``func_body`` in a throwaway function and prints its JSON result after a
    marker, leaving no new names in the user's namespace."""
    indented = "\n".join("    " + line for line in func_body.strip().splitlines())
    return (f"def {name}():\n{indented}\n"
            f"try:\n    print({REPORT_MARK!r} + {name}(), flush=True)\n"
            f"finally:\n    del {name}\n")


def _parse_marked(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(REPORT_MARK):
            return json.loads(line[len(REPORT_MARK):])
    raise ValueError("the kernel printed no result")


@dataclass
class _Run:
    """What the manager knows about one active run (in memory; the store has the rest)."""
    id: str
    task: asyncio.Task[None] | None = None
    state: RunState | None = None
    kernel_id: str | None = None
    executor: KernelExecutor | None = None
    model: str = ""
    pause: threading.Event = field(default_factory=threading.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    pull_requested: bool = False
    crashed: bool = False
    crash_detail: str = ""                # how the kernel ended, e.g. "killed by SIGKILL"
    crashes: dict[int, int] = field(default_factory=dict)
    # (steps, len(messages)) at the last checkpoint: steps, because a compaction can give the
    # conversation back the length it had
    ckpt_key: tuple[int, int] = (-1, -1)
    last_exec_count: int | None = None
    pull_result: asyncio.Future[dict[str, Any]] | None = None
    holds_slot: bool = False
    nb_lock: threading.Lock = field(default_factory=threading.Lock)  # result.ipynb: one writer
    nb_gen: int = 0                       # snapshots of result.ipynb asked for, in order
    nb_written: int = 0                   # the newest snapshot on disk
    nb_key: tuple[int, str] = (0, "")     # (last_seq, status) of that snapshot
    stuck_since: float | None = None      # the last progress time a 'stuck' notice was sent for


class _RunExecutor:
    """The Executor the loop sees: forwards to the run's current kernel; flags a crash so the
    loop pauses at the step boundary and the manager can restore a fresh kernel."""

    def __init__(self, run: _Run, on_out_of_memory: Callable[[], None]) -> None:
        self.run = run
        self.on_out_of_memory = on_out_of_memory

    def execute(self, code: str, timeout: float | None = None) -> Any:
        ex = self.run.executor
        assert ex is not None
        res = ex.execute(code, timeout)
        self.run.last_exec_count = res.execution_count
        if res.status == "dead":
            self.run.crashed = True
            self.run.crash_detail = str((res.error or {}).get("evalue", ""))
        elif (res.error or {}).get("ename") == "MemoryError":  # past c.HandoffApp.kernel_memory_limit
            self.on_out_of_memory()
        return res

    def interrupt(self) -> None:
        if self.run.executor is not None:
            self.run.executor.interrupt()


class RunManager:
    """Owns the runs' tasks, kernels and checkpoints (contract: docs/internals.md)."""

    def __init__(self, app: Any, store: Any, blobs: Any, kernel_manager: Any, root_dir: Path) -> None:
        self.app = app
        self.store = store
        self.blobs = blobs
        self.kernel_manager = kernel_manager
        self.root_dir = Path(root_dir)
        self.runs: dict[str, _Run] = {}
        self.transport = make_transport(app, kernel_manager, self.workspace)  # shared disk or kernel channels
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._stopping = False
        self._gc_task: asyncio.Task[None] | None = None
        self._stuck_task: asyncio.Task[None] | None = None
        self._warm: asyncio.Future[tuple[str, KernelExecutor]] | None = None  # spare kernel (opt-in)
        workers = max(4, 2 * int(getattr(app, "max_concurrent_runs", 2)) + 2)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="handoff-run")

    # -- public API ------------------------------------------------------------------------------
    def workspace(self, run_id: str) -> Path:
        return self.root_dir / "handoff-runs" / check_run_id(run_id)

    async def start(self) -> None:
        """Resume every unfinished run (after a restart or crash) from its last checkpoint."""
        loop = self._ensure_loop()
        for run_id in self.store.unfinished_runs():
            log.info("jupyter-handoff: resuming run %s", run_id)
            try:
                self.submit(run_id)
            except Exception as exc:  # one bad stored run never stops the others (or the GC)
                log.exception("jupyter-handoff: run %r cannot be resumed; marking it failed", run_id)
                self.store.fail_unresumable(run_id, f"this run cannot be resumed: {exc}",
                                            "hand the run off again from the notebook")
        interval = float(getattr(self.app, "gc_interval", GC_INTERVAL))
        if interval > 0:
            self._gc_task = loop.create_task(self._gc_every(interval), name="handoff-blob-gc")
        stuck_after = float(getattr(self.app, "stuck_after", 0) or 0)
        if stuck_after > 0:
            self._stuck_task = loop.create_task(self._watch_stuck(stuck_after), name="handoff-stuck-watch")
        self._refill_warm()

    async def _gc_every(self, interval: float) -> None:
        """Scheduled blob GC (app attribute ``gc_interval`` seconds; 0 disables it)."""
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                result = await self._in_thread(self.gc)
                log.info("jupyter-handoff: blob gc %s", result)
            except Exception:
                log.exception("jupyter-handoff: blob gc failed; it runs again in %.0fs", interval)

    async def _watch_stuck(self, stuck_after: float) -> None:
        """Notify ``stuck`` once per stall: a running run whose last event is older than
        ``stuck_after`` seconds (a hung kernel call, a model that never answers)."""
        while not self._stopping:
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
                notifier = getattr(self.app, "notifier", None)
                if notifier is not None:
                    try:
                        notifier.enqueue(run.id, "stuck")
                    except Exception:
                        log.exception("jupyter-handoff: queueing the stuck notice for %s failed", run.id)

    async def stop(self) -> None:
        """Stop driving runs; they stay unfinished in the store and resume on the next start."""
        self._stopping = True
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
        warm, self._warm = self._warm, None
        if warm is not None:
            if warm.done() and not warm.cancelled() and warm.exception() is None:
                kid, ex = warm.result()
                ex.close()
                await self._shutdown_quietly(kid)
            else:
                warm.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, run_id: str) -> None:
        """Queue a run; at most ``app.max_concurrent_runs`` execute at once."""
        check_run_id(run_id)
        loop = self._ensure_loop()
        task = self.runs[run_id].task if run_id in self.runs else None
        if task and not task.done():
            return
        run = _Run(id=run_id)
        self.runs[run_id] = run
        run.task = loop.create_task(self._run_task(run), name=f"handoff-run-{run_id}")

    async def answer(self, run_id: str, text: str) -> None:
        """Record the user's answer and wake the run waiting for it."""
        state = self.store.get_state(run_id)
        if state.is_terminal:
            raise RunConflict(f"run {run_id} is {state.status}; it takes no more answers")
        self.store.put_answer(run_id, text)
        run = self.runs.get(run_id)
        if run is not None:
            run.wake.set()

    async def cancel(self, run_id: str) -> None:
        """Interrupt the kernel and end the run as ``cancelled``."""
        state = self.store.get_state(run_id)
        if state.is_terminal:
            raise RunConflict(f"run {run_id} is already {state.status}")
        run = self.runs.get(run_id)
        if run is None or run.task is None or run.task.done():
            self._set_status_direct(state, "cancelled", "cancelled by the user")
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
            raise RunConflict(f"run {run_id} is {state.status}; only an unfinished run can be pulled back")
        run = self.runs.get(run_id)
        if run is None or run.task is None or run.task.done():
            manifest = self.latest_manifest(run_id)[0]
            self._set_status_direct(state, "pulled", "pulled back to a local kernel")
            return manifest
        if run.pull_result is None:
            run.pull_result = asyncio.get_running_loop().create_future()
        run.pull_requested = True
        run.pause.set()
        run.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(run.pull_result), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"run {run_id} did not reach a step boundary within {timeout:.0f}s; "
                              "it pauses after the current step: try pulling again in a moment") from None

    def latest_manifest(self, run_id: str) -> tuple[dict[str, Any], str]:
        """The newest checkpoint manifest, else the handoff one; and which kind it is."""
        m = self.store.manifest(run_id, "checkpoint")
        if m is not None:
            return m, "checkpoint"
        m = self.store.manifest(run_id, "handoff")
        if m is None:
            raise RunFailure(f"run {run_id} has no handoff manifest", "hand the run off again")
        return m, "handoff"

    def gc(self, min_age: float = 3600.0) -> dict[str, int]:
        """Delete blobs no stored manifest references and older than ``min_age`` seconds (so an
        upload whose run is not created yet is spared). Never deletes a referenced chunk."""
        return gc_blobs(self.store, self.blobs, min_age=min_age)

    # -- the run task -----------------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop() if _has_running_loop() else asyncio.get_event_loop()
            self._sem = asyncio.Semaphore(max(1, int(getattr(self.app, "max_concurrent_runs", 2))))
        return self._loop

    async def _acquire_slot(self, run: _Run) -> bool:
        """Wait for a free slot; False if woken for cancel/pull/stop first."""
        assert self._sem is not None
        while True:
            if run.cancel_requested or run.pull_requested or self._stopping:
                return False
            acq = asyncio.ensure_future(self._sem.acquire())
            woke = asyncio.ensure_future(run.wake.wait())
            done, _ = await asyncio.wait({acq, woke}, return_when=asyncio.FIRST_COMPLETED)
            woke.cancel()
            if acq in done:
                run.holds_slot = True
                return True
            acq.cancel()
            try:
                await acq
                self._sem.release()  # acquired just as we cancelled
            except asyncio.CancelledError:
                pass
            run.wake.clear()

    def _release_slot(self, run: _Run) -> None:
        if run.holds_slot and self._sem is not None:
            run.holds_slot = False
            self._sem.release()

    async def _run_task(self, run: _Run) -> None:
        try:
            state = self.store.get_state(run.id)
            run.state = state
            if state.is_terminal:
                return
            if not await self._acquire_slot(run):
                await self._finish_unstarted(run)
                return
            await self._drive(run)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except RunFailure as exc:
            await self._fail(run, exc.message, exc.hint)
        except Exception as exc:
            log.exception("jupyter-handoff: run %s failed", run.id)
            await self._fail(run, f"the server-side runner failed: {type(exc).__name__}: {exc}",
                       "see the Jupyter Server log; the last checkpoint is kept and can be pulled back")
        finally:
            self._release_slot(run)
            if run.state is not None and run.state.is_terminal:
                self._prune_checkpoints(run.id, finished=True)
            if not self._stopping:
                await self._cleanup_kernel(run)
                if run.state is not None and run.state.is_terminal:
                    self._drop_ckpt_links(run.id)
                if run.pull_result is not None and not run.pull_result.done():
                    run.pull_result.set_exception(RunConflict(
                        f"run {run.id} ended as {run.state.status if run.state else 'unknown'} before it "
                        "could be pulled"))
                if self.runs.get(run.id) is run:
                    del self.runs[run.id]

    async def _finish_unstarted(self, run: _Run) -> None:
        state = run.state
        assert state is not None
        if self._stopping:
            return
        if run.pull_requested:
            manifest = self.latest_manifest(run.id)[0]
            self._status(run, "pulled", reason="pulled back to a local kernel")
            if run.pull_result is not None and not run.pull_result.done():
                run.pull_result.set_result(manifest)
        elif run.cancel_requested:
            self._status(run, "cancelled", reason="cancelled by the user")

    async def _drive(self, run: _Run) -> None:
        state = run.state
        assert state is not None
        ws = self.workspace(run.id)
        ws.mkdir(parents=True, exist_ok=True)
        resumed = state.status != "queued"
        was_waiting = state.status == "waiting_input"
        if was_waiting and self._has_cut_off_step(run):
            # waiting on a question whose step no checkpoint holds: that step is redone, so
            # the wait is stale; answers are refused (409) until the question is asked again
            was_waiting = False
            state.question = None
            self._status(run, "restoring", reason="the server stopped before the question's step was "
                         "saved; redoing that step, it asks again")
        elif not was_waiting:
            self._status(run, "restoring", reason="resuming after a server restart" if resumed
                         else "restoring the handed-off state in a fresh kernel")
        await self._new_kernel(run, reason="server restart" if resumed else "handoff")
        self._rollback_cut_off(run, "the Jupyter Server stopped while this step ran")
        provider = self._provider(run)
        from handoff_magic.agent.loop import AgentLoop
        cap = int(getattr(self.app, "max_tokens_per_run", 0) or 0)
        if cap > 0:
            state.budgets.max_tokens = min(cap, state.budgets.max_tokens or cap)
        loop = AgentLoop(state, provider, _RunExecutor(run, lambda: self._out_of_memory(run)),
                         on_event=self._on_event_cb(run),
                         should_pause=lambda: self._should_pause(run),
                         exec_timeout=float(getattr(self.app, "exec_timeout", 3600.0)),
                         context_tokens=int(getattr(self.app, "context_tokens", 0) or 0) or None)
        answer: str | None = None
        if state.status == "waiting_input":
            answer = await self._wait_answer(run)
            if answer is None:
                await self._end_requested(run)
                return
        while True:
            if self._stopping:
                return
            if run.cancel_requested or run.pull_requested:
                await self._end_requested(run)
                return
            await self._in_thread(loop.run, answer)
            answer = None
            if self._stopping:
                return
            if run.crashed:
                await self._recover_crash(run)
                continue
            await self._in_thread(self._after_step, run, True)
            if run.crashed:  # died during the final checkpoint
                await self._recover_crash(run)
                continue
            if run.cancel_requested or run.pull_requested:
                await self._end_requested(run)
                return
            if state.status == "paused":  # budget: ask the user whether to go on
                reason = next((e.data.get("reason") for e in reversed(state.events)
                               if e.type == "status"), "") or "paused"
                state.question = f"The run paused: {reason}. Answer 'continue' to go on."
                self._emit(run, "question", question=state.question)
                self._status(run, "waiting_input", reason="paused; waiting for the user")
            if state.status == "waiting_input":
                answer = await self._wait_answer(run)
                if answer is None:
                    await self._end_requested(run)
                    return
                continue
            if state.is_terminal:
                return
            raise RunFailure(f"the agent loop stopped with status {state.status!r}",
                             "this is a bug in jupyter-handoff; pull the run back to continue locally")

    def _out_of_memory(self, run: _Run) -> None:
        """A step hit the kernel's memory limit: say so as an event (the agent sees the
        MemoryError as the step's result and the kernel lives on)."""
        limit = getattr(self.app, "memory_limit_bytes", lambda: 0)()
        self._emit(run, "error", error="the run's kernel ran out of memory" + (
            f" (limit {limit / 2**30:.1f} GiB)" if limit else "") + "; the step failed with MemoryError",
            hint="use less memory in the step (smaller pieces, fewer copies), or raise "
                 "c.HandoffApp.kernel_memory_limit on the server")

    async def _wait_answer(self, run: _Run) -> str | None:
        """Wait (without holding a run slot) for an answer; None if cancelled/pulled/stopping."""
        self._release_slot(run)
        while True:
            if run.cancel_requested or run.pull_requested or self._stopping:
                return None
            text = self.store.take_answer(run.id)
            if text is not None:
                break
            run.wake.clear()
            await run.wake.wait()
        if not await self._acquire_slot(run):
            self.store.put_answer(run.id, text)  # keep it for whoever resumes the run
            return None
        return text

    async def _end_requested(self, run: _Run) -> None:
        if self._stopping:
            return
        state = run.state
        assert state is not None
        if run.pull_requested:
            manifest: dict[str, Any] | None = None
            if run.executor is not None and not run.executor.dead:
                manifest = await self._in_thread(self._checkpoint, run, True)
            if manifest is None:
                manifest = self.latest_manifest(run.id)[0]
            self._emit(run, "pull", server=self._public_url(), remote_id=run.id)
            await self._end(run, "pulled", reason="pulled back to a local kernel")
            if run.pull_result is not None and not run.pull_result.done():
                run.pull_result.set_result(manifest)
        elif run.cancel_requested:
            state.question = None
            await self._end(run, "cancelled", reason="cancelled by the user")

    async def _end(self, run: _Run, status: str, **data: Any) -> None:
        """End the run from the event loop: result.ipynb shows the end (written in a worker
        thread) before the terminal status is committed and anyone is told."""
        assert run.state is not None
        event = run.state.set_status(status, **data)
        pending = self._write_notebook(run)
        if pending is not None:
            await asyncio.wrap_future(pending)
        if event is not None:
            self._persist(run, event)

    # -- kernels --------------------------------------------------------------------------------
    def kernel_env(self) -> dict[str, str]:
        """The server's environment minus anything secret: tokens, model keys, secret names,
        and any variable whose value equals one of those."""
        secret_vals: set[str] = set()
        key_env = getattr(self.app, "model_api_key_env", "") or ""
        drop = set(DROP_ENV) | ({key_env} if key_env else set())
        for name in drop:
            if os.environ.get(name):
                secret_vals.add(os.environ[name])
        token = self._server_token()
        if token:
            secret_vals.add(token)
        for name, value in os.environ.items():
            if is_secret_name(name) and value:
                secret_vals.add(value)
        env = {k: v for k, v in os.environ.items()
               if k not in drop and not is_secret_name(k) and v not in secret_vals}
        if not env.get("MPLBACKEND", "").startswith("module://"):
            env["MPLBACKEND"] = INLINE_MPL  # kernels are interactive, whatever the server uses
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _server_token(self) -> str:
        sa = getattr(self.app, "serverapp", None)
        for obj, attr in ((getattr(sa, "identity_provider", None), "token"), (sa, "token")):
            try:
                value = getattr(obj, attr, "") if obj is not None else ""
            except Exception:  # noqa: BLE001 - traitlets may raise on deprecated access
                value = ""
            if isinstance(value, str) and value:
                return value
        return ""

    async def _new_kernel(self, run: _Run, reason: str) -> None:
        """Start a fresh kernel in the workspace and restore the latest manifest into it."""
        await self._cleanup_kernel(run)
        t0 = time.perf_counter()
        manifest, kind = self.latest_manifest(run.id)
        # the kernel boots (~0.5 s) while the bundle is checked and linked into the workspace
        materialised = asyncio.ensure_future(self._in_thread(self._materialise, run.id, manifest))
        warm = await self._take_warm()
        if warm is not None:  # a kernel booted ahead of time (c.HandoffApp.warm_kernels)
            run.kernel_id, run.executor = warm
            t_started = time.perf_counter()
            await materialised
        else:
            await self._start_kernel(run, materialised)
            t_started = time.perf_counter()
        assert run.executor is not None and run.kernel_id is not None
        kid = run.kernel_id
        t_ready = time.perf_counter()
        run.crashed = False
        self._seed_kernel_info(kid, run.executor.kernel_info)
        try:  # the kernel may not share our disk (gateways): the transport brings the bundle
            kb = await self._in_thread(self.transport.send_bundle, run.executor, run.id, manifest, self.blobs)
        except TransportError as exc:
            raise RunFailure(f"sending the bundle to the kernel failed: {exc.message}", exc.hint) from exc
        code = _kernel_code(
            "import json, os, handoff_magic\n"
            f"os.chdir({kb.root!r})  # a warm kernel booted elsewhere; the agent's paths are relative\n"
            f"r = handoff_magic.load_state({kb.bundle_dir!r}, root={kb.root!r})\n"
            "return json.dumps(r.to_dict(), default=str)", "_handoff_restore_")
        res = await self._in_thread(run.executor.execute, code, 3600.0, silent=True, store_history=False)
        if res.status != "ok":
            err = res.error or {}
            raise RunFailure(f"restoring the {kind} bundle in a fresh kernel failed: "
                             f"{err.get('ename', res.status)}: {err.get('evalue', '')}",
                             "the bundle may need packages this server lacks; install them here and "
                             "hand off again, or pull the run back")
        try:
            report = _parse_marked(res.stdout)
        except ValueError as exc:
            raise RunFailure(f"restoring in a fresh kernel printed no report ({exc})",
                             "see the Jupyter Server log") from exc
        log.info("jupyter-handoff: run %s: kernel started in %.2fs, ready in %.2fs, bundle sent and restored "
                 "in %.2fs (%s)", run.id, t_started - t0, t_ready - t0, time.perf_counter() - t_ready, reason)
        report.pop("run", None)  # the run state travels separately; keep the event small
        variables = report.get("variables")
        if isinstance(variables, list) and len(variables) > MAX_REPORT_VARIABLES:
            report["variables"] = variables[:MAX_REPORT_VARIABLES]
            report["variables_not_listed"] = len(variables) - MAX_REPORT_VARIABLES
        report["reason"] = reason
        report["source"] = kind
        self._emit(run, "restore", report=report)
        held: dict[str, Any] = manifest["run"] if isinstance(manifest.get("run"), dict) else {}
        run.ckpt_key = (int(held.get("steps") or 0), len(held.get("messages") or []))
        self._write_notebook(run)

    async def _start_kernel(self, run: _Run, materialised: "asyncio.Future[Any]") -> None:
        """A fresh kernel in the run's workspace (its executor ready), while ``materialised``
        finishes; a missing chunk is reported before a kernel error."""
        try:
            kid, ready = await self._boot_kernel(f"handoff-runs/{run.id}")
        except BaseException:
            await asyncio.gather(materialised, return_exceptions=True)  # no orphaned task
            raise
        run.kernel_id = kid
        done = await asyncio.gather(materialised, ready, return_exceptions=True)
        if isinstance(done[1], KernelExecutor):
            run.executor = done[1]
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _boot_kernel(self, api_path: str) -> tuple[str, "asyncio.Future[KernelExecutor]"]:
        """Start a kernel with the scrubbed env, no autorestart; returns its id and a future of
        its ready ``KernelExecutor``."""
        sandbox = getattr(self.app, "sandbox_state", None)
        if sandbox is not None and sandbox.problem:  # c.HandoffApp.sandbox: never run unisolated unasked
            raise RunFailure(sandbox.problem, sandbox.hint)
        kernel_name = sandbox.kernel_name if sandbox is not None else self.app.kernel_name
        kid = await ensure_async(self.kernel_manager.start_kernel(
            path=api_path, kernel_name=kernel_name, env=self.kernel_env()))
        km = self.kernel_manager.get_kernel(kid)
        try:  # we recover crashed kernels ourselves (from the checkpoint), not by a blank restart
            km.stop_restarter()
            km.autorestart = False
        except Exception as exc:  # noqa: BLE001 - logged; the run goes on with the restarter on
            log.warning("jupyter-handoff: could not disable autorestart of kernel %s: %s", kid, exc)
        loop = asyncio.get_running_loop()
        ready = asyncio.ensure_future(self._in_thread(
            lambda: KernelExecutor(self.kernel_manager, kid, loop,
                                   default_timeout=float(getattr(self.app, "exec_timeout", 3600.0)))))
        return kid, ready

    # -- warm kernel (opt-in: c.HandoffApp.warm_kernels = 1) ----------------------------------
    def _warm_enabled(self) -> bool:
        """Only on a shared disk and unsandboxed: the restore chdirs the booted kernel into the
        run's workspace, which a sandbox started elsewhere cannot see."""
        sandbox = getattr(self.app, "sandbox_state", None)
        return int(getattr(self.app, "warm_kernels", 0) or 0) > 0 and self.transport.name == "shared" \
            and not self._stopping and (sandbox is None or sandbox.mode == "none")

    def _refill_warm(self) -> None:
        if self._warm_enabled() and self._warm is None:
            self._warm = asyncio.ensure_future(self._boot_warm())

    async def _boot_warm(self) -> tuple[str, KernelExecutor]:
        """Boot a spare kernel so the next handoff skips kernel start-up (~0.5 s, far more on
        a loaded machine); handoff_magic is imported in it already."""
        (self.root_dir / "handoff-runs").mkdir(parents=True, exist_ok=True)
        kid, ready = await self._boot_kernel("handoff-runs")
        try:
            ex = await ready
            await self._in_thread(ex.execute, "import handoff_magic", 120.0, silent=True, store_history=False)
        except BaseException:
            await self._shutdown_quietly(kid)
            raise
        return kid, ex

    async def _take_warm(self) -> tuple[str, KernelExecutor] | None:
        """The spare kernel if there is a live one (waiting for it if it is still booting),
        and start booting the next."""
        task, self._warm = self._warm, None
        if task is None:
            return None
        try:
            kid, ex = await task
        except Exception as exc:  # noqa: BLE001 - logged; a fresh kernel is started instead
            log.warning("jupyter-handoff: the warm kernel failed to start (%s); starting one for the run", exc)
            self._refill_warm()
            return None
        self._refill_warm()
        if ex.dead or not await ensure_async(self.kernel_manager.get_kernel(kid).is_alive()):
            ex.close()
            await self._shutdown_quietly(kid)
            return None
        return kid, ex

    async def _shutdown_quietly(self, kid: str) -> None:
        try:
            await ensure_async(self.kernel_manager.shutdown_kernel(kid, now=True))
        except Exception as exc:  # noqa: BLE001 - logged; nothing else to do with a kernel on its way out
            log.warning("jupyter-handoff: shutting down kernel %s failed: %s", kid, exc)

    def _seed_kernel_info(self, kid: str, info: dict[str, Any] | None) -> None:
        """Let browsers attach to a run's kernel while it is busy with a step.

        Jupyter Server's websocket handshake first asks the kernel for ``kernel_info`` on the
        shell channel; a kernel busy with an agent step answers only after the step, and a
        browser (JupyterLab's kernel list, a reload) that gives up meanwhile makes the server log
        a 500 ``'NoneType' object has no attribute 'kernel_ws_protocol'`` (jupyter_server
        #1265). The server caches that reply per kernel (``_kernel_info_future``); we got it
        when the kernel became ready, so we seed the cache and the handshake never waits."""
        if not info or "protocol_version" not in info:
            return
        try:
            km = self.kernel_manager.get_kernel(kid)
            if getattr(km, "_kernel_info_future", None) is None:
                from concurrent.futures import Future
                fut: Future[dict[str, Any]] = Future()
                fut.set_result(info)
                km._kernel_info_future = fut
        except Exception as exc:  # noqa: BLE001 - only an optimisation of other clients' handshakes
            log.warning("jupyter-handoff: could not cache kernel_info of kernel %s: %s", kid, exc)

    def _materialise(self, run_id: str, manifest: dict[str, Any]) -> None:
        """Check that every chunk is here; the first time, keep the handoff bundle as it arrived
        in .handoff/bundle (manifest + hard links). The kernel's checkpoint dir is the
        transport's job (``send_bundle``)."""
        try:
            shas = Manifest.parse(manifest).shas
        except BundleError as exc:
            raise RunFailure(f"the stored manifest of run {run_id} is invalid: {exc}",
                             "hand the run off again") from exc
        missing = self.blobs.missing(shas)
        if missing:
            raise RunFailure(f"{len(missing)} chunk(s) of run {run_id} are missing on this server "
                             f"(first: {missing[0]})", "hand the run off again to re-upload them")
        d = self.workspace(run_id) / ".handoff" / "bundle"
        if (d / "manifest.json").exists():
            return  # the handoff bundle as it arrived stays as it was
        for sha in shas:
            link_or_copy(self.blobs.path(sha), d / chunk_relpath(sha))
        atomic_write_json(d / "manifest.json", manifest)

    async def _cleanup_kernel(self, run: _Run) -> None:
        ex, kid = run.executor, run.kernel_id
        run.executor = None
        run.kernel_id = None
        if ex is not None:
            ex.close()
        if kid is None:
            return
        if getattr(self.app, "keep_kernel", False) and not (ex and ex.dead) and run.state is not None \
                and run.state.status in ("completed", "failed", "cancelled"):
            return  # kept for inspection (c.HandoffApp.keep_kernel)
        try:
            await ensure_async(self.kernel_manager.shutdown_kernel(kid, now=bool(ex and ex.dead)))
        except KeyError:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; nothing else to do with a kernel on its way out
            log.warning("jupyter-handoff: shutting down kernel %s failed: %s", kid, exc)

    async def _recover_crash(self, run: _Run) -> None:
        """A kernel died mid-step: restore a fresh one from the last checkpoint and redo the
        step; the second crash in the same step fails the run."""
        state = run.state
        assert state is not None
        turn = self._cut_off_turn(run)
        run.crashes[turn] = run.crashes.get(turn, 0) + 1
        if run.crashes[turn] >= MAX_CRASHES_PER_STEP:
            raise RunFailure(f"the kernel died {run.crashes[turn]} times while running step {turn + 1}; "
                             "the run stopped so it does not crash forever",
                             "look at that step's code (memory use, os._exit, native crashes); pull "
                             "the run back to continue from the last checkpoint locally")
        self._status(run, "restoring", reason="the kernel died; restoring the last checkpoint in a new kernel")
        await self._new_kernel(run, reason="kernel crash")
        how = run.crash_detail.partition("(")[2].rstrip(")")
        self._rollback_cut_off(run, "the kernel died while this step ran "
                               + (f"({how}: a crash or out of memory)" if how else "(crash or out of memory)"))
        self._status(run, "running", reason="recovered from a kernel crash")

    def _cut_off_turn(self, run: _Run) -> int:
        """Model turns before the step a crash cut off (the turns the last checkpoint holds)."""
        return max(run.ckpt_key[0], 0)

    def _checkpoint_steps(self, run_id: str) -> tuple[dict[str, Any] | None, int]:
        """The latest checkpoint's run state and its model turns (steps; messages may have
        been compacted since, so turns, not message counts, say what the checkpoint holds)."""
        manifest, _ = self.latest_manifest(run_id)
        base_run = manifest.get("run") if isinstance(manifest.get("run"), dict) else None
        return base_run, int(base_run.get("steps") or 0) if base_run else 0

    def _has_cut_off_step(self, run: _Run) -> bool:
        """True if the state holds a model turn after the latest checkpoint (it will be redone)."""
        state = run.state
        assert state is not None
        return state.steps > self._checkpoint_steps(run.id)[1]

    def _rollback_cut_off(self, run: _Run, why: str) -> None:
        """Drop a step the restored kernel never saw (after the last checkpoint) and tell the
        agent, so it redoes the step; a scripted model replays the same turn."""
        state = run.state
        assert state is not None
        base_run, base_steps = self._checkpoint_steps(run.id)
        turn = base_steps + 1
        cut = turn_index(state.messages, turn) if state.steps >= turn else None
        if cut is None:
            return
        lost = state.messages[cut]
        codes = [str(c.arguments.get("code", "")) for c in lost.tool_calls if c.name == "run_python"]
        shown = "\n\n".join(c if len(c) < 2000 else c[:2000] + "\n# ... (trimmed)" for c in codes)
        note = (f"[interrupted] Your step {turn} was cut off: {why}. The kernel was restored to the "
                "checkpoint taken before that step, so its effects are gone. Redo the step."
                + (f" Its code was:\n```python\n{shown}\n```" if shown else ""))
        state.messages = state.messages[:cut] + [Message(role="user", text=note)]
        if base_run is not None:
            try:
                base = RunState.from_dict(base_run)
                state.plan = [PlanStep(text=p.text, status=p.status) for p in base.plan]
                state.steps = base.steps
            except StateError as exc:
                log.warning("jupyter-handoff: checkpoint run state of %s unreadable: %s", run.id, exc)
        run.ckpt_key = (state.steps, len(state.messages) - 1)   # the note is news for the next checkpoint
        self._emit(run, "interrupted", reason=f"step {turn} was cut off ({why}); it will be redone",
                   step=turn)
        self._emit(run, "plan", steps=[{"text": p.text, "status": p.status} for p in state.plan])

    # -- model ----------------------------------------------------------------------------------
    def _provider(self, run: _Run) -> Any:
        from handoff_magic.agent.providers.base import ProviderError, make_provider
        state = run.state
        assert state is not None
        spec = (getattr(self.app, "model", "") or state.model or "").strip()
        if not spec:
            raise RunFailure("no model is configured for remote runs and the run names none",
                             "set c.HandoffApp.model (e.g. openai:gpt-4o) on the server")
        kind = spec.split(":", 1)[0].strip().lower()
        key_env = getattr(self.app, "model_api_key_env", "") or SDK_KEY_ENV.get(kind, "")
        api_key = os.environ.get(key_env) if key_env else None
        base_url = getattr(self.app, "model_base_url", "") or None
        try:
            provider = make_provider(spec, api_key=api_key, base_url=base_url,
                                     base_dir=self.workspace(run.id))
        except ProviderError as exc:
            raise RunFailure(f"cannot use model {spec!r} on this server: {exc.message}",
                             exc.hint or "check c.HandoffApp.model and the key in the server's environment") from exc
        run.model = spec
        return provider

    # -- per step ---------------------------------------------------------------------------------
    def _should_pause(self, run: _Run) -> bool:
        """Called by the loop (worker thread) at every step boundary: checkpoint here."""
        if run.crashed or self._stopping:
            return True
        try:
            self._after_step(run, False)
        except Exception as exc:  # a failed checkpoint must not end the run; say so in its log
            log.exception("jupyter-handoff: checkpoint of run %s failed", run.id)
            self._emit(run, "error", error=f"checkpoint failed: {type(exc).__name__}: {exc}",
                       hint="the run goes on; a crash now would resume from the previous checkpoint")
        return run.crashed or run.pause.is_set()

    def _after_step(self, run: _Run, final: bool) -> None:
        state = run.state
        assert state is not None
        if not (final and run.nb_key == (state.last_seq, state.status)):  # else: written at the end
            self._write_notebook(run)
        if run.executor is None or run.executor.dead:
            return
        if (state.steps, len(state.messages)) != run.ckpt_key:
            self._checkpoint(run, False)

    def _checkpoint(self, run: _Run, full: bool) -> dict[str, Any] | None:
        """``save_state`` inside the kernel into .handoff/ckpt (only new chunks are written),
        then ingest the new chunks into the BlobStore by hash and record the manifest."""
        try:
            taken = self._take_checkpoint(run, full)
        except TransportError as exc:
            self._emit(run, "error", error=f"checkpoint failed: {exc.message}",
                       hint="the run goes on; a crash now would resume from the previous checkpoint")
            return None
        if taken is None:
            return None
        manifest, new_bytes, total = taken
        self._emit(run, "checkpoint", bytes_new=new_bytes, bytes_total=total)
        return manifest

    def _take_checkpoint(self, run: _Run, full: bool) -> tuple[dict[str, Any], int, int] | None:
        """The checkpoint itself, stored but not yet announced: (manifest, bytes_new, bytes_total)."""
        state = run.state
        ex = run.executor
        assert state is not None and ex is not None
        data = state.to_dict()
        if not full:
            data["events"] = []  # the event log lives in SQLite; keep per-step checkpoints small
        try:  # save_state in the kernel; new chunks come back by hash (see transport.py)
            ck = self.transport.fetch_checkpoint(ex, run.id, data, self.blobs,
                                                 max_bytes=getattr(self.app, "max_bundle_bytes", None),
                                                 base=self.store.manifest(run.id, "handoff"))
        except KernelGone:
            run.crashed = True
            return None
        manifest, new_bytes = ck.manifest, ck.bytes_new
        self.store.save_manifest(run.id, "checkpoint", manifest)
        run.ckpt_key = (state.steps, len(state.messages))
        self._prune_checkpoints(run.id)
        total = sum(int(m.get("stored", 0)) for m in manifest.get("chunks", {}).values())
        return manifest, new_bytes, total

    def _prune_checkpoints(self, run_id: str, finished: bool = False) -> None:
        """Old checkpoint manifests go (the handoff one stays), so blob GC frees their chunks."""
        keep = 1 if finished else int(getattr(self.app, "keep_checkpoints", KEEP_CHECKPOINTS))
        try:
            self.store.prune_checkpoints(run_id, keep)
        except Exception:  # space is reclaimed on the next try; the run must not stop for it
            log.exception("jupyter-handoff: pruning old checkpoints of run %s failed", run_id)

    def _drop_ckpt_links(self, run_id: str) -> None:
        """A finished run's kernel-side checkpoint dir holds hard links to every chunk it ever
        saved; while they exist GC frees no disk. Its manifests live in the store."""
        ckpt = self.workspace(run_id) / ".handoff" / "ckpt"
        try:
            shutil.rmtree(ckpt)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("jupyter-handoff: could not remove %s (its chunks stay on disk): %s", ckpt, exc)

    def _checkpoint_first(self, run: _Run) -> tuple[dict[str, Any], int, int] | str | None:
        """Checkpoint (stored, not yet announced) before a question or a terminal status goes out.

        Before ``waiting_input``: a server killed while the run waits then resumes waiting on
        the SAME question (the answer continues it) instead of redoing the step behind a stale
        wait. Before ``completed``/``failed``: the terminal status stays the run's last event,
        so a client that stops following there misses nothing. Returns the checkpoint, an
        error message, or None (nothing new, or called on the event loop where it must not block)."""
        state = run.state
        if (state is None or run.executor is None or run.executor.dead or run.crashed
                or (state.steps, len(state.messages)) == run.ckpt_key or _has_running_loop()):
            return None  # nothing new since the last checkpoint (or on the event loop: no blocking)
        try:
            return self._take_checkpoint(run, False)
        except Exception as exc:  # the question still gets asked; a restart would redo the step
            log.exception("jupyter-handoff: checkpoint of run %s failed", run.id)
            return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"

    def _announce_checkpoint(self, run: _Run, taken: tuple[dict[str, Any], int, int] | str | None,
                             hint: str) -> None:
        if isinstance(taken, tuple):
            self._emit(run, "checkpoint", bytes_new=taken[1], bytes_total=taken[2])
        elif isinstance(taken, str):
            self._emit(run, "error", error=f"checkpoint failed: {taken}", hint=hint)

    def _checkpoint_before_end(self, run: _Run, event: Event) -> None:
        """The final checkpoint is announced BEFORE the terminal status ``event`` (not yet
        committed): the status is renumbered after it. Meanwhile the store still shows the
        previous status, so a crash in between resumes the run rather than ending it short."""
        state = run.state
        assert state is not None
        taken = self._checkpoint_first(run)
        if taken is None:
            return
        if not state.events or state.events[-1] is not event:  # not ours to reorder: announce after
            log.warning("jupyter-handoff: run %s: terminal status is not the newest event", run.id)
            return
        state.events.pop()
        final = state.status
        state.status = next((str(e.data["status"]) for e in reversed(state.events)
                             if e.type == "status" and e.data.get("status")), "running")
        try:
            self._announce_checkpoint(run, taken, "the run ended; pulling it back restores the "
                                      "previous checkpoint")
        finally:
            state.status = final
            event.seq = state.last_seq + 1
            state.events.append(event)

    def _write_notebook(self, run: _Run) -> "Future[None] | None":
        """Rewrite result.ipynb from a snapshot of the run's state.

        Building and validating the notebook costs milliseconds per step, so on the event loop
        it goes to a worker thread (the returned future; errors are reported, never raised).
        Snapshots are numbered when asked for and written under the run's lock, so an older
        notebook never overwrites a newer one."""
        state = run.state
        if state is None:
            return None
        snap = copy.copy(state)  # the lists are copied, the loop may go on appending to them
        snap.events, snap.messages, snap.plan = list(state.events), list(state.messages), list(state.plan)
        model = run.model or getattr(self.app, "model", "") or state.model
        with run.nb_lock:
            run.nb_gen += 1
            gen = run.nb_gen
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._write_snapshot(run, snap, model, gen, None)
            return None
        return self._pool.submit(self._write_snapshot, run, snap, model, gen, loop)

    def _write_snapshot(self, run: _Run, snap: RunState, model: str, gen: int,
                        loop: asyncio.AbstractEventLoop | None) -> None:
        with run.nb_lock:
            if gen <= run.nb_written:
                return  # a newer snapshot is already on disk
            try:
                write_for_state(self.workspace(run.id) / "result.ipynb", snap, model=model)
            except Exception as exc:  # the notebook is a report: never let it stop the run, but say so
                log.exception("jupyter-handoff: writing result.ipynb of %s failed", run.id)
                report = functools.partial(
                    self._emit, run, "error", error=f"result.ipynb could not be written: {exc}",
                    hint="the run goes on; its events are complete in the status page")
                if loop is None:
                    report()
                else:  # the event log is the loop's: tell it there
                    loop.call_soon_threadsafe(report)
                return
            run.nb_written = gen
            run.nb_key = (snap.last_seq, snap.status)

    # -- events -----------------------------------------------------------------------------------
    def _on_event_cb(self, run: _Run) -> Callable[[RunState, Event], None]:
        def on_event(state: RunState, event: Event) -> None:
            self._persist(run, event)
        return on_event

    def _persist(self, run: _Run, event: Event) -> None:
        """Commit the event (before the loop goes on) and the state; notify on key statuses."""
        if self._stopping:
            return  # the server is going down: the store keeps the last committed step
        state = run.state
        assert state is not None
        if event.type == "tool_result" and event.data.get("name") == "run_python" \
                and run.last_exec_count is not None:
            event.data["execution_count"] = run.last_exec_count
            run.last_exec_count = None
        asked = self._checkpoint_first(run) if event.type == "question" else None
        if event.type == "status" and event.data.get("status") in TERMINAL_STATUSES \
                and not _has_running_loop():  # the loop's own ends go through _end
            self._checkpoint_before_end(run, event)
            self._write_notebook(run)  # the end is in result.ipynb before anyone is told
        stored = self.store.append_event(run.id, event.type, event.data)
        if stored.seq != event.seq:
            log.debug("jupyter-handoff: run %s event renumbered %d -> %d", run.id, event.seq, stored.seq)
            event.seq = stored.seq
        event.time = stored.time
        self.store.save_state(state)
        if event.type == "status" and event.data.get("status") in NOTIFY_ON:
            notifier = getattr(self.app, "notifier", None)
            if notifier is not None:
                try:
                    notifier.enqueue(run.id, event.data["status"])
                except Exception:
                    log.exception("jupyter-handoff: queueing a notification for %s failed", run.id)
        # announced right after the question it made safe
        self._announce_checkpoint(run, asked, "the run goes on; a server restart now would redo "
                                  "the question's step")

    def _emit(self, run: _Run, type: str, **data: Any) -> Event:
        assert run.state is not None
        event = run.state.emit(type, **data)
        self._persist(run, event)
        return event

    def _status(self, run: _Run, status: str, **data: Any) -> None:
        assert run.state is not None
        event = run.state.set_status(status, **data)
        if event is not None:
            self._persist(run, event)

    def _set_status_direct(self, state: RunState, status: str, reason: str) -> None:
        """Status change for a run no task drives (not started, or already gone)."""
        run = _Run(id=state.id, state=state)
        state.question = None
        self._status(run, status, reason=reason)

    async def _fail(self, run: _Run, message: str, hint: str) -> None:
        if self._stopping:
            return
        state = run.state
        if state is None:
            try:
                state = run.state = self.store.get_state(run.id)
            except KeyError:
                return
        if state.is_terminal:
            return
        state.error = message
        self._emit(run, "error", error=message, hint=hint)
        await self._end(run, "failed", reason=message)

    def _public_url(self) -> str:
        try:
            return str(self.app.get_public_url())
        except Exception:  # noqa: BLE001 - no public URL known: links stay relative
            return ""

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def gc_blobs(store: Any, blobs: Any, *, min_age: float = 3600.0) -> dict[str, int]:
    """Remove chunks no manifest references (and stale upload temp files), sparing anything
    younger than ``min_age`` seconds: an upload in progress is not referenced yet."""
    prune = getattr(store, "prune_checkpoints", None)
    if prune is not None:  # runs from before checkpoints were pruned as they went
        for r in store.list_runs():
            finished = r.get("status") in TERMINAL_STATUSES
            prune(r["id"], 1 if finished else KEEP_CHECKPOINTS)
    referenced = store.referenced_chunks()
    now = time.time()
    deleted = kept = freed = 0
    root = Path(blobs.root)
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sub.iterdir():
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < min_age:
                kept += 1
                continue
            if f.name.startswith(".tmp-") or (f.name not in referenced and is_sha(f.name)):
                f.unlink(missing_ok=True)
                deleted += 1
                freed += st.st_size
            else:
                kept += 1
    return {"deleted": deleted, "kept": kept, "bytes_freed": freed}


def main(argv: list[str] | None = None) -> int:
    """``python -m jupyter_server_ext.runner gc --data-dir DIR [--min-age SECONDS]``."""
    import argparse
    from .store import BlobStore, RunStore
    p = argparse.ArgumentParser(prog="python -m jupyter_server_ext.runner",
                                description="jupyter-handoff server maintenance")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gc", help="delete uploaded chunks no run references")
    g.add_argument("--data-dir", required=True, help="the server's c.HandoffApp.data_dir")
    g.add_argument("--min-age", type=float, default=3600.0, help="spare chunks younger than this (s)")
    args = p.parse_args(argv)
    data = Path(args.data_dir).expanduser()
    if not (data / "handoff.sqlite").exists():
        p.error(f"{data} holds no handoff.sqlite; pass the server's HandoffApp.data_dir")
    store = RunStore(data / "handoff.sqlite")
    try:
        print(json.dumps(gc_blobs(store, BlobStore(data / "blobs"), min_age=args.min_age)))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
