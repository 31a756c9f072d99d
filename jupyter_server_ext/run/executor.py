"""KernelExecutor: the agent loop's Executor for a kernel owned by the server's kernel manager.

The loop runs in a worker thread and calls ``execute`` synchronously, so each run gets a
``BlockingKernelClient`` built from the kernel's connection info. Liveness is checked through
the kernel manager (``is_alive`` polls the kernel process, like nbclient's DeadKernelError
handling) on the server's event loop, which also performs interrupts.

Death is judged on the process this executor started talking to, never on "a" process of the
kernel: a kernel manager with auto-restart (jupyter_client's default restarter polls every 3 s)
replaces the provisioner's process after a crash, and the new, idle process would otherwise look
alive while our request is lost with the old one. So the executor keeps the original process
object, also listens for the manager's restart/dead callbacks (kernels without a local process,
e.g. a gateway's), and checks liveness on a clock even while unrelated messages keep arriving.

Why not nbclient: its ``NotebookClient`` drives an async kernel client over a notebook, while a
run needs a blocking call from the loop's worker thread, liveness judged on the kernel process
(above), gateway kernels reached through their websocket (gateway.py), and bulk arguments in the
execute_request's content (kernel_rpc.py). What nbclient shares with us, turning iopub messages
into nbformat outputs, comes from the same place: ``nbformat.v4.output_from_msg``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import signal
import time
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_core.utils import ensure_async
from nbformat.v4 import output_from_msg

from handoff_magic.agent.executors import ExecResult

from ..errors import KernelStartError
from .gateway import GatewayKernelChannels, is_gateway_kernel_manager, send_execute

log = logging.getLogger(__name__)

POLL = 0.5            # seconds between iopub polls while waiting for a reply
ALIVE_EVERY = 1.0     # seconds between liveness checks while the kernel is quiet
INTERRUPT_GRACE = 10  # seconds a kernel gets to become idle after an interrupt
IOPUB_GRACE = 10      # seconds to wait for the idle status once the reply is in


class KernelExecutor:
    """Executes code in kernel ``kernel_id`` of ``kernel_manager`` (a MappingKernelManager).

    ``loop`` is the server's event loop: kernel-manager calls (is_alive, interrupt) are async
    there, so this thread-side class schedules them onto it.
    """

    def __init__(self, kernel_manager: Any, kernel_id: str, loop: asyncio.AbstractEventLoop, *,
                 default_timeout: float | None = 600.0, ready_timeout: float = 60.0) -> None:
        self.kernel_manager = kernel_manager
        self.kernel_id = kernel_id
        self.loop = loop
        self.default_timeout = default_timeout
        self._interrupted = False
        self.dead = False
        self.kernel_info: dict[str, Any] | None = None  # the kernel_info_reply content seen at start
        km = kernel_manager.get_kernel(kernel_id)
        # the process we talk to; a restart replaces the provisioner's, never this reference
        self._process: Any = getattr(getattr(km, "provisioner", None), "process", None)
        self._restarted = False
        self._watch_restarts(km)
        info: dict[str, Any] = dict(km.get_connection_info(session=True))
        for key in ("curve_publickey", "curve_secretkey"):
            if isinstance(info.get(key), str):
                info[key] = info[key].encode("ascii")
        self.client = BlockingKernelClient(**info) if not is_gateway_kernel_manager(kernel_manager) \
            else GatewayKernelChannels(kernel_id, loop)  # a gateway kernel is reached by its websocket
        self.client.start_channels()
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.client.stop_channels()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Like ``wait_for_ready``, but liveness comes from the kernel manager (the process),
        not a heartbeat that can miss a beat on a busy machine; and ready means the shell
        answered *and* our iopub subscription receives (ZMQ drops what is published before a
        subscriber has joined, which would lose the first execution's outputs and idle)."""
        deadline = time.monotonic() + timeout
        sent: set[str] = set()
        shell_ok = iopub_ok = False
        while time.monotonic() < deadline:
            sent.add(self.client.kernel_info())
            round_end = time.monotonic() + 1.0
            while time.monotonic() < round_end and not (shell_ok and iopub_ok):
                for get, which in ((self.client.get_shell_msg, "shell"), (self.client.get_iopub_msg, "iopub")):
                    if (which == "shell" and shell_ok) or (which == "iopub" and iopub_ok):
                        continue
                    try:
                        msg = get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if msg.get("parent_header", {}).get("msg_id") in sent:
                        if which == "shell":
                            shell_ok = True
                            if msg.get("msg_type") == "kernel_info_reply":
                                self.kernel_info = msg.get("content")
                        else:
                            iopub_ok = True
            if shell_ok and iopub_ok:
                return
            if not self.is_alive():
                raise KernelStartError(f"kernel {self.kernel_id} died while starting",
                                       "check the kernel spec and the Jupyter Server log")
        raise KernelStartError(f"kernel {self.kernel_id} did not answer within {timeout:.0f}s",
                               "the machine may be overloaded, or the kernel spec is wrong")

    def _watch_restarts(self, km: Any) -> None:
        """A restart (or the restarter giving up) means the process running our code is gone."""
        def gone() -> None:
            self._restarted = True
        self._on_gone = gone
        for event in ("restart", "dead"):
            try:
                km.add_restart_callback(gone, event)
            except Exception as exc:  # noqa: BLE001 - a manager without a restarter: nothing to listen to
                log.debug("kernel %s: no restart callbacks (%s)", self.kernel_id, exc)

    # -- kernel-manager calls, run on the server loop ------------------------------------------
    def _on_loop(self, coro_factory: Any, timeout: float = 15.0) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro_factory(), self.loop)
        return fut.result(timeout)

    def is_alive(self) -> bool:
        """True while the kernel process runs (asks the kernel manager, not the heartbeat)."""
        if self.dead or self._restarted:
            return False
        if self._process is not None and hasattr(self._process, "poll"):  # local: ask the OS
            return self._process.poll() is None
        try:
            km = self.kernel_manager.get_kernel(self.kernel_id)
        except KeyError:
            return False
        try:
            return bool(self._on_loop(lambda: ensure_async(km.is_alive())))
        except Exception as exc:  # noqa: BLE001 - loop busy or gone (server stopping): not evidence of death
            log.warning("jupyter-handoff: liveness check of kernel %s failed: %s", self.kernel_id, exc)
            return True

    def interrupt(self) -> None:
        """Interrupt the running code (SIGINT or an interrupt_request, per the kernel spec)."""
        self._interrupted = True
        try:
            self._on_loop(lambda: ensure_async(self.kernel_manager.interrupt_kernel(self.kernel_id)))
        except Exception as exc:  # noqa: BLE001 - logged: interrupting is best effort
            log.warning("jupyter-handoff: interrupting kernel %s failed: %s", self.kernel_id, exc)

    def close(self) -> None:
        self.client.stop_channels()
        try:
            km = self.kernel_manager.get_kernel(self.kernel_id)
        except KeyError:
            return
        for event in ("restart", "dead"):
            try:
                km.remove_restart_callback(self._on_gone, event)
            except Exception as exc:  # noqa: BLE001 - already gone with its restarter
                log.debug("kernel %s: restart callback not removed (%s)", self.kernel_id, exc)

    # -- execution -------------------------------------------------------------------------------
    def execute(self, code: str, timeout: float | None = None, *, silent: bool = False,
                store_history: bool = True, extra_content: dict[str, Any] | None = None) -> ExecResult:
        """Run ``code``; collect its outputs as nbformat v4 dicts. Never raises for kernel faults."""
        if self.dead or not self.is_alive():
            self.dead = True
            return self._dead_result([], None)
        timeout = self.default_timeout if timeout is None else timeout
        self._interrupted = False
        collector = _Outputs()
        # drain stale iopub traffic from earlier requests so it is not mistaken for ours
        while True:
            try:
                self.client.get_iopub_msg(timeout=0)
            except queue.Empty:
                break
        msg_id = self.client.execute(code, silent=silent, store_history=store_history,
                                     allow_stdin=False, stop_on_error=False) if extra_content is None \
            else send_execute(self.client, code, silent, store_history, extra_content)  # bulk data: transport.py
        deadline = None if not timeout else time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        idle = False
        last_alive = time.monotonic()
        timed_out = False
        reply_at = 0.0
        while not (idle and reply is not None):
            if reply is not None and time.monotonic() - reply_at > IOPUB_GRACE:
                log.warning("jupyter-handoff: kernel %s replied but its idle status never came on iopub; "
                            "outputs of this execution may be incomplete", self.kernel_id)
                break  # like nbclient's iopub_timeout: never hang on a lost iopub message
            if deadline is not None and time.monotonic() > deadline and not timed_out:
                timed_out = True
                self.interrupt()
                deadline = time.monotonic() + INTERRUPT_GRACE
            elif timed_out and deadline is not None and time.monotonic() > deadline:
                break  # the kernel ignores interrupts; report what we have
            got = False
            if not idle:
                try:
                    msg = self.client.get_iopub_msg(timeout=POLL)
                    got = True
                    if msg.get("parent_header", {}).get("msg_id") == msg_id:
                        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                            idle = True
                        else:
                            collector.add(msg)
                except queue.Empty:
                    pass
            if reply is None:
                try:  # after idle only the reply is missing: wait on the shell channel itself
                    r = self.client.get_shell_msg(timeout=POLL if idle else (0 if got else 0.01))
                    if r.get("parent_header", {}).get("msg_id") == msg_id:
                        reply = r
                        reply_at = time.monotonic()
                        got = True
                except queue.Empty:
                    pass
            if time.monotonic() - last_alive > ALIVE_EVERY:  # also while others' messages arrive
                last_alive = time.monotonic()
                if not self.is_alive():
                    self.dead = True
                    return self._dead_result(collector.outputs, collector.execution_count)
        content = (reply or {}).get("content", {})
        count = content.get("execution_count", collector.execution_count)
        if timed_out:
            status = "timeout"
        elif content.get("status") == "error":
            status = "interrupted" if (self._interrupted and content.get("ename") == "KeyboardInterrupt") \
                else "error"
        elif content.get("status") == "aborted":
            status = "error"
        else:
            status = "ok"
        error = None
        if content.get("status") == "error":
            error = {"ename": content.get("ename", ""), "evalue": content.get("evalue", ""),
                     "traceback": content.get("traceback", [])}
        elif timed_out:
            error = {"ename": "TimeoutError",
                     "evalue": f"the code ran longer than {timeout:.0f}s and was interrupted",
                     "traceback": []}
        return ExecResult(status=status, stdout=collector.text("stdout"), stderr=collector.text("stderr"),
                          result=collector.result, outputs=collector.outputs, error=error,
                          execution_count=count if isinstance(count, int) else None)

    def _dead_result(self, outputs: list[dict[str, Any]], count: int | None) -> ExecResult:
        how = _how_it_ended(self._exit_code())
        return ExecResult(status="dead", stdout="", stderr="", result=None, outputs=outputs,
                          error={"ename": "DeadKernelError",
                                 "evalue": f"the kernel died while running this code{how}",
                                 "traceback": []},
                          execution_count=count)


    def _exit_code(self, wait: float = 2.0) -> int | None:
        """The exit status of the process that ran our code (a signal shows as its negative
        number, as subprocess reports it); None where there is no local process to ask."""
        proc = self._process
        if proc is None or not hasattr(proc, "poll"):
            return None
        deadline = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < deadline:  # a restarter may hold the reap
            time.sleep(0.05)
        code = proc.poll()
        return int(code) if code is not None else None


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        try:
            return f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f" (killed by signal {-code})"
    return f" (exit code {code})"


class _Outputs:
    """Turns iopub messages into nbformat v4 outputs (``output_from_msg``, as nbclient does),
    merging consecutive streams and applying clear_output / update_display_data."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.execution_count: int | None = None
        self.result: str | None = None
        self._clear_pending = False
        self._display_index: dict[str, list[int]] = {}

    def _append(self, out: dict[str, Any]) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._display_index.clear()
            self._clear_pending = False
        self.outputs.append(out)

    def add(self, msg: dict[str, Any]) -> None:
        kind = msg["msg_type"]
        c = msg.get("content", {})
        if kind == "execute_input":
            self.execution_count = c.get("execution_count")
        elif kind == "stream":
            name = c.get("name", "stdout")
            if self.outputs and not self._clear_pending and self.outputs[-1]["output_type"] == "stream" \
                    and self.outputs[-1]["name"] == name:
                self.outputs[-1]["text"] += c.get("text", "")
            else:
                self._append(output_from_msg(msg))
        elif kind in ("display_data", "execute_result"):
            if kind == "execute_result":
                self.result = c.get("data", {}).get("text/plain")
            self._append(output_from_msg(msg))
            display_id = (c.get("transient") or {}).get("display_id")
            if display_id:
                self._display_index.setdefault(display_id, []).append(len(self.outputs) - 1)
        elif kind == "update_display_data":
            display_id = (c.get("transient") or {}).get("display_id")
            for i in self._display_index.get(display_id or "", []):
                if i < len(self.outputs):
                    self.outputs[i]["data"] = c.get("data", {})
                    self.outputs[i]["metadata"] = c.get("metadata", {})
        elif kind == "error":
            self._append(output_from_msg(msg))
        elif kind == "clear_output":
            if c.get("wait"):
                self._clear_pending = True
            else:
                self.outputs.clear()
                self._display_index.clear()

    def text(self, name: str) -> str:
        return "".join(o["text"] for o in self.outputs if o["output_type"] == "stream" and o["name"] == name)
