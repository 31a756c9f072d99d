"""Real Jupyter Enterprise Gateway and JupyterHub processes on loopback, for the scaling-out tests.

* ``EnterpriseGateway``: ``jupyter-enterprisegateway`` from its own venv (.venv/cluster/gateway,
  made by scripts/install-cluster-deps.sh: it pins jupyter_server<2, which cannot share ours),
  started in its own working directory with an auth token; its only kernel spec runs this
  project's python, as a real gateway's kernel image would have jupyter-handoff installed.
* ``JupyterHub``: ``jupyterhub`` with configurable-http-proxy (npm, .venv/cluster/node), the
  DummyAuthenticator and SimpleLocalProcessSpawner; single-user servers are this project's
  ``jupyterhub-singleuser`` with the handoff extension. An admin *service* token lets the test
  spawn a user's server and mint that user a narrow token (access:servers!user=<name>).

Every start waits for a real answer and, on failure, raises with the tail of the process log.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.harness.server_process import REPO, JupyterServerProcess, free_port

CLUSTER = REPO / ".venv" / "cluster"
EG_BIN = CLUSTER / "gateway" / "bin" / "jupyter-enterprisegateway"
CHP_BIN = CLUSTER / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
INSTALL_HINT = "run `make test` (or `bash scripts/install-cluster-deps.sh`) to install it"


class HarnessError(RuntimeError):
    """A cluster component did not start; the message carries its log tail."""


class _Process:
    """A subprocess in its own session with its output in a log file."""

    name = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                                         start_new_session=True)

    def _fail(self, what: str) -> HarnessError:
        tail = self.log()[-5000:]
        self.stop()
        return HarnessError(f"{self.name}: {what}\n--- {self.log_path} (tail) ---\n{tail}")

    def _wait(self, probe: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} before {what}")
            try:
                if probe():
                    return
            except httpx.TransportError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise self._fail(f"no {what} within {timeout:.0f}s ({last})")

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


class EnterpriseGateway(_Process):
    """Jupyter Enterprise Gateway whose kernels start in ``kernels_dir`` (not the server's root)."""

    name = "enterprise-gateway"

    def __init__(self, workdir: Path, *, kernel_python: str = sys.executable) -> None:
        super().__init__(workdir)
        if not EG_BIN.exists():
            raise HarnessError(f"Jupyter Enterprise Gateway is not installed at {EG_BIN}: {INSTALL_HINT}")
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.kernels_dir = workdir / "kernels-cwd"
        self.kernels_dir.mkdir(exist_ok=True)
        spec_dir = workdir / "share" / "kernels" / "python3"
        spec_dir.mkdir(parents=True, exist_ok=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "display_name": "Python 3 (jupyter-handoff)", "language": "python",
            "argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "env": {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONUNBUFFERED": "1"},
            "metadata": {"debugger": False}}))
        self.jupyter_path = workdir / "share"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "EnterpriseGateway":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_", "HANDOFF_"))}
        env.update({"JUPYTER_PATH": str(self.jupyter_path),
                    "JUPYTER_DATA_DIR": str(self.workdir / "data"),
                    "JUPYTER_RUNTIME_DIR": str(self.workdir / "runtime"),
                    "JUPYTER_CONFIG_DIR": str(self.workdir / "config"),
                    "PYTHONUNBUFFERED": "1"})
        cmd = [str(EG_BIN), "--ip=127.0.0.1", f"--port={self.port}", "--port_retries=0",
               f"--EnterpriseGatewayApp.auth_token={self.token}",
               "--KernelSpecManager.ensure_native_kernel=False",
               "--EnterpriseGatewayApp.list_kernels=True"]
        self._spawn(cmd, env, self.kernels_dir)

        def ready() -> bool:
            r = httpx.get(f"{self.url}/api/kernelspecs", headers={"Authorization": f"token {self.token}"}, timeout=3)
            return r.status_code == 200 and "python3" in r.json().get("kernelspecs", {})
        self._wait(ready, timeout, "answer on /api/kernelspecs listing the python3 spec")
        return self

    def kernels(self) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/kernels", headers={"Authorization": f"token {self.token}"}, timeout=10)
        r.raise_for_status()
        return list(r.json())

    def server_args(self) -> list[str]:
        """Arguments that point a Jupyter Server at this gateway."""
        return [f"--gateway-url={self.url}", f"--GatewayClient.auth_token={self.token}",
                "--GatewayClient.request_timeout=60"]


class JupyterHub(_Process):
    """JupyterHub + configurable-http-proxy on loopback with one allowed user."""

    name = "jupyterhub"

    def __init__(self, workdir: Path, *, user: str = "ada", singleuser_args: list[str] | None = None,
                 singleuser_env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        if not CHP_BIN.exists():
            raise HarnessError(f"configurable-http-proxy is not installed at {CHP_BIN}: {INSTALL_HINT}")
        self.user = user
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.admin_token = secrets.token_hex(24)
        self.singleuser_args = list(singleuser_args or [])
        self.singleuser_env = dict(singleuser_env or {})
        self.homes = workdir / "homes"
        self.homes.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        """The hub's public URL (the proxy)."""
        return f"http://127.0.0.1:{self.port}"

    def user_url(self, user: str | None = None) -> str:
        return f"{self.url}/user/{user or self.user}"

    def config(self) -> str:
        singleuser = str(Path(sys.executable).with_name("jupyterhub-singleuser"))
        cfg = {
            "ip": "127.0.0.1", "port": self.port, "hub_ip": "127.0.0.1", "hub_port": self.hub_port,
            "public_url": self.url + "/", "proxy_api": f"http://127.0.0.1:{self.proxy_api_port}",
            "chp": str(CHP_BIN), "db": f"sqlite:///{self.workdir / 'jupyterhub.sqlite'}",
            "cookie": str(self.workdir / "cookie_secret"), "pid": str(self.workdir / "proxy.pid"),
            "user": self.user, "admin_token": self.admin_token, "cmd": singleuser,
            "args": ["--allow-root", *self.singleuser_args], "env": self.singleuser_env,
            "homes": str(self.homes),
        }
        return f"""
cfg = {cfg!r}
c.JupyterHub.ip = cfg['ip']
c.JupyterHub.port = cfg['port']
c.JupyterHub.hub_ip = cfg['hub_ip']
c.JupyterHub.hub_port = cfg['hub_port']
c.JupyterHub.public_url = cfg['public_url']
c.JupyterHub.db_url = cfg['db']
c.JupyterHub.cookie_secret_file = cfg['cookie']
c.ConfigurableHTTPProxy.api_url = cfg['proxy_api']
c.ConfigurableHTTPProxy.command = [cfg['chp']]
c.ConfigurableHTTPProxy.pid_file = cfg['pid']
c.ConfigurableHTTPProxy.should_start = True
c.JupyterHub.authenticator_class = 'dummy'
c.Authenticator.allowed_users = {{cfg['user']}}
c.JupyterHub.spawner_class = 'simple'
c.SimpleLocalProcessSpawner.home_dir_template = cfg['homes'] + '/{{username}}'
c.Spawner.cmd = [cfg['cmd']]
c.Spawner.args = cfg['args']
c.Spawner.environment = cfg['env']
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
c.JupyterHub.services = [{{'name': 'handoff-test-admin', 'api_token': cfg['admin_token']}}]
c.JupyterHub.load_roles = [{{'name': 'handoff-test-admin', 'services': ['handoff-test-admin'],
                             'scopes': ['admin:users', 'admin:servers', 'tokens', 'access:servers']}}]
"""

    def start(self, timeout: float = 60) -> "JupyterHub":
        cfg_path = self.workdir / "jupyterhub_config.py"
        cfg_path.write_text(self.config())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "HANDOFF_"))}
        env["PYTHONUNBUFFERED"] = "1"
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        cmd = [str(Path(sys.executable).with_name("jupyterhub")), "-f", str(cfg_path)]
        self._spawn(cmd, env, self.workdir)
        self._wait(lambda: httpx.get(f"{self.url}/hub/api/", timeout=3).status_code == 200, timeout,
                   "answer on /hub/api/ through the proxy")
        return self

    # -- the hub's REST API, as an admin service --------------------------------------------------
    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/hub/api", timeout=60,
                            headers={"Authorization": f"token {self.admin_token}"})

    def spawn(self, timeout: float = 60) -> None:
        """Start the user's single-user server and wait until the hub says it is ready."""
        with self.api() as api:
            r = api.post(f"/users/{self.user}/server")
            if r.status_code not in (201, 202, 400):  # 400: already running
                raise self._fail(f"spawning {self.user}'s server: HTTP {r.status_code} {r.text}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                model = api.get(f"/users/{self.user}").json()
                server = (model.get("servers") or {}).get("", {})
                if server.get("ready"):
                    return
                if not model.get("pending") and not server:
                    raise self._fail(f"{self.user}'s server failed to start: {model}")
                time.sleep(0.3)
        raise self._fail(f"{self.user}'s server not ready within {timeout:.0f}s")

    def user_token(self, scopes: list[str], note: str = "laptop kernel", expires_in: int = 3600) -> str:
        """A token of the user's own, limited to ``scopes`` (what a user makes on /hub/token)."""
        with self.api() as api:
            r = api.post(f"/users/{self.user}/tokens",
                         json={"scopes": scopes, "note": note, "expires_in": expires_in})
            if r.status_code != 201:
                raise self._fail(f"minting a token for {self.user}: HTTP {r.status_code} {r.text}")
            return str(r.json()["token"])

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:  # let the hub stop the single-user servers it spawned
                with self.api() as api:
                    api.delete(f"/users/{self.user}/server", timeout=10)
            except httpx.HTTPError:
                pass
        super().stop(timeout)
        pid_file = self.workdir / "proxy.pid"  # the proxy outlives a hub killed mid-start
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def gateway_server(gw: EnterpriseGateway, **kwargs: Any) -> JupyterServerProcess:
    """A Jupyter Server with the handoff extension whose kernels come from ``gw``."""
    extra = list(kwargs.pop("extra_args", []))
    # the gateway refuses kernels for root; KERNEL_* variables are what a server forwards to it
    env = {"KERNEL_USERNAME": "handoff-tests", **kwargs.pop("env", {})}
    return JupyterServerProcess(extra_args=[*gw.server_args(), *extra], env=env, **kwargs)


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
