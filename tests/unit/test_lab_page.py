"""Which cloud pages open without starting a kernel: the result-notebook links, and only them."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_server_ext import lab_page
from jupyter_server_ext.workspace import run_paths


def _page(path: str, settings: dict[str, Any]) -> dict[str, Any]:
    handler = SimpleNamespace(request=SimpleNamespace(path=path))   # what a page handler carries
    return settings["page_config_hook"](handler, {"notebookStartsKernel": True, "token": "t"})


@pytest.mark.parametrize("path", [
    run_paths("3f2a9c1d7e00")["notebook"],
    "/user/ana/lab/tree/handoff-runs/3f2a9c1d7e00/result.ipynb",      # a JupyterHub base URL
    "/lab/workspaces/auto-x/tree/handoff-runs/3f2a9c1d7e00/result.ipynb",
    "/notebooks/handoff-runs/3f2a9c1d7e00/result.ipynb",               # Notebook 7
])
def test_a_result_notebook_link_opens_without_a_kernel(path: str) -> None:
    settings: dict[str, Any] = {}
    lab_page.install(settings)
    assert _page(path, settings) == {"notebookStartsKernel": False, "token": "t"}


@pytest.mark.parametrize("path", [
    "/lab", "/lab/tree/analysis.ipynb", "/lab/tree/handoff-runs/3f2a9c1d7e00/notes.ipynb",
    "/lab/tree/handoff-runs/3f2a9c1d7e00/sub/result.ipynb", "/lab/tree/other/handoff-runs/x/result.ipynb.bak",
    "/lab/tree/handoff-runs/../result.ipynb",
])
def test_every_other_page_keeps_the_operators_setting(path: str) -> None:
    settings: dict[str, Any] = {}
    lab_page.install(settings)
    assert _page(path, settings)["notebookStartsKernel"] is True


def test_the_hook_runs_after_the_one_already_there_and_is_installed_once() -> None:
    def hub_hook(handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
        return {**page_config, "hubUser": "ana"}

    settings: dict[str, Any] = {"page_config_hook": hub_hook}
    lab_page.install(settings)
    lab_page.install(settings)      # a second start does not wrap it again
    assert settings["page_config_hook"].previous is hub_hook
    assert _page("/user/ana/lab/tree/handoff-runs/abc/result.ipynb", settings) == {
        "notebookStartsKernel": False, "token": "t", "hubUser": "ana"}
    assert _page("/user/ana/lab", settings)["hubUser"] == "ana"
