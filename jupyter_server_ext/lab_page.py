"""The cloud's JupyterLab page that a result-notebook link opens starts no kernel.

JupyterLab and Notebook 7 start the kernel a notebook's metadata names as soon as they open it
(page option ``notebookStartsKernel``; server-wide that is ``LabServerApp.notebook_starts_kernel``,
an operator's choice we do not make for them). A run's ``result.ipynb`` is a report: reading it
should not boot a kernel beside the run's own, and JupyterLab has no per-document switch (kernel
metadata that names no kernel brings up the "Select Kernel" dialog instead). Both page handlers
pass their page options through the server setting ``page_config_hook``, so this hook turns
``notebookStartsKernel`` off for pages whose URL is a result-notebook link only, after the hook
that was there before (JupyterHub's). Lab reads the option once per page load: notebooks opened
later in that same tab start no kernel either until it is reloaded, and the toolbar's kernel
selector starts one on demand.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .workspace import RESULT_NOTEBOOK, RUN_ID_PATTERN, RUNS_DIR

PageConfigHook = Callable[[Any, dict[str, Any]], dict[str, Any]]

# /lab/tree/..., /lab/workspaces/NAME/tree/..., /doc/tree/... (JupyterLab), /notebooks/... (Notebook 7)
RESULT_PAGE = re.compile(r"/(?:(?:lab|doc)(?:/workspaces/[^/]+)?/tree|notebooks)/"
                         rf"{re.escape(RUNS_DIR)}/{RUN_ID_PATTERN}/{re.escape(RESULT_NOTEBOOK)}$")


class ResultPageHook:
    """A ``page_config_hook``: the previous hook's page options, and no kernel start on a
    result-notebook page."""

    def __init__(self, previous: PageConfigHook | None) -> None:
        self.previous = previous

    def __call__(self, handler: Any, page_config: dict[str, Any]) -> dict[str, Any]:
        if self.previous is not None:
            page_config = self.previous(handler, page_config)
        if RESULT_PAGE.search(handler.request.path):
            page_config["notebookStartsKernel"] = False
        return page_config


def install(web_settings: dict[str, Any]) -> None:
    """Chain the hook into the web app's settings once (called when the server has started, so
    after any other extension, e.g. JupyterHub's, has set its own)."""
    previous = web_settings.get("page_config_hook")
    if not isinstance(previous, ResultPageHook):
        web_settings["page_config_hook"] = ResultPageHook(previous)
