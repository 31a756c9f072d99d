"""HandoffApp: the extension's configuration and lifecycle (store, runner, notifier).

Trait names are a contract (DESIGN "Configuration"): users set ``c.HandoffApp.model`` etc.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp, ExtensionAppJinjaMixin
from traitlets import (
    Bool,
    Enum,
    Float,
    Integer,
    List,
    TraitError,
    Unicode,
    Union,
    default,
)

from .run.sandbox import SandboxState, default_memory_limit, parse_size, prepare
from .store import BlobStore, RunStore

TEMPLATES = Path(__file__).parent / "templates"

# a separator before the next URL: whitespace, or a comma followed by "scheme://" (a comma inside
# a URL, e.g. mailto://...?to=a@x.org,b@x.org, stays part of that URL)
_URL_SEP = re.compile(r"\s+|,\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")


def split_urls(value: object) -> list[str]:
    """Notification targets from a list, a JSON list string, or comma/whitespace-separated URLs.

    ``--HandoffApp.notify_urls='["a://x", "b://y"]'`` or ``=a://x,b://y`` given once on the command
    line arrives as one string; read naively, every target but one would be lost without a word.
    """
    items = [value] if isinstance(value, str) else list(value or [])   # type: ignore[call-overload]
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TraitError(f"HandoffApp.notify_urls: {item!r} is not a URL string")
        text = item.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise TraitError(f"HandoffApp.notify_urls: {text[:80]!r} looks like a JSON list but is "
                                 f"not valid JSON ({exc}); write it as '[\"json://host/hook\", "
                                 f"\"mailto://...\"]' or as comma-separated URLs") from None
            urls.extend(split_urls(parsed))
            continue
        urls.extend(u for u in _URL_SEP.split(text) if u)
    return urls


class UrlList(List):
    """A List of URL strings that also accepts one string holding several URLs (see split_urls)."""

    def validate(self, obj: Any, value: Any) -> list[Any] | None:
        return super().validate(obj, split_urls(value) if isinstance(value, (str, list, tuple)) else value)


class HandoffApp(ExtensionAppJinjaMixin, ExtensionApp):
    """Accepts handed-off agent runs and resumes them in fresh kernels on this server."""

    name = "handoff"
    load_other_extensions = True

    data_dir = Unicode(help="Where runs (SQLite) and uploaded chunks live. "
                            "Default: <jupyter data dir>/handoff.").tag(config=True)
    max_bundle_bytes = Integer(8 * 1024**3, help="Largest bundle (sum of its stored chunks) a run "
                                                  "may reference; larger ones get 413.").tag(config=True)
    max_chunk_bytes = Integer(256 * 1024**2, help="Largest single uploaded chunk.").tag(config=True)
    max_concurrent_runs = Integer(2, help="Runs executing at once; others wait as 'queued'.").tag(config=True)
    model = Unicode("", help="Model spec used for remote runs (openai:MODEL, anthropic:MODEL, "
                             "scripted:PATH); empty = the run's own model preference.").tag(config=True)
    model_base_url = Unicode("", help="Endpoint for the model provider (else the SDK's "
                                      "*_BASE_URL env var).").tag(config=True)
    model_api_key_env = Unicode("", help="Name of the environment variable holding the model key "
                                         "(else the SDK convention, e.g. OPENAI_API_KEY).").tag(config=True)
    notify_urls = UrlList(Unicode(), help="apprise URLs notified when a run completes, fails, is "
                                          "cancelled or needs input: a list, a JSON list string, or "
                                          "comma/whitespace-separated URLs.").tag(config=True)
    notify_retry_seconds = Float(2.0, help="First retry delay for a failed notification; doubles "
                                           "per attempt up to 5 minutes.").tag(config=True)
    public_url = Unicode("", help="Base URL used in links (notifications, status pages). "
                                  "Default: this server's URL + base_url.").tag(config=True)
    kernel_name = Unicode("python3", help="Kernel spec for remote runs.").tag(config=True)
    keep_kernel = Bool(False, help="Keep a finished run's kernel alive (for inspection).").tag(config=True)
    warm_kernels = Integer(0, help="Keep this many (0 or 1) spare kernels booted so a handoff skips "
                                   "kernel start-up (same-disk, unsandboxed kernels only: "
                                   "sandbox='none').").tag(config=True)
    max_events_wait = Float(60.0, help="Longest a long-poll for events may wait, in seconds.").tag(config=True)
    exec_timeout = Float(3600.0, help="Longest one run_python call of a remote run may take, in "
                                      "seconds; then it is stopped and the agent told.").tag(config=True)
    stuck_after = Float(help="Notify 'stuck' (with links to answer, cancel or pull the run back) when "
                             "a running run shows no progress for this many seconds. Default: "
                             "exec_timeout + 5 minutes; 0 turns it off.").tag(config=True)
    context_tokens = Integer(0, help="The model's context window in tokens, for models jupyter-handoff "
                                     "does not know (0: the known window, else HANDOFF_CONTEXT_TOKENS, "
                                     "else 128000).").tag(config=True)
    max_tokens_per_run = Integer(0, help="Token budget (input + output) of a remote run before it "
                                         "pauses and asks whether to go on (0: no limit).").tag(config=True)
    transport = Unicode("auto", help="How bundles reach run kernels: 'shared' (same disk), 'kernel' (over "
                                     "the kernel's channels, for gateways), 'auto' (kernel when "
                                     "--gateway-url is set).").tag(config=True)

    sandbox = Enum(["auto", "bwrap", "none"], "auto",
                   help="Isolation of run kernels: 'auto' and 'bwrap' start them under bubblewrap "
                        "(workspace the only writable place; server files, other runs, home, other "
                        "processes and the network invisible) and refuse runs when bwrap does not "
                        "work here; 'none' runs them unsandboxed (a warning on the status pages). "
                        "Gateway kernels are isolated by the gateway.").tag(config=True)
    kernel_network = Bool(False, help="Let sandboxed run kernels use the network (e.g. to "
                                      "download data); off by default.").tag(config=True)
    kernel_memory_limit = Union([Integer(), Unicode()], default_value="",
                                help="Address-space limit of a sandboxed run kernel: bytes or "
                                     "'4G', '512M'; '' = half this machine's memory; 0 = none. "
                                     "Past it the kernel gets MemoryError and the run an 'error' "
                                     "event.").tag(config=True)
    kernel_max_processes = Integer(512, help="Most processes a sandboxed run kernel may have "
                                             "(a pids cgroup where writable; 0 = no cap).").tag(config=True)

    @default("stuck_after")
    def _default_stuck_after(self) -> float:
        return self.exec_timeout + 300.0

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return str(Path(jupyter_data_dir()) / "handoff")

    # set in initialize_settings
    store: RunStore
    blobs: BlobStore
    run_manager: Any = None
    notifier: Any = None
    sandbox_state: SandboxState

    def memory_limit_bytes(self) -> int:
        """``kernel_memory_limit`` in bytes (0: no limit)."""
        value = self.kernel_memory_limit
        if value == "":
            return default_memory_limit()
        try:
            return parse_size(value)
        except ValueError as exc:
            raise TraitError(f"HandoffApp.kernel_memory_limit: {exc}") from None

    def _prepare_sandbox(self, data: Path) -> SandboxState:
        """Probe bwrap once and install the sandbox kernel spec (see run/sandbox.py)."""
        from jupyter_core.paths import jupyter_config_path, jupyter_runtime_dir

        from .gateway_client import is_gateway_kernel_manager
        sa = self.serverapp
        assert sa is not None
        root = Path(sa.root_dir).resolve()
        hidden = {str(data.resolve()), str(Path(jupyter_runtime_dir()).resolve()),
                  str(Path(jupyter_data_dir()).resolve()), str(Path.home()), str(root),
                  *(str(Path(p).resolve()) for p in jupyter_config_path())}
        runtime = getattr(sa, "runtime_dir", "")
        if runtime:
            hidden.add(str(Path(runtime).resolve()))
        config = {"workspaces": str(root / "handoff-runs"), "hidden": sorted(hidden),
                  "network": bool(self.kernel_network), "memory_limit": self.memory_limit_bytes(),
                  "max_processes": int(self.kernel_max_processes)}
        state = prepare(self.sandbox, self.kernel_name, sa.kernel_spec_manager, data / "kernelspecs",
                        config, gateway=is_gateway_kernel_manager(sa.kernel_manager))
        if state.mode == "bwrap":
            self.log.info("jupyter-handoff: run kernels start in a bubblewrap sandbox (network %s, "
                          "memory limit %s bytes)", "on" if config["network"] else "off",
                          config["memory_limit"] or "none")
        elif state.mode == "gateway":
            self.log.info("jupyter-handoff: run kernels come from a gateway, which isolates them")
        elif state.warning:
            self.log.warning("jupyter-handoff: %s", state.warning)
        return state

    def get_public_url(self) -> str:
        """Base for links, without a trailing slash (e.g. ``http://host:8888/base``)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        assert self.serverapp is not None
        hub_url = os.environ.get("JUPYTERHUB_PUBLIC_URL", "")  # hub single-user server: hub URL + /user/<name>/
        if hub_url and os.environ.get("JUPYTERHUB_SERVICE_PREFIX") == self.serverapp.base_url:
            return hub_url.rstrip("/")  # (the prefix check ignores variables inherited from a hub session)
        return self.serverapp.connection_url.rstrip("/")

    def initialize_templates(self) -> None:
        self.template_paths = [str(TEMPLATES)]

    def initialize_settings(self) -> None:
        data = Path(self.data_dir).expanduser()
        data.mkdir(parents=True, exist_ok=True)
        self.store = RunStore(data / "handoff.sqlite")
        self.blobs = BlobStore(data / "blobs", max_chunk_bytes=self.max_chunk_bytes)
        self.sandbox_state = self._prepare_sandbox(data)
        from .notify import Notifier
        self.notifier = Notifier(self.store, self.notify_urls, self.get_public_url, log=self.log,
                                 retry_base=self.notify_retry_seconds)
        try:
            from .runner import RunManager
        except ImportError as exc:  # runner not installed/landed: API still serves blobs and reads
            self.log.error("jupyter-handoff: runner unavailable (%s); runs will not execute", exc)
            self.run_manager = None
        else:
            assert self.serverapp is not None
            self.run_manager = RunManager(self, self.store, self.blobs, self.serverapp.kernel_manager,
                                          Path(self.serverapp.root_dir))
        self._log_notify_targets()
        self.settings.update({"handoff_app": self})
        self.log.info("jupyter-handoff: data in %s", data)

    def _log_notify_targets(self) -> None:
        """Say which targets will be notified (schemes only: a URL may hold a password)."""
        urls = list(self.notify_urls)
        if not urls:
            self.log.info("jupyter-handoff: no notification targets (set c.HandoffApp.notify_urls)")
            return
        for i, url in enumerate(urls, 1):
            scheme, sep, _ = url.partition("://")
            if sep and scheme:
                self.log.info("jupyter-handoff: notification target %d of %d: %s://…", i, len(urls), scheme)
            else:
                self.log.warning("jupyter-handoff: notification target %d of %d is not a URL (no "
                                 "scheme://); fix c.HandoffApp.notify_urls", i, len(urls))

    def initialize_handlers(self) -> None:
        from .handlers import handlers
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Runs once the event loop is up: deliver pending notifications, resume unfinished runs."""
        self.notifier.start()
        if self.run_manager is not None:
            await self.run_manager.start()

    async def stop_extension(self) -> None:
        if self.run_manager is not None:
            try:
                await asyncio.wait_for(self.run_manager.stop(), 30)
            except Exception:
                self.log.exception("jupyter-handoff: stopping runs failed; they resume on next start")
        if self.notifier is not None:
            await self.notifier.stop()
        # the store stays open: a runner thread finishing its last write must not hit a closed
        # database; SQLite (WAL) needs no close to be consistent
