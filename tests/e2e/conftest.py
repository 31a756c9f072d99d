"""Fixtures of the browser tests: one Debian chromium, the "cloud" server and the user's local JupyterLab."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.browser_harness import CHROMIUM_ARGS, LabProcess, lab_settings, require_chromium
from tests.harness.server_process import JupyterServerProcess


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Debian chromium for the module; ``launch`` gives it a fresh temporary user-data dir and
    each test opens its own context (no cookies or storage shared between tests)."""
    exe = require_chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def cloud() -> Iterator[JupyterServerProcess]:
    """The "cloud": a Jupyter Server with the handoff extension (and JupyterLab, installed in the venv)."""
    settings = Path(tempfile.mkdtemp(prefix="handoff-cloud-lab-"))
    lab_settings(settings)
    srv = JupyterServerProcess(extra_args=[f"--LabApp.user_settings_dir={settings}"]).start()
    try:
        yield srv
    finally:
        srv.cleanup()
        shutil.rmtree(settings, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(cloud: JupyterServerProcess) -> Iterator[LabProcess]:
    """The user's local JupyterLab; its kernels know the cloud through HANDOFF_SERVER_URL/TOKEN."""
    tmp = Path(tempfile.mkdtemp(prefix="handoff-lab-"))
    env = {"HANDOFF_SERVER_URL": cloud.url, "HANDOFF_TOKEN": cloud.token,
           "HANDOFF_CACHE_DIR": str(tmp / "cache"), "MPLBACKEND": "Agg"}
    srv = LabProcess(env=env, startup_timeout=120)
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
