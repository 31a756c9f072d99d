"""Browser-test helpers: a local JupyterLab, a "cloud" Jupyter Server, and Playwright on Debian chromium.

Why these pieces: the product's face is a widget inside JupyterLab and a result notebook opened
in the cloud server's JupyterLab, so the tests drive both in a real browser. Nothing is mocked:
``LabProcess`` is ``python -m jupyterlab`` on a loopback port (token auth, temp root dir, its own
settings dir so the theme is known), the cloud is ``server_process.JupyterServerProcess``.
Playwright drives ``/usr/bin/chromium`` (never ``playwright install``: no download is possible).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.harness.server_process import JupyterServerProcess

CHROMIUM = os.environ.get("HANDOFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LIGHT, DARK = "JupyterLab Light", "JupyterLab Dark"


def require_chromium() -> str:
    """The chromium binary, or a test FAILURE (not a skip) saying how to get it."""
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"chromium not found at {CHROMIUM}: run `bash scripts/install-system-deps.sh` "
                    "(installs the Debian package chromium) or set HANDOFF_CHROMIUM to a Chromium binary")
    return path


def lab_settings(settings_dir: Path, theme: str = LIGHT) -> None:
    """User settings written before JupyterLab starts: a known theme and no news/update toasts."""
    apputils = settings_dir / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True, exist_ok=True)
    (apputils / "themes.jupyterlab-settings").write_text(json.dumps({"theme": theme}))
    (apputils / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # the kernel-shutdown flow is part of the journey; no autosave races with the test's edits
    docmanager = settings_dir / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True, exist_ok=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))


class LabProcess(JupyterServerProcess):
    """``python -m jupyterlab`` with the handoff extension: the user's "local" Jupyter.

    Its kernels inherit ``env`` (HANDOFF_SERVER_URL / HANDOFF_TOKEN point at the cloud), so
    ``%handoff`` and the widget's buttons find the server without arguments.
    """

    def __init__(self, *, theme: str = LIGHT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings_dir = self._tmp / "lab-settings"
        self.workspaces_dir = self._tmp / "lab-workspaces"
        self.workspaces_dir.mkdir(parents=True, exist_ok=True)
        lab_settings(self.settings_dir, theme)

    module = "jupyterlab"

    def app_args(self) -> list[str]:
        return [
            f"--LabApp.user_settings_dir={self.settings_dir}",
            f"--LabApp.workspaces_dir={self.workspaces_dir}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]

    def lab_url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.url}/{path.lstrip('/')}{sep}token={self.token}"


def cloud_lab_url(cloud: JupyterServerProcess, path: str = "lab") -> str:
    """A URL on the cloud server that also logs the browser in (token in the query, once)."""
    sep = "&" if "?" in path else "?"
    return f"{cloud.url}/{path.lstrip('/')}{sep}token={cloud.token}"


def shot(page: Any, name: str, locator: Any = None, *, full_page: bool = False) -> Path:
    """Save a screenshot of the page (or one element) as tests/artifacts/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if locator is not None:
        locator.screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=full_page)
    return path
