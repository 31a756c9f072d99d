"""A real ``jupyter server`` subprocess on a free loopback port, for tests and benchmarks.

Why a subprocess (not pytest-jupyter's in-process app): tests must be able to SIGKILL the server
mid-run and start it again on the same data, and the runner's kernels must outlive nothing.

    from tests.harness.server_process import JupyterServerProcess
    srv = JupyterServerProcess(extra_args=["--HandoffApp.max_concurrent_runs=1"]).start()
    srv.client.get("/handoff/api/runs").json()
    srv.kill(); srv.restart(); srv.stop()

Its fixtures (``handoff_server``, ``handoff_server_factory``) live in tests/conftest.py.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class JupyterServerProcess:
    """One Jupyter Server with the handoff extension, its own root_dir, data_dir and token."""

    def __init__(self, *, root_dir: Path | None = None, data_dir: Path | None = None,
                 token: str | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int | None = None,
                 startup_timeout: float = 60.0) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="handoff-srv-"))
        self.root_dir = Path(root_dir) if root_dir else self._tmp / "root"
        self.data_dir = Path(data_dir) if data_dir else self._tmp / "data"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.token = token or secrets.token_hex(16)
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.log_path = self._tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # -- URLs and clients ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    @property
    def client(self) -> httpx.Client:
        """An authenticated client with ``base_url`` = the server URL."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)
        return self._client

    def anon_client(self, **kwargs: Any) -> httpx.Client:
        """A client without credentials (for the auth tests)."""
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- lifecycle -----------------------------------------------------------------------
    module = "jupyter_server"  # the app `python -m` starts; subclasses may start jupyterlab

    def app_args(self) -> list[str]:
        """Options only a subclass's app understands (none for a plain Jupyter Server)."""
        return []

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", self.module,
            "--allow-root", "--no-browser",
            f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            f"--HandoffApp.data_dir={self.data_dir}",
            *self.app_args(),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("JUPYTER_TOKEN", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> "JupyterServerProcess":
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.environment(), cwd=str(self.root_dir),
                                     start_new_session=True)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                r = httpx.get(f"{self.url}/handoff/api/runs", headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return
                if r.status_code == 404 and "Extension failed" in self.log():
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        tail = self.log()[-4000:]
        self.kill()
        raise RuntimeError(f"jupyter server with the handoff extension did not answer within "
                           f"{self.startup_timeout}s; log tail:\n{tail}")

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def kill(self) -> None:
        """SIGKILL the whole process group (server and its kernels), like a crashed VM would."""
        self._close_client()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def kill_server_only(self) -> None:
        """SIGKILL only the server process; its kernels are orphaned as after a real crash."""
        self._close_client()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM → the extension's stop_extension runs); SIGKILL if it hangs."""
        self._close_client()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        try:  # kernels the server did not shut down
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, *, graceful: bool = False) -> "JupyterServerProcess":
        """Stop (SIGKILL unless graceful) and start again on the same dirs, token and port."""
        self.stop() if graceful else self.kill()
        deadline = time.monotonic() + 10
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not port_is_free(self.port):
            self.port = free_port()
        self.proc = None
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "JupyterServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class Mailbox:
    """An aiosmtpd handler that keeps every message it is sent (a loopback SMTP receiver)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # aiosmtpd's handler API
        self.messages.append(envelope)
        return "250 OK"


class Webhook:
    """A loopback HTTP receiver for apprise ``json://`` URLs; can be started late."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.answer = threading.Event()   # cleared: a message is recorded but its reply held back
        self.answer.set()
        self._arrived = threading.Condition()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def start(self) -> "Webhook":
        received, arrived, answer = self.received, self._arrived, self.answer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with arrived:
                    received.append(json.loads(body))
                    arrived.notify_all()
                answer.wait(120)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait(self, n: int, timeout: float = 120) -> list[dict[str, Any]]:
        """What arrived once ``n`` messages have (woken by each arrival), or after ``timeout``."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= n, timeout)
        return self.received

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = 120) -> dict[str, Any]:
        """The first message ``match`` accepts, woken by each arrival; AssertionError naming ``what``."""
        with self._arrived:
            found = self._arrived.wait_for(lambda: next((m for m in self.received if match(m)), None), timeout)
        if found is None:
            raise AssertionError(f"no {what} notification after {timeout}s: {self.received}")
        return found
