"""One run driven from restore to end: the per-run state the manager keeps in memory
(``ActiveRun``), the slots runs wait for (``Slots``), and ``RunDriver``, which restores the
bundle in a kernel, runs the agent loop step by step, recovers from kernel crashes and ends the
run. It calls its collaborators one way (Journal, Checkpoints, KernelPool, transport) and they
never call back. The order of things at a boundary is spelled out where it happens:

* after a step: result.ipynb, then a checkpoint (``_after_step``);
* before a question: checkpoint (held), ``question``, ``checkpoint``, ``status: waiting_input``;
* at the end: checkpoint, then the terminal status (the Journal writes result.ipynb before it
  commits a terminal status); a pull: full checkpoint, ``pull``, ``status: pulled``.

About 400 lines because the steps of one run are meant to be read top to bottom in one place.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from handoff_magic.agent.loop import AgentLoop
from handoff_magic.agent.providers import Provider, ProviderError, make_provider
from handoff_magic.state import RunState

from ..blobs import BlobStore
from ..errors import KernelGone, RunFailure, TransportError
from ..notebook import ResultNotebook
from ..settings import HandoffSettings
from ..store import RunStore
from ..workspace import Workspace
from .checkpoints import Checkpoints, Taken
from .executor import KernelExecutor
from .journal import Journal, Outcome
from .kernel_rpc import kernel_result
from .kernels import Kernel, KernelPool
from .recovery import checkpoint_key, has_cut_off_step, held_key, roll_back
from .transport import BundleTransport, SendStopped

log = logging.getLogger(__name__)

SDK_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
MAX_CRASHES_PER_STEP = 2
MAX_REPORT_VARIABLES = 500  # rows of the restore report kept in its event
RESTORE_TIMEOUT = 3600.0
CKPT_HINT = "the run goes on; a crash now would resume from the previous checkpoint"
END_CKPT_HINT = "the run ended; pulling it back restores the previous checkpoint"
KEPT_STATUSES = ("completed", "failed", "cancelled")   # c.HandoffApp.keep_kernel keeps these kernels
InThread = Callable[..., Awaitable[Any]]


@dataclass
class ActiveRun:
    """What the manager knows about one active run (in memory; the store has the rest)."""
    id: str
    task: asyncio.Task[None] | None = None
    state: RunState | None = None
    journal: Journal | None = None
    kernel: Kernel | None = None
    model: str = ""
    pause: threading.Event = field(default_factory=threading.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    pull_requested: bool = False
    crashed: bool = False
    crash_detail: str = ""                # how the kernel ended, e.g. "killed by SIGKILL"
    crashes: dict[int, int] = field(default_factory=dict)
    ckpt_key: tuple[int, int] = (-1, -1)  # (steps, len(messages)) at the last checkpoint (recovery.py)
    pull_result: asyncio.Future[dict[str, Any]] | None = None
    holds_slot: bool = False
    stuck_since: float | None = None      # the last progress time a 'stuck' notice was sent for

    @property
    def executor(self) -> KernelExecutor | None:
        return self.kernel.executor if self.kernel is not None else None

    @property
    def log(self) -> Journal:
        assert self.journal is not None
        return self.journal


class _LoopExecutor:
    """The Executor the loop sees: forwards to the run's current kernel; flags a crash so the
    loop pauses at the step boundary and the manager can restore a fresh kernel."""

    def __init__(self, run: ActiveRun, memory_limit: int) -> None:
        self.run = run
        self.memory_limit = memory_limit

    def execute(self, code: str, timeout: float | None = None) -> Any:
        ex = self.run.executor
        assert ex is not None
        res = ex.execute(code, timeout)
        self.run.log.exec_count = res.execution_count
        if res.status == "dead":
            self.run.crashed = True
            self.run.crash_detail = str((res.error or {}).get("evalue", ""))
        elif (res.error or {}).get("ename") == "MemoryError":  # past c.HandoffApp.kernel_memory_limit
            # the agent sees the MemoryError as the step's result and the kernel lives on
            limit = self.memory_limit
            self.run.log.emit("error", error="the run's kernel ran out of memory" + (
                f" (limit {limit / 2**30:.1f} GiB)" if limit else "") + "; the step failed with MemoryError",
                hint="use less memory in the step (smaller pieces, fewer copies), or raise "
                     "c.HandoffApp.kernel_memory_limit on the server")
        return res

    def interrupt(self) -> None:
        if self.run.executor is not None:
            self.run.executor.interrupt()


class Slots:
    """At most ``limit`` runs execute at once; a run waiting for an answer holds none."""

    def __init__(self, limit: int, closing: threading.Event) -> None:
        self._sem = asyncio.Semaphore(max(1, limit))
        self._closing = closing

    async def acquire(self, run: ActiveRun) -> bool:
        """Wait for a free slot; False if woken for cancel/pull/stop first."""
        while True:
            if run.cancel_requested or run.pull_requested or self._closing.is_set():
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

    def release(self, run: ActiveRun) -> None:
        if run.holds_slot:
            run.holds_slot = False
            self._sem.release()


class RunDriver:
    """Drives runs (one ``drive`` call per run task); shared by all runs of a manager."""

    def __init__(self, settings: HandoffSettings, store: RunStore, blobs: BlobStore, workspace: Workspace,
                 transport: BundleTransport, checkpoints: Checkpoints, kernels: KernelPool, slots: Slots,
                 *, in_thread: InThread, closing: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.ws = workspace
        self.transport = transport
        self.checkpoints = checkpoints
        self.kernels = kernels
        self.slots = slots
        self._in_thread = in_thread
        self._closing = closing

    async def drive(self, run: ActiveRun) -> None:
        state, journal = run.state, run.log
        assert state is not None
        journal.notebook = ResultNotebook(self.ws.result_notebook(run.id))
        resumed = state.status != "queued"
        was_waiting = state.status == "waiting_input"
        if was_waiting and has_cut_off_step(state, self.checkpoints.latest(run.id)[0]):
            # waiting on a question whose step no checkpoint holds: that step is redone, so
            # the wait is stale; answers are refused (409) until the question is asked again
            was_waiting = False
            state.question = None
            journal.status("restoring", reason="the server stopped before the question's step was "
                           "saved; redoing that step, it asks again")
        elif not was_waiting:
            journal.status("restoring", reason="resuming after a server restart" if resumed
                           else "restoring the handed-off state in a fresh kernel")
        if not await self._new_kernel(run, reason="server restart" if resumed else "handoff"):
            await self.end_requested(run)   # cancelled or pulled before its state was in a kernel
            return
        self._roll_back(run, "the Jupyter Server stopped while this step ran")
        cap = self.settings.max_tokens_per_run
        if cap > 0:  # the server's budget bounds the run's own
            state.budgets.max_tokens = min(cap, state.budgets.max_tokens or cap)
        loop = AgentLoop(state, self._provider(run), _LoopExecutor(run, self.settings.memory_limit_bytes()),
                         on_event=journal.on_loop_event,
                         should_pause=lambda: self._should_pause(run),
                         before_stop=lambda why: self._before_stop(run, why),
                         exec_timeout=self.settings.exec_timeout or None,
                         context_tokens=self.settings.context_tokens or None)
        answer: str | None = None
        if state.status == "waiting_input":
            answer = await self._wait_answer(run)
            if answer is None:
                await self.end_requested(run)
                return
        while True:
            if self._closing.is_set():
                return
            if run.cancel_requested or run.pull_requested:
                await self.end_requested(run)
                return
            await self._in_thread(loop.run, answer)
            answer = None
            if self._closing.is_set():
                return
            if run.crashed:
                await self._recover_crash(run)
                continue
            await self._in_thread(self._after_step, run)
            if run.crashed:  # died during the checkpoint
                await self._recover_crash(run)
                continue
            if run.cancel_requested or run.pull_requested:
                await self.end_requested(run)
                return
            if state.status == "paused":  # budget: ask the user whether to go on
                reason = next((e.data.get("reason") for e in reversed(state.events)
                               if e.type == "status"), "") or "paused"
                state.question = f"The run paused: {reason}. Answer 'continue' to go on."
                journal.emit("question", question=state.question)
                journal.status("waiting_input", reason="paused; waiting for the user")
            if state.status == "waiting_input":
                answer = await self._wait_answer(run)
                if answer is None:
                    await self.end_requested(run)
                    return
                continue
            if state.is_terminal:
                return
            raise RunFailure(f"the agent loop stopped with status {state.status!r}",
                             "this is a bug in jupyter-handoff; pull the run back to continue locally")

    async def _wait_answer(self, run: ActiveRun) -> str | None:
        """Wait (without holding a run slot) for an answer; None if cancelled/pulled/stopping."""
        self.slots.release(run)
        while True:
            if run.cancel_requested or run.pull_requested or self._closing.is_set():
                return None
            text = self.store.take_answer(run.id)
            if text is not None:
                break
            run.wake.clear()
            await run.wake.wait()
        if not await self.slots.acquire(run):
            self.store.put_answer(run.id, text)  # keep it for whoever resumes the run
            return None
        return text

    async def end_requested(self, run: ActiveRun) -> None:
        """A pull: full checkpoint, ``pull``, ``pulled``. A cancel: ``cancelled``."""
        if self._closing.is_set():
            return
        assert run.state is not None
        if run.pull_requested:
            manifest: dict[str, Any] | None = None
            if run.executor is not None and not run.executor.dead:
                manifest = await self._in_thread(self._checkpoint, run, True)
            if manifest is None:
                manifest = self.checkpoints.latest(run.id)[0]
            run.log.emit("pull", server=self.ws.public_url(), remote_id=run.id)
            await self._end(run, "pulled", reason="pulled back to a local kernel")
            if run.pull_result is not None and not run.pull_result.done():
                run.pull_result.set_result(manifest)
        elif run.cancel_requested:
            run.state.question = None
            await self._end(run, "cancelled", reason="cancelled by the user")

    async def _end(self, run: ActiveRun, status: str, **data: Any) -> None:
        """Commit the terminal status off the event loop (the journal writes result.ipynb first)."""
        await self._in_thread(run.log.status, status, **data)

    async def fail(self, run: ActiveRun, message: str, hint: str) -> None:
        """End the run as ``failed``: the error (with what to do), then the status."""
        if self._closing.is_set() or run.state is None or run.state.is_terminal:
            return
        run.state.error = message
        run.log.emit("error", error=message, hint=hint)
        await self._end(run, "failed", reason=message)

    async def _abandon_kernel(self, run: ActiveRun) -> bool:
        """Give back a kernel the run no longer needs before it restored anything (False: no
        kernel); the spare it may have adopted is replaced, as after a restore."""
        await self.release_kernel(run)
        self.kernels.refill()
        return False

    async def _new_kernel(self, run: ActiveRun, reason: str) -> bool:
        """A fresh kernel in the workspace with the latest manifest restored in it; False (and no
        kernel) if the run was cancelled or pulled before the restore began: its state is still
        the latest stored manifest, so copying the bundle and restoring it would be work for
        nothing (a 1 GB bundle: seconds of CPU the pull back that follows needs)."""
        await self.release_kernel(run)
        t0 = time.perf_counter()
        manifest, kind = self.checkpoints.latest(run.id)
        # a spare adopted, or a kernel booting (~0.5 s) while the bundle is checked and linked
        # into the workspace (the workspace is created by acquire)
        run.kernel = kernel = await self.kernels.acquire(
            run.id, lambda: self._in_thread(self.checkpoints.materialise, run.id, manifest))
        self.transport.attach(run.id, kernel.root)
        run.crashed = False
        t_ready = time.perf_counter()

        def stop() -> bool:
            return run.cancel_requested or run.pull_requested

        try:  # the kernel may not share our disk (gateways): the transport brings the bundle
            if stop():
                raise SendStopped("ended before its bundle was sent")
            kb = await self._in_thread(self.transport.send_bundle, kernel.executor, run.id, manifest, self.blobs,
                                       stop=stop)
        except SendStopped:
            log.info("jupyter-handoff: run %s: %s requested while its kernel was prepared; not restoring",
                     run.id, "pull" if run.pull_requested else "cancel")
            return await self._abandon_kernel(run)
        except TransportError as exc:
            raise RunFailure(f"sending the bundle to the kernel failed: {exc.message}", exc.hint or "") from exc
        res = await self._in_thread(kernel.executor.execute, self.transport.restore_code(kb), RESTORE_TIMEOUT,
                                    silent=True, store_history=False)
        if res.status != "ok" and stop():   # a cancel interrupts the restore: not a failure
            return await self._abandon_kernel(run)
        if res.status != "ok":
            err = res.error or {}
            raise RunFailure(f"restoring the {kind} bundle in a fresh kernel failed: "
                             f"{err.get('ename', res.status)}: {err.get('evalue', '')}",
                             "the bundle may need packages this server lacks; install them here and "
                             "hand off again, or pull the run back")
        try:
            report = dict(kernel_result(res))
        except TransportError as exc:
            raise RunFailure(f"restoring in a fresh kernel sent no report ({exc.message})",
                             "see the Jupyter Server log") from exc
        log.info("jupyter-handoff: run %s: kernel ready in %.2fs, bundle sent and restored in %.2fs (%s)",
                 run.id, t_ready - t0, time.perf_counter() - t_ready, reason)
        report.pop("run", None)  # the run state travels separately; keep the event small
        variables = report.get("variables")
        if isinstance(variables, list) and len(variables) > MAX_REPORT_VARIABLES:
            report["variables"] = variables[:MAX_REPORT_VARIABLES]
            report["variables_not_listed"] = len(variables) - MAX_REPORT_VARIABLES
        report["reason"] = reason
        report["source"] = kind
        run.log.emit("restore", report=report)
        run.ckpt_key = held_key(manifest)
        self.kernels.refill()  # the next spare boots while the model thinks, not during the restore
        await self._in_thread(run.log.write_notebook)
        return True

    async def release_kernel(self, run: ActiveRun) -> None:
        kernel, run.kernel = run.kernel, None
        if kernel is not None:
            self.transport.attach(run.id, None)
            keep = self.settings.keep_kernel and run.state is not None and run.state.status in KEPT_STATUSES
            await self.kernels.release(kernel, keep=keep)

    async def _recover_crash(self, run: ActiveRun) -> None:
        """A kernel died mid-step: restore a fresh one from the last checkpoint and redo the
        step; the second crash in the same step fails the run."""
        assert run.state is not None
        turn = max(run.ckpt_key[0], 0)   # model turns before the step the crash cut off
        run.crashes[turn] = run.crashes.get(turn, 0) + 1
        if run.crashes[turn] >= MAX_CRASHES_PER_STEP:
            raise RunFailure(f"the kernel died {run.crashes[turn]} times while running step {turn + 1}; "
                             "the run stopped so it does not crash forever",
                             "look at that step's code (memory use, os._exit, native crashes); pull "
                             "the run back to continue from the last checkpoint locally")
        run.log.status("restoring", reason="the kernel died; restoring the last checkpoint in a new kernel")
        await self._new_kernel(run, reason="kernel crash")
        how = run.crash_detail.partition("(")[2].rstrip(")")
        self._roll_back(run, "the kernel died while this step ran "
                        + (f"({how}: a crash or out of memory)" if how else "(crash or out of memory)"))
        run.log.status("running", reason="recovered from a kernel crash")

    def _roll_back(self, run: ActiveRun, why: str) -> None:
        """Drop a step the restored kernel never saw and tell the agent (recovery.py)."""
        assert run.state is not None
        done = roll_back(run.state, self.checkpoints.latest(run.id)[0], why)
        if done is None:
            return
        run.ckpt_key = (run.state.steps, len(run.state.messages) - 1)  # the note is news for the next checkpoint
        run.log.emit("interrupted", reason=f"step {done.turn} was cut off ({why}); it will be redone", step=done.turn)
        run.log.emit("plan", steps=[{"text": p.text, "status": p.status} for p in run.state.plan])

    def _provider(self, run: ActiveRun) -> Provider:
        assert run.state is not None
        spec = (self.settings.model or run.state.model or "").strip()
        if not spec:
            raise RunFailure("no model is configured for remote runs and the run names none",
                             "set c.HandoffApp.model (e.g. openai:gpt-4o) on the server")
        kind = spec.split(":", 1)[0].strip().lower()
        key_env = self.settings.model_api_key_env or SDK_KEY_ENV.get(kind, "")
        try:
            provider = make_provider(spec, api_key=os.environ.get(key_env) if key_env else None,
                                     base_url=self.settings.model_base_url or None,
                                     base_dir=self.ws.run_dir(run.id))
        except ProviderError as exc:
            raise RunFailure(f"cannot use model {spec!r} on this server: {exc.message}",
                             exc.hint or "check c.HandoffApp.model and the key in the server's environment") from exc
        run.model = spec
        return provider

    def _should_pause(self, run: ActiveRun) -> bool:
        """Called by the loop at every step boundary: save the step here."""
        if run.crashed or self._closing.is_set():
            return True
        self._after_step(run)
        return run.crashed or run.pause.is_set()

    def _after_step(self, run: ActiveRun) -> None:
        """After a step, in this order: result.ipynb, then a checkpoint (if anything is new)."""
        run.log.write_notebook()
        self._checkpoint(run, False)

    def _before_stop(self, run: ActiveRun, why: str) -> None:
        """The loop is about to ask a question or end: save the step first. An end's checkpoint
        is announced now (the terminal status follows it); a question's right after the question."""
        if self._closing.is_set():
            return
        outcome = self._take(run, full=False)
        if why == "question":
            run.log.announce_after_question(outcome)
        else:
            run.log.announce(outcome, END_CKPT_HINT)

    def _checkpoint(self, run: ActiveRun, full: bool) -> dict[str, Any] | None:
        """Take a checkpoint and announce it (or its failure); its manifest, or None."""
        outcome = self._take(run, full=full)
        run.log.announce(outcome, CKPT_HINT)
        return outcome.manifest if isinstance(outcome, Taken) else None

    def _take(self, run: ActiveRun, *, full: bool) -> Outcome:
        """A checkpoint, stored but not announced; None if the kernel is gone or (unless
        ``full``) nothing is new since the last one; the error text if it failed."""
        state, ex = run.state, run.executor
        if state is None or ex is None or ex.dead or run.crashed:
            return None
        if not full and checkpoint_key(state) == run.ckpt_key:
            return None
        try:
            taken = self.checkpoints.take(ex, state, full=full)
        except KernelGone:
            run.crashed = True
            return None
        except TransportError as exc:
            return exc.message
        except Exception as exc:  # the run goes on; a restart would redo the step
            log.exception("jupyter-handoff: checkpoint of run %s failed", run.id)
            return f"{type(exc).__name__}: {exc}"
        run.ckpt_key = checkpoint_key(state)
        return taken
