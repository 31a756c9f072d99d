"""A blocking kernel client for kernels that live in a Jupyter Kernel/Enterprise Gateway.

Why not ``BlockingKernelClient``: a gateway kernel has no ZMQ ports the server can reach; its
only channel is the gateway's websocket ``<ws_url>/api/kernels/<id>/channels``. Why not
jupyter_server's ``GatewayKernelClient``: it opens that websocket without the gateway's auth
header and is async-only. This client connects exactly the way jupyter_server's own gateway
websocket proxy does (``GatewayClient.load_connection_args``: auth token, TLS, timeouts) on the
server's event loop, and offers the blocking surface ``KernelExecutor`` uses from its worker
thread: ``execute``, ``get_iopub_msg``, ``get_shell_msg``, ``wait_for_ready``, ``stop_channels``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import queue
import time
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session

from ..errors import GatewayConnectionError

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
MAX_MESSAGE_BYTES = 256 * 1024 * 1024   # replies carrying checkpoint pieces can be a few MiB


def send_execute(client: Any, code: str, silent: bool, store_history: bool,
                 extra_content: dict[str, Any]) -> str:
    """Send an execute_request whose content carries extra keys (bulk data the code reads with
    ``get_ipython().kernel.get_parent()``): unlike a literal in the code, IPython never parses
    it, so megabytes cost milliseconds. Works for ZMQ clients and ``GatewayKernelChannels``."""
    content = {"code": code, "silent": silent, "store_history": store_history, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": False, **extra_content}
    msg = client.session.msg("execute_request", content)
    if isinstance(client, GatewayKernelChannels):
        client._send("shell", msg)
    else:
        client.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


def is_gateway_kernel_manager(kernel_manager: Any) -> bool:
    """True when kernels come from a gateway (``--gateway-url``), i.e. they may not share our disk."""
    try:
        from jupyter_server.gateway.managers import GatewayMappingKernelManager
    except ImportError:  # pragma: no cover - jupyter_server always ships it
        return False
    return isinstance(kernel_manager, GatewayMappingKernelManager)


class _Heartbeat:
    def __init__(self, client: "GatewayKernelChannels") -> None:
        self._client = client

    def is_beating(self) -> bool:
        return not self._client.closed and not self._client.kernel_lost


class GatewayKernelChannels:
    """One websocket to a gateway kernel, demultiplexed into a thread-safe queue per channel."""

    def __init__(self, kernel_id: str, loop: asyncio.AbstractEventLoop, *,
                 connect_timeout: float = 60.0) -> None:
        self.kernel_id = kernel_id
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.session = Session(key=b"", username="jupyter-handoff")  # the gateway signs for the kernel
        self._queues: dict[str, queue.Queue[dict[str, Any]]] = {c: queue.Queue() for c in CHANNELS}
        self._ws: Any = None
        self._reader: asyncio.Future[None] | None = None
        self.closed = True
        self.close_reason = ""
        self.kernel_lost = ""      # "restarting" / "dead" / "disconnected" once it is lost
        self._stopping = False
        self.hb_channel = _Heartbeat(self)

    # -- connection (runs on the server loop) ---------------------------------------------------
    def _url(self) -> str:
        from jupyter_server.gateway.gateway_client import GatewayClient
        from jupyter_server.utils import url_escape, url_path_join
        gc = GatewayClient.instance()
        return url_path_join(gc.ws_url or "", gc.kernels_endpoint, url_escape(self.kernel_id), "channels")

    async def _connect(self) -> None:
        from jupyter_server.gateway.gateway_client import GatewayClient
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect
        url = self._url()
        kwargs = GatewayClient.instance().load_connection_args()
        self._ws = await websocket_connect(HTTPRequest(url, **kwargs), max_message_size=MAX_MESSAGE_BYTES)
        self.closed = False
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                raw = await self._ws.read_message()
                if raw is None:
                    break
                if isinstance(raw, bytes):  # binary frames only come with a subprotocol we never ask for
                    log.warning("jupyter-handoff: ignored a binary frame from gateway kernel %s", self.kernel_id)
                    continue
                msg = json.loads(raw)
                channel = msg.get("channel") or "iopub"
                self._queues.get(channel, self._queues["iopub"]).put(msg)
                if channel == "iopub" and msg.get("msg_type") == "status" and \
                        (msg.get("content") or {}).get("execution_state") in ("restarting", "dead"):
                    await self._on_kernel_lost(msg["content"]["execution_state"])
        except Exception as exc:  # noqa: BLE001 - the socket broke: say so to whoever waits next
            self.close_reason = f"{type(exc).__name__}: {exc}"
            log.warning("jupyter-handoff: websocket to gateway kernel %s failed: %s", self.kernel_id, exc)
        except asyncio.CancelledError:
            self.closed = True
            raise
        self.closed = True
        code = getattr(self._ws, "close_code", None)
        if not self.close_reason:
            self.close_reason = f"closed by the gateway (code {code})"
        if not self._stopping and not self.kernel_lost:
            # no way to tell what the kernel did meanwhile: treat it as lost (the run restores
            # its last checkpoint and redoes the step) rather than wait for a reply that never comes
            await self._on_kernel_lost("disconnected")

    async def _on_kernel_lost(self, state: str) -> None:
        """The gateway restarted (or lost) the kernel: its state is gone. A blank restarted
        kernel must not run the next step, so shut it down; the kernel manager then reports it
        dead and the runner restores the last checkpoint into a new kernel."""
        from jupyter_server.gateway.gateway_client import GatewayClient, gateway_request
        from jupyter_server.utils import url_escape, url_path_join
        self.kernel_lost = state
        log.warning("jupyter-handoff: gateway kernel %s is %s; shutting it down so the run restores "
                    "its checkpoint in a new kernel", self.kernel_id, state)
        gc = GatewayClient.instance()
        try:
            await gateway_request(url_path_join(gc.url or "", gc.kernels_endpoint, url_escape(self.kernel_id)),
                                  method="DELETE")
        except Exception as exc:  # noqa: BLE001 - already gone (404) or the gateway is down: either way it is lost
            log.info("jupyter-handoff: deleting lost gateway kernel %s: %s", self.kernel_id, exc)

    def start_channels(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        try:
            fut.result(self.connect_timeout)
        except Exception as exc:
            fut.cancel()
            raise GatewayConnectionError(
                f"could not open the gateway websocket of kernel {self.kernel_id} ({self._url()}): "
                f"{type(exc).__name__}: {exc}", "check --gateway-url, the gateway's auth token "
                "(GatewayClient.auth_token) and that the gateway is reachable") from exc

    def stop_channels(self) -> None:
        self._stopping = True
        ws = self._ws
        if ws is None:
            return
        try:
            self.loop.call_soon_threadsafe(ws.close)
        except RuntimeError:  # the loop is closed: the socket goes with it
            pass

    # -- messages (any thread) --------------------------------------------------------------------
    def _send(self, channel: str, msg: dict[str, Any]) -> None:
        if self.closed or self._ws is None:
            raise GatewayConnectionError(f"the websocket to gateway kernel {self.kernel_id} is closed "
                                         f"({self.close_reason or 'not connected'})",
                                         "the run restores its last checkpoint in a new kernel")
        msg = dict(msg)
        msg["channel"] = channel
        text = json.dumps(msg, default=json_default)
        ws = self._ws
        self.loop.call_soon_threadsafe(lambda: ws.write_message(text))

    def execute(self, code: str, silent: bool = False, store_history: bool = True,
                user_expressions: dict[str, Any] | None = None, allow_stdin: bool = False,
                stop_on_error: bool = True) -> str:
        content = {"code": code, "silent": silent, "store_history": store_history,
                   "user_expressions": user_expressions or {}, "allow_stdin": allow_stdin,
                   "stop_on_error": stop_on_error}
        msg = self.session.msg("execute_request", content)
        self._send("shell", msg)
        return str(msg["header"]["msg_id"])

    def kernel_info(self) -> str:
        msg = self.session.msg("kernel_info_request", {})
        self._send("shell", msg)
        return str(msg["header"]["msg_id"])

    def _get(self, channel: str, timeout: float | None) -> dict[str, Any]:
        """Next message of ``channel``; ``queue.Empty`` after ``timeout`` (0: don't wait)."""
        q = self._queues[channel]
        return q.get_nowait() if timeout == 0 else q.get(timeout=timeout)

    def get_iopub_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return self._get("iopub", timeout)

    def get_shell_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return self._get("shell", timeout)

    def wait_for_ready(self, timeout: float = 60.0) -> None:
        """Send kernel_info until the kernel answers (it may still be starting behind the gateway)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg_id = self.kernel_info()
            until = min(deadline, time.monotonic() + 5)
            while time.monotonic() < until:
                try:
                    reply = self.get_shell_msg(timeout=0.5)
                except queue.Empty:
                    if self.closed:
                        raise RuntimeError(f"gateway websocket closed ({self.close_reason})") from None
                    continue
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
                    while True:  # drop the iopub chatter of the kernel_info request
                        try:
                            self.get_iopub_msg(timeout=0.2)
                        except queue.Empty:
                            return
        raise RuntimeError(f"no kernel_info reply through the gateway in {timeout:.0f}s")
