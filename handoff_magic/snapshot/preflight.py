"""``%handoff --dry-run`` / ``%snapshot check``: what would travel, how, how big, and what would
be left out and why, before anything is sent. The capture runs for real into a scratch bundle
(so every "ok" was actually pickled and checked) that is deleted afterwards."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .capture import save_state
from .reports import CaptureReport


def preflight(shell: Any = None, *, ns: dict[str, Any] | None = None, root: Path | None = None,
              environ: dict[str, str] | None = None) -> CaptureReport:
    """The report a handoff's capture would give now; nothing is kept, nothing is sent."""
    with tempfile.TemporaryDirectory(prefix="handoff-dry-run-") as scratch:
        try:
            report = save_state(scratch, shell, ns=ns, root=root, environ=environ)
        except BundleError as exc:   # the working directory would be refused: say why, list the variables
            report = save_state(scratch, shell, ns=ns, root=root, environ=environ, files=False)
            report.problem = str(exc)
    report.dry_run = True
    report.path = ""
    report.manifest = {}
    return report
