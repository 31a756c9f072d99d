"""KernelPool: the kernels runs execute in, from the server's own kernel manager (so JupyterHub
and Enterprise Gateway set-ups work).

A run's kernel starts in its workspace with a scrubbed environment (no token, no model key, no
secret-named variable, nor any variable holding one of those values), autorestart off (a crashed
kernel is replaced from the last checkpoint, never by a blank restart), and its kernel_info
seeded into Jupyter Server's cache so browsers can attach while it is busy.

Warm spares (``c.HandoffApp.warm_kernels``): a spare kernel boots exactly like a run's (same
kernel spec, so the same sandbox, mounts, limits and scrubbed env) in a fresh, empty, private
workspace of its own (``<runs>/.spare-XXXX``, ``Workspace.new_spare_dir``). A fresh handoff
adopts it: the spare's directory is *renamed* to the run's workspace before the bundle is
materialised into it, so the kernel never saw anything but that empty directory and, from then
on, only its own run. A bind mount follows the directory, not its name: inside the sandbox the
adopted workspace keeps the path the spare was booted on, which is why a ``Kernel`` carries
``root``, the workspace as the kernel sees it (the transport passes that path to the kernel). A
spare serves one run and goes with it (never reused); the next one boots in the background
(``refill``, called by the driver once the restore is done). Runs whose workspace already exists
(resumed after a restart, a crashed kernel replaced) start a kernel of their own in it.

Which kernel a run gets (kernel spec, provisioner, launch arguments) is decided in one place,
``KernelPool.launch_options``: the seam for a sandboxed provisioner.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jupyter_core.utils import ensure_async

from handoff_magic.secrets import is_secret_name

from ..errors import RunFailure
from ..settings import HandoffSettings
from ..workspace import Workspace, remove_tree
from .executor import KernelExecutor
from .kernel_rpc import check, kernel_call, kernel_result
from .sandbox import SandboxState, bundle_view_dir

log = logging.getLogger(__name__)
DROP_ENV = frozenset({"JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN", "JUPYTER_PASSWORD",
                      "HANDOFF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "JPY_SESSION_NAME"})
INLINE_MPL = "module://matplotlib_inline.backend_inline"
WARM_IMPORT_TIMEOUT = 120.0
RESTART_SETTLE = 15.0   # seconds a start or restart under way may take to finish before a shutdown
BOOT_QUIET = 0.5        # a spare boots once chunk transfers have paused this long (seconds) ...
BOOT_DEFER_MAX = 30.0   # ... or after this long at most, or at once when a run wants it
# what a spare loads ahead of its run (a kernel call: nothing is bound in the run's namespace);
# modules this server lacks are skipped
_WARM_UP = """
import importlib
missing = []
for name in a['modules']:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
return missing
"""
RESTORE_MODULES = ("handoff_magic", "handoff_magic.snapshot.restore")
T = TypeVar("T")
InThread = Callable[[Callable[[], T]], Awaitable[T]]


@dataclass
class Kernel:
    """A run's kernel: its id in the kernel manager, the executor talking to it, and ``root``,
    the run's workspace as the kernel sees it (its cwd; see the module docstring)."""
    id: str
    executor: KernelExecutor
    root: str


@dataclass
class _Spare:
    """A booted spare and its own empty workspace (the run's, once adopted)."""
    kernel: Kernel
    workspace: Path


async def shutdown_settled(kernel_manager: Any, kernel_id: str, *, now: bool) -> None:
    """Shut a kernel down, first letting a start or restart that is under way finish.

    Why: while one runs (a dead kernel being restarted by its restarter), ``km.ready`` is a
    pending future, and jupyter_client 8's ``MultiKernelManager.shutdown_kernel`` then fails
    with ``InvalidStateError: Exception is not set``, leaving the kernel running. If it does not
    settle in time, the kernel's own manager stops it and the multi-kernel manager forgets it."""
    km = kernel_manager.get_kernel(kernel_id)
    ready = getattr(km, "ready", None)
    if isinstance(ready, Future):
        ready = asyncio.wrap_future(ready)
    if isinstance(ready, asyncio.Future) and not ready.done():
        await asyncio.wait([ready], timeout=RESTART_SETTLE)
        if not ready.done():
            log.warning("jupyter-handoff: kernel %s still starting after %.0fs; stopping it", kernel_id,
                        RESTART_SETTLE)
            await ensure_async(km.shutdown_kernel(now=True))
            kernel_manager.remove_kernel(kernel_id)
            return
    await ensure_async(kernel_manager.shutdown_kernel(kernel_id, now=now))


class KernelPool:
    """Starts, hands out and shuts down run kernels (one-way: the manager and driver call it)."""

    def __init__(self, settings: HandoffSettings, kernel_manager: Any, workspace: Workspace, *,
                 in_thread: InThread[Any], sandbox: SandboxState | None = None, server_token: str = "",
                 warm_allowed: bool = True, transfers_idle: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.views = sandbox.views if sandbox is not None else None   # kernels' bundle views, if any
        self.kernel_manager = kernel_manager
        self.workspace = workspace
        self.server_token = server_token
        self._in_thread = in_thread
        # only on a shared disk (adoption renames a directory) and where runs are not refused
        self._warm_allowed = warm_allowed and not (sandbox is not None and sandbox.problem)
        self._sandboxed = sandbox is not None and sandbox.mode == "bwrap"
        self._warm: asyncio.Future[_Spare] | None = None
        # seconds since the server last moved chunk bytes (a pull back's GETs, a handoff's PUTs):
        # a kernel boot costs about a CPU-second, which a 1 GB pull back on two cores would share
        self._transfers_idle = transfers_idle
        self._wanted: asyncio.Event | None = None   # set when a run waits for the spare
        self._stopping = False

    # -- what a run's kernel is ------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The server's environment minus anything secret: tokens, model keys, secret names,
        and any variable whose value equals one of those."""
        secret_vals: set[str] = set()
        key_env = self.settings.model_api_key_env
        drop = set(DROP_ENV) | ({key_env} if key_env else set())
        for name in drop:
            if os.environ.get(name):
                secret_vals.add(os.environ[name])
        if self.server_token:
            secret_vals.add(self.server_token)
        for name, value in os.environ.items():
            if is_secret_name(name) and value:
                secret_vals.add(value)
        env = {k: v for k, v in os.environ.items()
               if k not in drop and not is_secret_name(k) and v not in secret_vals}
        if not env.get("MPLBACKEND", "").startswith("module://"):
            env["MPLBACKEND"] = INLINE_MPL  # kernels are interactive, whatever the server uses
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def launch_options(self, path: str) -> dict[str, Any]:
        """``start_kernel`` arguments for a kernel whose workspace is Jupyter path ``path`` (a
        run's, or a spare's). The sandbox's kernel spec (its provisioner) when there is one;
        never unisolated unasked."""
        if self.sandbox is not None and self.sandbox.problem:  # c.HandoffApp.sandbox
            raise RunFailure(self.sandbox.problem, self.sandbox.hint)
        kernel_name = self.sandbox.kernel_name if self.sandbox is not None else self.settings.kernel_name
        return {"path": path, "kernel_name": kernel_name, "env": self.env()}

    # -- lifecycle -------------------------------------------------------------------------------
    async def acquire(self, run_id: str, prepare: Callable[[], Awaitable[Any]]) -> Kernel:
        """A ready kernel in ``run_id``'s workspace, with ``prepare()`` (the bundle checked and
        linked into the workspace) done; a ``prepare`` error comes before a kernel's.

        A run without a workspace yet (a fresh handoff) adopts the live spare if there is one,
        before ``prepare`` writes anything; otherwise a kernel boots while ``prepare`` runs."""
        ws = self.workspace.run_dir(run_id)
        kernel = await self._adopt(ws)
        if kernel is not None:
            try:
                await prepare()
            except BaseException:
                await self.release(kernel)
                raise
        else:
            ws.mkdir(parents=True, exist_ok=True)
            kernel = await self._start_alongside(self.workspace.api_path(run_id), str(ws),
                                                 asyncio.ensure_future(prepare()))
        self._seed_kernel_info(kernel)
        return kernel

    async def release(self, kernel: Kernel, *, keep: bool = False) -> None:
        """Close the executor and shut the kernel down (``keep``: leave it for inspection)."""
        kernel.executor.close()
        if keep and not kernel.executor.dead:
            return
        try:
            await shutdown_settled(self.kernel_manager, kernel.id, now=kernel.executor.dead)
        except KeyError:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; nothing else to do with a kernel on its way out
            log.warning("jupyter-handoff: shutting down kernel %s failed: %s", kernel.id, exc)
        self._drop_view(kernel.root)

    def remove_stale_spares(self) -> None:
        """At start: drop the empty spare workspaces a killed server left (never adopted: a
        spare is only ever adopted by the server that booted it), and every bundle view (no
        kernel that had one outlives its server: they die with it, ``--die-with-parent``)."""
        for d in self.workspace.spare_dirs():
            try:
                d.rmdir()
            except OSError as exc:
                log.warning("jupyter-handoff: leaving spare workspace %s (%s)", d, exc)
        if self.views is not None and self.views.is_dir():
            for view in self.views.iterdir():
                self._drop_view(view.name)

    def _drop_view(self, kernel_root: str) -> None:
        """A kernel's bundle view (links to stored chunks) goes with the kernel: its links would
        keep chunks on disk after the blob store collected them."""
        if self.views is not None:
            remove_tree(bundle_view_dir(self.views, kernel_root), "its links to stored chunks")

    def refill(self) -> None:
        """Start booting a spare if one is wanted and none is there (or booting)."""
        if self.settings.warm_kernels > 0 and self._warm_allowed and not self._stopping and self._warm is None:
            self._warm = asyncio.ensure_future(self._boot_warm())
            self._warm.add_done_callback(_log_boot_failure)

    async def stop(self) -> None:
        """No more spares; the one booted (or booting) goes, with its workspace."""
        self._stopping = True
        warm, self._warm = self._warm, None
        if warm is None:
            return
        if not warm.done():
            warm.cancel()
        got = (await asyncio.gather(warm, return_exceptions=True))[0]
        if isinstance(got, _Spare):
            await self._discard(got)

    # -- steps -----------------------------------------------------------------------------------
    async def _start(self, path: str) -> tuple[str, asyncio.Future[KernelExecutor]]:
        """Start a kernel in Jupyter path ``path``, autorestart off; its id and a future of its
        ready executor."""
        kid = await ensure_async(self.kernel_manager.start_kernel(**self.launch_options(path)))
        km = self.kernel_manager.get_kernel(kid)
        try:  # we recover crashed kernels ourselves (from the checkpoint), not by a blank restart
            km.stop_restarter()
            km.autorestart = False
        except Exception as exc:  # noqa: BLE001 - logged; the run goes on with the restarter on
            log.warning("jupyter-handoff: could not disable autorestart of kernel %s: %s", kid, exc)
        loop = asyncio.get_running_loop()
        ready = asyncio.ensure_future(self._in_thread(
            lambda: KernelExecutor(self.kernel_manager, kid, loop, default_timeout=self.settings.exec_timeout)))
        return kid, ready

    async def _start_alongside(self, path: str, root: str, meanwhile: asyncio.Future[Any]) -> Kernel:
        try:
            kid, ready = await self._start(path)
        except BaseException:
            await asyncio.gather(meanwhile, return_exceptions=True)  # no orphaned task
            raise
        done: tuple[Any, Any] = await asyncio.gather(meanwhile, ready, return_exceptions=True)
        checked, executor = done
        if isinstance(executor, KernelExecutor) and not isinstance(checked, BaseException):
            return Kernel(kid, executor, root)
        if isinstance(executor, KernelExecutor):
            executor.close()
        await self._shutdown_quietly(kid)
        raise checked if isinstance(checked, BaseException) else executor

    async def _boot_warm(self) -> _Spare:
        """A spare kernel on an empty workspace of its own, with handoff_magic's restore and
        ``c.HandoffApp.warm_imports`` imported, so the next handoff skips kernel start-up and
        those imports (~0.5 s and ~1 s for pandas, far more on a loaded machine)."""
        await self._until_transfers_pause()
        ws = self.workspace.new_spare_dir()
        kid = ""
        try:
            kid, ready = await self._start(self.workspace.spare_api_path(ws))
            ex = await ready
            modules = [*RESTORE_MODULES, *self.settings.warm_imports]
            res = await self._in_thread(lambda: ex.execute(kernel_call(_WARM_UP, {"modules": modules}),
                                                           WARM_IMPORT_TIMEOUT, silent=True, store_history=False))
            check(res, "importing modules in a spare kernel")
            missing = kernel_result(res)
            if missing:
                log.info("jupyter-handoff: spare kernels skip modules this server lacks: %s", ", ".join(missing))
        except BaseException:
            if kid:
                await self._shutdown_quietly(kid)
            shutil.rmtree(ws, ignore_errors=True)
            raise
        return _Spare(Kernel(kid, ex, str(ws)), ws)

    async def _until_transfers_pause(self) -> None:
        """Wait until no chunk has moved for BOOT_QUIET seconds (at most BOOT_DEFER_MAX), unless a
        run asks for the spare meanwhile (``_adopt``): then it boots at once."""
        if self._transfers_idle is None:
            return
        wanted = self._wanted = asyncio.Event()
        deadline = time.monotonic() + BOOT_DEFER_MAX
        while not wanted.is_set():
            wait = min(BOOT_QUIET - self._transfers_idle(), deadline - time.monotonic())
            if wait <= 0:
                return
            try:
                await asyncio.wait_for(wanted.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _adopt(self, ws: Path) -> Kernel | None:
        """The live spare, its workspace renamed to ``ws``; None if there is none, or ``ws``
        already exists (a resumed run's files are there: it gets a kernel of its own)."""
        if self._warm is None or ws.exists():  # noqa: ASYNC240 - one stat of a local directory
            return None
        task, self._warm = self._warm, None
        if self._wanted is not None:
            self._wanted.set()   # a boot still waiting for transfers to pause starts now
        try:
            spare = await asyncio.shield(task)   # (still booting: a cold start would take as long)
        except asyncio.CancelledError:
            if task.cancelled():  # stop() ended the boot
                return None
            if self._warm is None and not self._stopping:
                self._warm = task  # it is the run that was cancelled: the spare stays for the next
            raise
        except Exception:  # noqa: BLE001 - logged by _log_boot_failure; the run starts a kernel instead
            return None
        try:
            alive = not spare.kernel.executor.dead and \
                await ensure_async(self.kernel_manager.get_kernel(spare.kernel.id).is_alive())
        except KeyError:  # shut down meanwhile (through the kernels API, a culler)
            alive = False
        if alive:
            try:
                os.rename(spare.workspace, ws)   # atomic; the bundle is not in it yet
            except OSError as exc:
                log.warning("jupyter-handoff: could not adopt spare workspace %s as %s: %s",
                            spare.workspace, ws, exc)
                alive = False
        if not alive:
            await self._discard(spare)
            return None
        kernel = spare.kernel
        # sandboxed, the kernel sees its mount point (the spare's path); unsandboxed, its cwd
        # followed the rename
        kernel.root = str(spare.workspace) if self._sandboxed else str(ws)
        return kernel

    async def _discard(self, spare: _Spare) -> None:
        """A spare no run will have: its kernel and its (empty) workspace go."""
        spare.kernel.executor.close()
        await self._shutdown_quietly(spare.kernel.id)
        shutil.rmtree(spare.workspace, ignore_errors=True)
        self._drop_view(spare.kernel.root)

    async def _shutdown_quietly(self, kid: str) -> None:
        try:
            await ensure_async(self.kernel_manager.shutdown_kernel(kid, now=True))
        except Exception as exc:  # noqa: BLE001 - logged; nothing else to do with a kernel on its way out
            log.warning("jupyter-handoff: shutting down kernel %s failed: %s", kid, exc)

    def _seed_kernel_info(self, kernel: Kernel) -> None:
        """Let browsers attach to a run's kernel while it is busy with a step.

        Jupyter Server's websocket handshake first asks the kernel for ``kernel_info`` on the
        shell channel; a kernel busy with an agent step answers only after the step, and a
        browser (JupyterLab's kernel list, a reload) that gives up meanwhile makes the server log
        a 500 ``'NoneType' object has no attribute 'kernel_ws_protocol'`` (jupyter_server
        #1265). The server caches that reply per kernel (``_kernel_info_future``); we got it
        when the kernel became ready, so we seed the cache and the handshake never waits."""
        info = kernel.executor.kernel_info
        if not info or "protocol_version" not in info:
            return
        try:
            km = self.kernel_manager.get_kernel(kernel.id)
            if getattr(km, "_kernel_info_future", None) is None:
                fut: Future[dict[str, Any]] = Future()
                fut.set_result(info)
                km._kernel_info_future = fut
        except Exception as exc:  # noqa: BLE001 - only an optimisation of other clients' handshakes
            log.warning("jupyter-handoff: could not cache kernel_info of kernel %s: %s", kernel.id, exc)


def _log_boot_failure(task: asyncio.Future[Any]) -> None:
    """Say why a spare failed to boot when it happens (runs then start kernels of their own)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("jupyter-handoff: a spare kernel failed to start: %s", task.exception())
