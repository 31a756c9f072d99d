"""HandoffApp: the extension's lifecycle: it builds the store, blobs, workspace, notifier and
run manager from its settings (``settings.HandoffSettings``, every knob a trait there) and
starts and stops them with the server."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_config_path, jupyter_data_dir, jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp, ExtensionAppJinjaMixin

from . import lab_page
from .blobs import BlobStore
from .notify import Notifier
from .run.gateway import is_gateway_kernel_manager
from .run.manager import RunManager
from .run.sandbox import BUNDLE_VIEWS, SandboxState, prepare
from .service import RunService
from .settings import HandoffSettings
from .store import RunStore
from .workspace import Workspace

TEMPLATES = Path(__file__).parent / "templates"


class HandoffApp(HandoffSettings, ExtensionAppJinjaMixin, ExtensionApp):
    """Accepts handed-off agent runs and resumes them in fresh kernels on this server."""

    name = "handoff"
    load_other_extensions = True

    # set in initialize_settings
    store: RunStore
    blobs: BlobStore
    workspace: Workspace
    service: RunService
    sandbox_state: SandboxState
    run_manager: RunManager | None = None   # None until initialize_settings (or if it failed)
    notifier: Notifier | None = None

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
        assert self.serverapp is not None
        data = Path(self.data_dir).expanduser()
        data.mkdir(parents=True, exist_ok=True)
        self.store = RunStore(data / "handoff.sqlite")
        self.blobs = BlobStore(data / "blobs", max_chunk_bytes=self.max_chunk_bytes,
                               direct=self.direct_uploads)
        self.workspace = Workspace(Path(self.serverapp.root_dir), self.get_public_url)
        self.sandbox_state = self._prepare_sandbox(data)
        self.notifier = Notifier(self.store, self.notify_urls, self.get_public_url, log=self.log,
                                 retry_base=self.notify_retry_seconds)
        self.run_manager = RunManager(self, self.store, self.blobs, self.serverapp.kernel_manager,
                                      self.workspace, notifier=self.notifier, sandbox=self.sandbox_state,
                                      server_token=self._server_token())
        self.service = RunService(self, self.store, self.blobs, self.workspace, self.run_manager,
                                  sandbox=self.sandbox_state)
        self._log_notify_targets()
        self.settings.update({"handoff_service": self.service})
        self.log.info("jupyter-handoff: data in %s", data)

    def _prepare_sandbox(self, data: Path) -> SandboxState:
        """Probe bwrap once and install the sandbox kernel spec (see run/sandbox.py)."""
        sa = self.serverapp
        assert sa is not None
        root = Path(sa.root_dir).resolve()
        hidden = {str(data.resolve()), str(Path(jupyter_runtime_dir()).resolve()),
                  str(Path(jupyter_data_dir()).resolve()), str(Path.home()), str(root),
                  *(str(Path(p).resolve()) for p in jupyter_config_path())}
        runtime = getattr(sa, "runtime_dir", "")
        if runtime:
            hidden.add(str(Path(runtime).resolve()))
        config = {"workspaces": str(self.workspace.runs_dir.resolve()), "hidden": sorted(hidden),
                  "bundle_views": str((data / BUNDLE_VIEWS).resolve()),
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

    def _server_token(self) -> str:
        """This server's token: kernels never see it (``RunManager.kernel_env``)."""
        sa = self.serverapp
        for obj, attr in ((getattr(sa, "identity_provider", None), "token"), (sa, "token")):
            try:
                value = getattr(obj, attr, "") if obj is not None else ""
            except Exception:  # noqa: BLE001 - traitlets may raise on deprecated access
                value = ""
            if isinstance(value, str) and value:
                return value
        return ""

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
        assert self.notifier is not None and self.run_manager is not None
        if not self.result_notebook_starts_kernel:
            lab_page.install(serverapp.web_app.settings)
        self.notifier.start()
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
