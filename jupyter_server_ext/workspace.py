"""Where a run lives on disk and on the web: its directory, its files, and every link to it.

A run's workspace is ``<root_dir>/handoff-runs/<id>/`` (so JupyterLab shows it next to the
user's files): ``result.ipynb`` (the server's report, written by ``notebook.py``), the agent's
working files, and ``.handoff/`` (``bundle/`` as handed off, ``ckpt/`` the kernel's incremental
``save_state`` target, ``run.json`` the state a checkpoint saves). The URLs of the status page,
the result notebook, the diff... are built here and nowhere else.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from handoff_magic.state import StateError
from handoff_magic.state import check_run_id as state_check_run_id

from .errors import BadRequest

RUNS_DIR = "handoff-runs"                 # under the server's root_dir (a Lab-visible folder)
RESULT_NOTEBOOK = "result.ipynb"
SPARE_PREFIX = ".spare-"                  # a spare kernel's workspace until a run adopts it; never a
                                          # run id (no '.' in one), hidden in Lab
PRIVATE_DIR = ".handoff"                  # in a workspace, relative (also kernel-side, gateways)
CKPT_DIR = f"{PRIVATE_DIR}/ckpt"
RUN_JSON = f"{PRIVATE_DIR}/run.json"
SERVER_FILES = frozenset({RESULT_NOTEBOOK})  # what the server writes into a workspace itself
API = "/handoff/api"                      # JSON routes
PAGES = "/handoff/runs"                   # HTML status pages
RUN_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"   # in route regexes; handoff_magic.state.check_run_id agrees
LINK_KEYS = ("status_page", "notebook", "diff", "events", "lab")   # a run summary's "links"


log = logging.getLogger(__name__)


def remove_tree(path: Path, what: str) -> None:
    """Remove a directory the server made for a run or a kernel. Gone already is fine; a failure
    is logged, not raised (the run or kernel it belonged to has ended): ``what`` says what stays."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("jupyter-handoff: could not remove %s (%s stays on disk): %s", path, what, exc)


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a valid run id: a path can never come out of it (a ``BadRequest``)."""
    try:
        return state_check_run_id(run_id)
    except StateError as exc:
        raise BadRequest(exc.message, exc.hint or "list runs with GET /handoff/api/runs") from None


def run_paths(run_id: str) -> dict[str, str]:
    """Every server-relative URL path of a run (prefix them with a base URL). Not checked here:
    a run stored by an older server under a bad id is still listed (as failed), with its links."""
    return {
        "status_page": f"{PAGES}/{run_id}",
        "notebook": f"/lab/tree/{RUNS_DIR}/{run_id}/{RESULT_NOTEBOOK}",
        "diff": f"{API}/runs/{run_id}/diff",
        "events": f"{API}/runs/{run_id}/events",
        "lab": f"/lab/tree/{RUNS_DIR}/{run_id}",
        "diff_page": f"{PAGES}/{run_id}/diff",
        "answer": f"{PAGES}/{run_id}/answer",
        "cancel": f"{PAGES}/{run_id}/cancel",
        "list": PAGES,
    }


def run_links(base_url: str, run_id: str) -> dict[str, str]:
    """The links every notification, run summary and status page shares (wire format)."""
    base = base_url.rstrip("/")
    paths = run_paths(run_id)
    return {key: base + paths[key] for key in LINK_KEYS}


def page_links(base_url: str, run_id: str) -> dict[str, str]:
    """All of a run's paths under ``base_url`` (the status page's own links and form targets)."""
    base = base_url.rstrip("/")
    return {key: base + path for key, path in run_paths(run_id).items()}


class Workspace:
    """The runs' directories under the server's ``root_dir``, and the public base of links."""

    def __init__(self, root_dir: Path, public_url: Callable[[], str] = lambda: "") -> None:
        self.root_dir = Path(root_dir)
        self.runs_dir = self.root_dir / RUNS_DIR
        self._public_url = public_url

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / check_run_id(run_id)

    def api_path(self, run_id: str) -> str:
        """The Jupyter (contents API) path of a run's workspace."""
        return f"{RUNS_DIR}/{check_run_id(run_id)}"

    def new_spare_dir(self) -> Path:
        """A fresh, empty, private (0700) workspace for a spare kernel, beside the runs' (a run
        adopts it by a rename, so it must be on the same file system)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=SPARE_PREFIX, dir=self.runs_dir))

    def spare_api_path(self, spare: Path) -> str:
        """The Jupyter path of a spare's workspace (``start_kernel(path=...)``)."""
        return f"{RUNS_DIR}/{spare.name}"

    def spare_dirs(self) -> list[Path]:
        """Spare workspaces on disk (left by a server that was killed, or booting now)."""
        return sorted(self.runs_dir.glob(SPARE_PREFIX + "*")) if self.runs_dir.is_dir() else []

    def result_notebook(self, run_id: str) -> Path:
        return self.run_dir(run_id) / RESULT_NOTEBOOK

    def ckpt_dir(self, run_id: str) -> Path:
        """The kernel's incremental ``save_state`` target (same-disk kernels)."""
        return self.run_dir(run_id) / CKPT_DIR

    def run_json(self, run_id: str) -> Path:
        """The run state a checkpoint saves, handed to the kernel beside the bundle."""
        return self.run_dir(run_id) / RUN_JSON

    def public_url(self) -> str:
        """Base for links, without a trailing slash (``c.HandoffApp.public_url`` or the server's)."""
        return self._public_url().rstrip("/")

    def links(self, run_id: str) -> dict[str, str]:
        return run_links(self.public_url(), run_id)
