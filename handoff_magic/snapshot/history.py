"""The kernel's In/Out history: captured as text (secrets redacted), put back so numbering continues."""
from __future__ import annotations

import logging
from typing import Any

from ..secrets import redact, redact_cell

log = logging.getLogger(__name__)

MAX_MIME_BYTES = 100_000


MAX_TEXT_PLAIN = 20_000


def capture_history(shell: Any, values: set[str]) -> dict[str, Any]:
    """In as text, Out as text/plain + small rich mime, with secrets redacted."""
    if shell is None:
        return {"In": [], "Out": {}}
    hm = shell.history_manager
    ins = [redact_cell(str(s), values) for s in hm.input_hist_parsed]
    raw = [redact_cell(str(s), values) for s in hm.input_hist_raw]
    out: dict[str, dict[str, Any]] = {}
    for n, obj in list(hm.output_hist.items()):
        try:
            data, _md = shell.display_formatter.format(obj)
        except Exception:  # noqa: BLE001 - a broken repr only loses rich output
            data = {"text/plain": repr(obj)}
        keep: dict[str, Any] = {}
        for mime, v in data.items():
            text = v if isinstance(v, str) else None
            if mime == "text/plain":
                keep[mime] = redact(str(v)[:MAX_TEXT_PLAIN], values, patterns=True)
            elif text is not None and len(text) <= MAX_MIME_BYTES:
                keep[mime] = redact(text, values, patterns=True)
        out[str(n)] = keep
    return {"In": ins, "In_raw": raw, "Out": out, "execution_count": int(getattr(shell, "execution_count", 0))}


class HistoryOutput:
    """An ``Out[n]`` brought over as data: shows the rich output it had, is not the original object."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = {k: v for k, v in bundle.items() if isinstance(k, str)}

    def __repr__(self) -> str:
        return str(self.bundle.get("text/plain", "<output>"))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return dict(self.bundle)


def _current_cell_stored(shell: Any) -> bool:
    """Whether the request running now goes into In (a silent/store_history=False call does not)."""
    kernel = getattr(shell, "kernel", None)
    get_parent = getattr(kernel, "get_parent", None)
    if get_parent is not None:
        try:
            content = (get_parent("shell") or {}).get("content") or {}
        except Exception:  # noqa: BLE001 - older ipykernel: assume an ordinary cell
            content = {}
        if "code" in content:
            return bool(content.get("store_history", True)) and not content.get("silent", False)
    return True


def restore_history(shell: Any, ns: dict[str, Any], history: dict[str, Any]) -> None:
    """Put In/Out back so numbering continues after the restored cells."""
    hm = shell.history_manager
    ins = [str(s) for s in history.get("In", [])] or [""]
    raw = [str(s) for s in history.get("In_raw", ins)]
    if len(raw) != len(ins):
        raw = list(ins)
    # IPython 9 bumps execution_count when a cell starts, 8 when it ends: keep whichever offset applies
    offset = int(shell.execution_count) - (len(hm.input_hist_parsed) - 1)
    if _current_cell_stored(shell) and len(hm.input_hist_parsed) > 1:
        ins = ins + [hm.input_hist_parsed[-1]]   # the cell running this restore keeps its place
        raw = raw + [hm.input_hist_raw[-1]]
    hm.input_hist_parsed[:] = ins
    hm.input_hist_raw[:] = raw
    hm.output_hist.clear()
    for n, bundle in history.get("Out", {}).items():
        try:
            hm.output_hist[int(n)] = HistoryOutput(bundle)
        except (TypeError, ValueError):
            continue
    for i, text in enumerate(ins[1:], start=1):
        ns[f"_i{i}"] = text
    count = len(ins) - 1 + offset
    if count <= int(shell.execution_count):
        _continue_in_new_history_session(hm)
    shell.execution_count = count


def _continue_in_new_history_session(hm: Any) -> None:
    """The restored numbering reuses cell numbers this kernel's history database already holds
    for its session: go on in a new history session (as ``%reset`` does), so the next cells
    never collide with stored (session, line) rows ("ERROR! Session/line number was not unique")."""
    if not getattr(hm, "enabled", False) or not hasattr(hm, "new_session"):
        return   # no history database (e.g. HistoryManager.enabled = False)
    try:
        hm.writeout_cache()   # this session's pending lines keep their numbers
        hm.new_session()
    except Exception as exc:  # noqa: BLE001 - In/Out are restored either way; only SQLite logging is at stake
        log.warning("could not start a new history session after restoring In/Out (%s); "
                    "IPython may report a duplicate line number once", exc)
