"""Test-session isolation (no test reads or writes the developer's real Jupyter config) and the
fixtures shared by every test folder: real Jupyter servers with the extension."""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fake_llm import FakeLLM
from tests.harness.server_process import JupyterServerProcess

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="handoff-tests-"))
for _name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
    _path = _SESSION_DIR / _name.lower()
    _path.mkdir()
    os.environ[_name] = str(_path)
for _name in ("HANDOFF_MODEL", "HANDOFF_SERVER_URL", "HANDOFF_TOKEN", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
              "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "JUPYTER_TOKEN", "HANDOFF_CONTEXT_TOKENS", "HANDOFF_PRICES"):
    os.environ.pop(_name, None)
os.environ.setdefault("MPLBACKEND", "Agg")
# A suite started from a background shell inherits SIGINT ignored, and so would every server,
# kernel and CLI it starts: the Ctrl-C tests would then fail for a reason no user has.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's Jupyter dirs go with the session (a machine running the suite every day
    would otherwise collect one per run in /tmp)."""
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


_TESTS = Path(__file__).resolve().parent
_TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier (``-m unit`` for a quick loop); e2e tests are slow."""
    for item in items:
        path = item.path.resolve()
        tier = path.relative_to(_TESTS).parts[0] if path.is_relative_to(_TESTS) else None
        if tier in _TIERS:
            item.add_marker(tier)
            if tier == "e2e":
                item.add_marker("slow")


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    """The loopback fake model (OpenAI and Anthropic wire formats), one per test module."""
    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="module")
def handoff_server() -> Iterator[JupyterServerProcess]:
    """One server shared by a test module (default settings)."""
    srv = JupyterServerProcess().start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def handoff_server_factory() -> Iterator[Callable[..., JupyterServerProcess]]:
    """``make(extra_args=[...], env={...})`` → a started server, cleaned up after the test."""
    made: list[JupyterServerProcess] = []

    def make(**kwargs: Any) -> JupyterServerProcess:
        srv = JupyterServerProcess(**kwargs)
        made.append(srv)
        return srv.start()

    try:
        yield make
    finally:
        for srv in made:
            srv.cleanup()
