"""KernelPool: the kernels runs execute in, from the server's own kernel manager (so JupyterHub
and Enterprise Gateway set-ups work).

A run's kernel starts in its workspace with a scrubbed environment (no token, no model key, no
secret-named variable, nor any variable holding one of those values), autorestart off (a crashed
kernel is replaced from the last checkpoint, never by a blank restart), and its kernel_info
seeded into Jupyter Server's cache so browsers can attach while it is busy. Opt-in
``c.HandoffApp.warm_kernels = 1`` keeps one spare kernel booted (same-disk kernels only).

Which kernel a run gets (kernel spec, provisioner, launch arguments) is decided in one place,
``KernelPool.launch_options``: the seam for a sandboxed provisioner.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from jupyter_core.utils import ensure_async

from handoff_magic.secrets import is_secret_name

from ..errors import RunFailure
from ..settings import HandoffSettings
from ..workspace import Workspace
from .executor import KernelExecutor
from .sandbox import SandboxState

log = logging.getLogger(__name__)

DROP_ENV = frozenset({"JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN", "JUPYTER_PASSWORD",
                      "HANDOFF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "JPY_SESSION_NAME"})
INLINE_MPL = "module://matplotlib_inline.backend_inline"
WARM_IMPORT_TIMEOUT = 120.0
T = TypeVar("T")
InThread = Callable[[Callable[[], T]], Awaitable[T]]


@dataclass
class Kernel:
    """A run's kernel: its id in the kernel manager and the executor talking to it."""
    id: str
    executor: KernelExecutor


class KernelPool:
    """Starts, hands out and shuts down run kernels (one-way: the manager calls it)."""

    def __init__(self, settings: HandoffSettings, kernel_manager: Any, workspace: Workspace, *,
                 in_thread: InThread[Any], sandbox: SandboxState | None = None, server_token: str = "",
                 warm_allowed: bool = True) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.kernel_manager = kernel_manager
        self.workspace = workspace
        self.server_token = server_token
        self._in_thread = in_thread
        # only on a shared disk and unsandboxed: the restore chdirs a warm kernel into the run's
        # workspace, which a sandbox started elsewhere cannot see
        self._warm_allowed = warm_allowed and (sandbox is None or sandbox.mode == "none")
        self._warm: asyncio.Future[Kernel] | None = None
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

    def launch_options(self, run_id: str | None) -> dict[str, Any]:
        """``start_kernel`` arguments for a run's kernel (``run_id`` None: a warm spare, which
        starts in the runs folder and moves into a workspace when a run takes it). The sandbox's
        kernel spec (its provisioner) when there is one; never unisolated unasked."""
        if self.sandbox is not None and self.sandbox.problem:  # c.HandoffApp.sandbox
            raise RunFailure(self.sandbox.problem, self.sandbox.hint)
        kernel_name = self.sandbox.kernel_name if self.sandbox is not None else self.settings.kernel_name
        return {"path": self.workspace.api_path(run_id), "kernel_name": kernel_name, "env": self.env()}

    # -- lifecycle -------------------------------------------------------------------------------
    async def acquire(self, run_id: str, meanwhile: asyncio.Future[Any]) -> Kernel:
        """A ready kernel for ``run_id`` (the warm spare if there is a live one), while
        ``meanwhile`` (the bundle check) finishes; its error comes before a kernel's."""
        warm = await self._take_warm()
        if warm is not None:
            await meanwhile
            kernel = warm
        else:
            kernel = await self._start_alongside(run_id, meanwhile)
        self._seed_kernel_info(kernel)
        return kernel

    async def release(self, kernel: Kernel, *, keep: bool = False) -> None:
        """Close the executor and shut the kernel down (``keep``: leave it for inspection)."""
        kernel.executor.close()
        if keep and not kernel.executor.dead:
            return
        try:
            await ensure_async(self.kernel_manager.shutdown_kernel(kernel.id, now=kernel.executor.dead))
        except KeyError:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; nothing else to do with a kernel on its way out
            log.warning("jupyter-handoff: shutting down kernel %s failed: %s", kernel.id, exc)

    def refill(self) -> None:
        """Start booting a spare kernel if warm kernels are on and none is there."""
        if self.settings.warm_kernels > 0 and self._warm_allowed and not self._stopping and self._warm is None:
            self._warm = asyncio.ensure_future(self._boot_warm())

    async def stop(self) -> None:
        """No more spares; the one booted (or booting) goes."""
        self._stopping = True
        warm, self._warm = self._warm, None
        if warm is None:
            return
        if warm.done() and not warm.cancelled() and warm.exception() is None:
            await self.release(warm.result())
        else:
            warm.cancel()

    # -- steps -----------------------------------------------------------------------------------
    async def _start(self, run_id: str | None) -> tuple[str, asyncio.Future[KernelExecutor]]:
        """Start a kernel, autorestart off; its id and a future of its ready executor."""
        kid = await ensure_async(self.kernel_manager.start_kernel(**self.launch_options(run_id)))
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

    async def _start_alongside(self, run_id: str, meanwhile: asyncio.Future[Any]) -> Kernel:
        try:
            kid, ready = await self._start(run_id)
        except BaseException:
            await asyncio.gather(meanwhile, return_exceptions=True)  # no orphaned task
            raise
        done: tuple[Any, Any] = await asyncio.gather(meanwhile, ready, return_exceptions=True)
        checked, executor = done
        if isinstance(executor, KernelExecutor) and not isinstance(checked, BaseException):
            return Kernel(kid, executor)
        if isinstance(executor, KernelExecutor):
            executor.close()
        await self._shutdown_quietly(kid)
        raise checked if isinstance(checked, BaseException) else executor

    async def _boot_warm(self) -> Kernel:
        """A spare kernel with handoff_magic imported, so the next handoff skips kernel
        start-up (~0.5 s, far more on a loaded machine)."""
        self.workspace.runs_dir.mkdir(parents=True, exist_ok=True)
        kid, ready = await self._start(None)
        try:
            ex = await ready
            await self._in_thread(lambda: ex.execute("import handoff_magic", WARM_IMPORT_TIMEOUT,
                                                     silent=True, store_history=False))
        except BaseException:
            await self._shutdown_quietly(kid)
            raise
        return Kernel(kid, ex)

    async def _take_warm(self) -> Kernel | None:
        """The spare if there is a live one (waiting for it if it is still booting); the next
        starts booting."""
        task, self._warm = self._warm, None
        if task is None:
            return None
        try:
            kernel = await task
        except Exception as exc:  # noqa: BLE001 - logged; a fresh kernel is started instead
            log.warning("jupyter-handoff: the warm kernel failed to start (%s); starting one for the run", exc)
            self.refill()
            return None
        self.refill()
        if kernel.executor.dead or not await ensure_async(self.kernel_manager.get_kernel(kernel.id).is_alive()):
            kernel.executor.close()
            await self._shutdown_quietly(kernel.id)
            return None
        return kernel

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
