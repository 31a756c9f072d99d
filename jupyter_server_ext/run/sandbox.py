"""The run kernel's sandbox: a jupyter_client kernel provisioner that starts the kernel under
bubblewrap (``bwrap``).

Why a provisioner: the server's own kernel manager keeps starting, interrupting, restarting
and culling run kernels; only *how the process is launched* changes. Inside the sandbox:

- the run's workspace is the only writable place (plus a private ``/tmp``); the system
  (``/usr``, ``/etc`` minus its secret files) and Python (prefixes, ``sys.path``, ``PYTHONPATH``)
  are read-only;
- the server's data dir, runtime dir, Jupyter config and data dirs, the server's root dir
  (so every other run's workspace) and the home directory are not there at all;
- a new PID namespace: the kernel is PID 1 and ``/proc`` shows only the sandbox, so no
  ``/proc/<server pid>/environ``; all capabilities are dropped;
- no network (``--unshare-net``) unless ``c.HandoffApp.kernel_network``: the kernel speaks ZMQ
  over IPC sockets in a private per-kernel directory bound into the sandbox, so it needs no TCP;
- the bundle the run was handed off with (or its last checkpoint) is at ``/handoff-bundle``,
  read-only: hard links to the server's stored chunks, so a restore maps the very pages the
  upload wrote, with no copy, and nothing in the sandbox can write them (``BUNDLE_MOUNT``);
- ``RLIMIT_AS`` (``c.HandoffApp.kernel_memory_limit``): an allocation past it raises
  ``MemoryError`` in the kernel instead of the OOM killer taking the server; a process cap via a
  pids cgroup where one is writable, else ``RLIMIT_NPROC`` (which Linux does not apply to root).

The provisioner is selected by a kernel spec (``handoff-sandbox``) that ``install_kernelspec``
derives from ``c.HandoffApp.kernel_name`` and puts on the server's kernel spec path; its
``kernel_provisioner.config`` carries the paths to hide and the limits. Enterprise Gateway
kernels never use it: they are isolated by the gateway.

(Just over 400 lines: the provisioner and the bwrap arguments it builds are one unit.)
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from traitlets import Bool, Integer, List, Unicode

from handoff_magic.atomic import atomic_write_json

PROVISIONER_NAME = "handoff-sandbox"
KERNELSPEC_NAME = "handoff-sandbox"
MODES = ("auto", "bwrap", "none")
# /etc stays readable (locale, certificates, passwd for getpwuid) minus what holds secrets
ETC_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/ssh",
               "/etc/sudoers", "/etc/sudoers.d", "/etc/jupyter", "/etc/ipython")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
PIDS_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")
BUNDLE_MOUNT = "/handoff-bundle"   # where a sandboxed kernel sees its bundle view, read-only
BUNDLE_VIEWS = "bundle-views"      # under c.HandoffApp.data_dir: the views, one per kernel workspace
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create namespaces here; ``hint`` says how to fix or opt out."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def parse_size(value: object) -> int:
    """Bytes from ``4294967296``, ``"4G"``, ``"512M"``, ``"1.5GiB"``; 0 means no limit."""
    if isinstance(value, int):
        return max(0, value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size: write bytes or a number with K, M, G or T")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


def default_memory_limit() -> int:
    """Half the machine's memory: a runaway run cannot take the server down with it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 0


def python_paths(env: dict[str, str] | None = None) -> list[str]:
    """Directories the kernel's Python needs read-only: the interpreter's prefixes, every
    existing ``sys.path`` entry (site-packages, editable installs' .pth targets) and each
    ``PYTHONPATH`` entry of the kernel's environment (tests run worktrees that way)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(sys.executable).resolve().parent.parent), str(Path(sys.executable).parent)}
    paths.update(p for p in sys.path if p)
    pp = (env or os.environ).get("PYTHONPATH", "")
    paths.update(p for p in pp.split(os.pathsep) if p)
    for pkg in ("handoff_magic", "jupyter_server_ext"):
        mod = sys.modules.get(pkg)
        if mod is not None and getattr(mod, "__file__", None):
            paths.add(str(Path(mod.__file__).resolve().parent.parent))  # type: ignore[arg-type]
    tmp = os.path.realpath(tempfile.gettempdir())
    out: set[str] = set()
    for p in paths:
        for candidate in (os.path.abspath(p), os.path.realpath(p)):
            # never "/" or the host's temp dir (a script's own dir on sys.path): they would
            # show everything, or cover the private /tmp
            if os.path.exists(candidate) and not _inside(tmp, candidate):
                out.add(candidate)
    return sorted(out)


def bundle_view_dir(views: Path, kernel_root: str) -> Path:
    """The host directory a kernel booted in workspace ``kernel_root`` sees at BUNDLE_MOUNT: one
    per workspace name (a run id, or a spare's ``.spare-XXXX``, which keeps its name inside the
    sandbox after a run adopts it)."""
    return views / Path(kernel_root).name


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _depth(path: str) -> int:
    return len(Path(path).parts)


@dataclass
class SandboxSpec:
    """What one kernel's sandbox looks like; ``bwrap_args`` turns it into a command line."""
    workspace: str
    private_dirs: list[str]                   # read-write, e.g. the kernel's IPC socket dir
    readonly: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    network: bool = False
    bwrap: str = "bwrap"
    bundle_view: str = ""                     # shown read-only at BUNDLE_MOUNT (see bundle_view_dir)

    def bwrap_args(self) -> list[str]:
        """bwrap options, ordered parent-first so a hidden dir inside a read-only tree is masked
        and a read-only tree inside a hidden dir (a venv under home) still shows."""
        args = [self.bwrap, "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL",
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--hostname", "handoff-sandbox", "--proc", "/proc", "--dev", "/dev",
                "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
        if not self.network:
            args.append("--unshare-net")
        ops: list[tuple[int, int, str, list[str]]] = []
        for d in SYSTEM_DIRS:
            if os.path.islink(d):
                ops.append((_depth(d), 0, d, ["--symlink", os.readlink(d), d]))
            elif os.path.isdir(d):
                ops.append((_depth(d), 0, d, ["--ro-bind", d, d]))
        bound = [d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        for p in self.readonly:  # each tree once (a site-packages inside a bound prefix is covered)
            if not any(_inside(p, b) for b in bound) and \
                    not any(_inside(p, q) and p != q for q in self.readonly):
                ops.append((_depth(p), 0, p, ["--ro-bind", p, p]))
        bound += self.readonly
        for h in [*ETC_SECRETS, *self.hidden]:
            if h == "/" or not os.path.exists(h) or not any(_inside(h, b) and h != b or h == b
                                                            for b in bound):
                continue  # not inside anything we show: already invisible
            mask = ["--tmpfs", h] if os.path.isdir(h) else ["--ro-bind", "/dev/null", h]
            ops.append((_depth(h), 1, h, mask))
        for p in [self.workspace, *self.private_dirs]:
            ops.append((_depth(p), 2, p, ["--bind", p, p]))
        if self.bundle_view:
            ops.append((_depth(BUNDLE_MOUNT), 2, BUNDLE_MOUNT, ["--ro-bind", self.bundle_view, BUNDLE_MOUNT]))
        for _, _, _, op in sorted(ops, key=lambda o: (o[0], o[1], o[2])):
            args += op
        # the root tmpfs holding the mount points goes read-only: nothing but the workspace,
        # the private dirs and /tmp takes a write
        return args + ["--remount-ro", "/", "--chdir", self.workspace, "--"]


def probe(bwrap: str = "bwrap") -> str:
    """'' when bwrap can build a sandbox here (namespaces allowed), else why not."""
    exe = shutil.which(bwrap)
    if exe is None:
        return f"{bwrap!r} is not installed"
    spec = SandboxSpec(workspace="/tmp", private_dirs=[], bwrap=exe)
    try:
        res = subprocess.run([*spec.bwrap_args(), "/bin/true"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"running {exe} failed: {exc}"
    if res.returncode != 0:
        return f"{exe} cannot create a sandbox here: {res.stderr.strip() or res.returncode}"
    return ""


class _PidsCgroup:
    """A pids cgroup capping the sandbox's process count, where the cgroup tree is writable."""

    def __init__(self, name: str, limit: int) -> None:
        self.path: Path | None = None
        for root in PIDS_CGROUP_ROOTS:
            base = Path(root)
            if not (base / "cgroup.procs").exists():
                continue  # not a cgroup hierarchy (e.g. the tmpfs holding v1 hierarchies)
            for stale in base.glob("handoff-*"):  # left by kernels whose cleanup came before their exit
                try:
                    stale.rmdir()   # succeeds only for an empty cgroup
                except OSError:
                    pass
            p = base / name
            try:
                p.mkdir(exist_ok=True)
                (p / "pids.max").write_text(str(limit))
            except OSError:  # read-only, or a v2 tree without the pids controller
                try:
                    p.rmdir()
                except OSError:
                    pass
                continue
            self.path = p
            return

    def wrap(self, cmd: list[str]) -> list[str]:
        """Join the cgroup first, then exec the sandbox (its children inherit the cgroup)."""
        if self.path is None:
            return cmd
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def remove(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass  # processes still exiting; an empty cgroup left behind is harmless


def _as_signal(returncode: int | None) -> int | None:
    """bwrap exits 128+N when the kernel dies of signal N; report it as Popen would for an
    unsandboxed kernel (-N), so "killed by SIGKILL" reads the same either way."""
    if returncode is not None and 128 < returncode < 128 + 65:
        return -(returncode - 128)
    return returncode


class _BwrapProcess:
    """The bwrap Popen, with the kernel's own end reported (see _as_signal) to everyone who
    polls it: the provisioner, the restarter, the run's executor."""

    def __init__(self, popen: subprocess.Popen[Any]) -> None:
        self._popen = popen

    def poll(self) -> int | None:
        return _as_signal(self._popen.poll())

    def wait(self, timeout: float | None = None) -> int | None:
        return _as_signal(self._popen.wait(timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._popen, name)


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner that launches the kernel inside bwrap, over IPC instead of TCP."""

    workspaces = Unicode(help="Directory holding the run workspaces; a kernel's cwd must be one "
                              "of them.").tag(config=True)
    hidden = List(Unicode(), help="Paths not visible inside the sandbox.").tag(config=True)
    network = Bool(False, help="Let the kernel use the network.").tag(config=True)
    memory_limit = Integer(0, help="RLIMIT_AS in bytes (0: none).").tag(config=True)
    max_processes = Integer(512, help="Most processes in the sandbox (0: no cap).").tag(config=True)
    bwrap = Unicode("bwrap", help="The bubblewrap executable.").tag(config=True)
    bundle_views = Unicode("", help="Directory (outside every workspace) of the kernels' bundle "
                                    "views: <bundle_views>/<workspace name> is shown read-only at "
                                    f"{BUNDLE_MOUNT}; empty: none.").tag(config=True)

    _private: str | None = None
    _cgroup: _PidsCgroup | None = None

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        cwd = self._workspace(str(kwargs.get("cwd") or ""))
        km = self.parent
        assert km is not None, "the sandbox provisioner is always owned by a KernelManager"
        if self._private is None:  # kept across restarts: the connection file lives there
            self._private = tempfile.mkdtemp(prefix="handoff-k-")
        km.transport = "ipc"
        km.cache_ports = False
        km.connection_file = f"{self._private}/kernel.json"
        km.ip = f"{self._private}/k"
        env = dict(kwargs.get("env") or os.environ)
        env.update(HOME="/tmp", TMPDIR="/tmp")
        kwargs["env"] = env
        kwargs = await super().pre_launch(**kwargs)
        kwargs["cmd"] = self._command(cwd, env, list(kwargs["cmd"]))
        return kwargs

    def _workspace(self, cwd: str) -> str:
        """The kernel's cwd, which must be one run's workspace (never the workspaces' root)."""
        real, root = os.path.realpath(cwd), os.path.realpath(self.workspaces)
        if not self.workspaces or not _inside(real, root) or real == root:
            raise RuntimeError(f"the handoff sandbox kernel starts only in a run workspace under "
                               f"{root}, not in {real}")
        return real

    def _command(self, cwd: str, env: dict[str, str], kernel_cmd: list[str]) -> list[str]:
        """prlimit (memory, processes) -> bwrap -> the kernel, joined to a pids cgroup if any."""
        assert self._private is not None
        view = ""
        if self.bundle_views:   # made here, empty; the server links the run's chunks into it later
            view = str(bundle_view_dir(Path(self.bundle_views), cwd))
            os.makedirs(view, mode=0o700, exist_ok=True)
        spec = SandboxSpec(workspace=cwd, private_dirs=[self._private], readonly=python_paths(env),
                           hidden=[os.path.realpath(h) for h in self.hidden], network=self.network,
                           bwrap=shutil.which(self.bwrap) or self.bwrap, bundle_view=view)
        cmd = spec.bwrap_args() + kernel_cmd
        limits = [f"--as={self.memory_limit}"] if self.memory_limit > 0 else []
        if self.max_processes > 0:
            self._cgroup = self._cgroup or _PidsCgroup(f"handoff-{self.kernel_id}", self.max_processes)
            if self._cgroup.path is None and os.getuid() != 0:
                limits.append(f"--nproc={self.max_processes}")
            return self._cgroup.wrap(["prlimit", *limits, "--", *cmd] if limits else cmd)
        return ["prlimit", *limits, "--", *cmd] if limits else cmd

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        info = await super().launch_kernel(cmd, **kwargs)
        assert self.process is not None
        self.process = _BwrapProcess(self.process)  # type: ignore[assignment]
        return info

    def _kernel_pid(self) -> int | None:
        """The kernel's pid seen from outside: the one process bwrap started (PID 1 inside)."""
        if self.process is None:
            return None
        pid = self.process.pid
        for _ in range(3):  # sh -> prlimit -> bwrap exec in place; bwrap forks the sandbox
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return None
            if not kids:
                return None
            child = int(kids[0])
            try:
                exe = os.readlink(f"/proc/{child}/exe")
            except OSError:
                return child
            if os.path.basename(exe) != "bwrap":
                return child
            pid = child
        return None

    async def send_signal(self, signum: int) -> None:
        """SIGINT (interrupt) goes to the kernel only: bwrap itself would die of it and take
        the kernel with it; killing signals go to the whole group as usual."""
        if signum in (signal.SIGKILL, signal.SIGTERM):
            await super().send_signal(signum)
            return
        pid = self._kernel_pid()
        if pid is None:
            await super().send_signal(signum)
            return
        try:
            os.killpg(pid, signum)  # the kernel leads its own session (--new-session)
        except OSError:
            os.kill(pid, signum)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if not restart:
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)
                self._private = None
            if self._cgroup is not None:
                self._cgroup.remove()
                self._cgroup = None


def install_kernelspec(kernel_spec_manager: Any, base_name: str, spec_dir: Path,
                       config: dict[str, Any]) -> str:
    """Write the ``handoff-sandbox`` kernel spec (``base_name``'s argv and env, launched by the
    sandbox provisioner with ``config``) under ``spec_dir`` and put that dir on the server's
    kernel spec path; returns the spec's name for ``start_kernel``."""
    base = kernel_spec_manager.get_kernel_spec(base_name)
    metadata = dict(base.metadata or {})
    metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME, "config": config}
    body = {"argv": base.argv, "env": base.env, "language": base.language,
            "display_name": f"{base.display_name} (handoff sandbox)",
            "interrupt_mode": base.interrupt_mode, "metadata": metadata}
    atomic_write_json(spec_dir / KERNELSPEC_NAME / "kernel.json", body)
    dirs = list(kernel_spec_manager.kernel_dirs)
    if str(spec_dir) not in dirs:
        kernel_spec_manager.kernel_dirs = [*dirs, str(spec_dir)]
    hide_from_listing(kernel_spec_manager, KERNELSPEC_NAME)
    return KERNELSPEC_NAME


def hide_from_listing(kernel_spec_manager: Any, name: str) -> None:
    """Leave kernel spec ``name`` out of ``find_kernel_specs`` (so out of ``/api/kernelspecs``
    and the Lab launcher, where starting it outside a run workspace is refused anyway) while
    ``get_kernel_spec(name)``, which the kernel manager resolves a start by, still finds it.

    jupyter_client has no "hidden" flag for a spec, and its two lookups differ: listing goes
    through ``find_kernel_specs`` (also ``get_all_specs``), resolving by name through
    ``_find_spec_directory``; so the listing of this one manager is filtered."""
    listing = kernel_spec_manager.find_kernel_specs
    if getattr(listing, "hides", None) == name:
        return

    def find_kernel_specs() -> dict[str, str]:
        return {k: v for k, v in listing().items() if k != name}

    find_kernel_specs.hides = name  # type: ignore[attr-defined]
    kernel_spec_manager.find_kernel_specs = find_kernel_specs



@dataclass
class SandboxState:
    """What ``c.HandoffApp.sandbox`` resolved to at start-up, for the runner and status pages."""
    mode: str              # "bwrap" | "none" | "gateway" | "unavailable"
    kernel_name: str       # the kernel spec run kernels start with
    problem: str = ""      # why runs are refused (mode "unavailable")
    hint: str = ""
    bundle_views: str = ""  # mode "bwrap": the kernels' read-only bundle views (host side)

    @property
    def views(self) -> Path | None:
        """The bundle views' directory, or None where kernels get copies (no bwrap)."""
        return Path(self.bundle_views) if self.bundle_views else None

    @property
    def warning(self) -> str:
        """Shown on the status pages when run kernels are not isolated."""
        if self.mode == "none":
            return ("Run kernels are NOT sandboxed (c.HandoffApp.sandbox = 'none'): code in a run can "
                    "read this server's files, tokens and other runs.")
        if self.mode == "unavailable":
            return f"Remote runs are refused: {self.problem}. {self.hint}"
        return ""


INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow user "
                "namespaces, or run kernels unsandboxed with c.HandoffApp.sandbox = 'none'")


def prepare(mode: str, kernel_name: str, kernel_spec_manager: Any, spec_dir: Path,
            config: dict[str, Any], gateway: bool) -> SandboxState:
    """Resolve ``c.HandoffApp.sandbox`` once: probe bwrap and install the sandbox kernel spec.

    ``auto`` and ``bwrap`` refuse runs when bwrap does not work (``auto`` is the default, so a
    server without bwrap is safe rather than silently open); gateway kernels are isolated by
    the gateway and start with ``kernel_name`` as they are."""
    if mode not in MODES:
        raise ValueError(f"c.HandoffApp.sandbox must be one of {', '.join(MODES)}, not {mode!r}")
    if gateway:
        return SandboxState("gateway", kernel_name)
    if mode == "none":
        return SandboxState("none", kernel_name)
    why = probe(config.get("bwrap", "bwrap"))
    if not why and not entry_points(group="jupyter_client.kernel_provisioners", name=PROVISIONER_NAME):
        return SandboxState("unavailable", kernel_name, f"the {PROVISIONER_NAME} kernel provisioner is not "
                            "registered in this Python environment",
                            "reinstall jupyter-handoff here (pip install jupyter-handoff, or pip install -e . "
                            "in a checkout) so its entry point is installed")
    if why:
        return SandboxState("unavailable", kernel_name, f"the run sandbox is not available: {why}",
                            INSTALL_HINT)
    return SandboxState("bwrap", install_kernelspec(kernel_spec_manager, kernel_name, spec_dir, config),
                        bundle_views=str(config.get("bundle_views", "")))
