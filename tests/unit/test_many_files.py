"""A working directory of 50,000 small files: a clear error before anything is read or sent,
naming the largest directories; with a .handoffignore (gitignore syntax) the capture succeeds."""
from __future__ import annotations

from pathlib import Path

import pytest

from handoff_magic import save_state
from handoff_magic.errors import BundleError
from handoff_magic.snapshot.preflight import preflight


def test_fifty_thousand_files_then_handoffignore(tmp_path: Path) -> None:
    work = tmp_path / "work"
    for d in range(50):
        sub = work / "frames" / f"batch{d:02d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / f"{i}.txt").touch()
    (work / "analysis.py").write_text("x = 1\n")
    (work / "notes").mkdir()
    (work / "notes" / "keep.md").write_text("keep\n")
    (work / "notes" / "scratch.tmp").write_text("drop\n")
    with pytest.raises(BundleError) as err:
        save_state(tmp_path / "b", ns={}, root=work, environ={})
    assert "50003 files" in str(err.value) and "frames/ (50000 files)" in str(err.value)
    assert ".handoffignore" in str(err.value)
    assert not (tmp_path / "b" / "manifest.json").exists()
    dry = preflight(ns={"n": 1}, root=work, environ={})   # the dry run answers, and says why it would fail
    assert dry.dry_run and "frames/ (50000 files)" in (dry.problem or "") and dry.var("n").outcome == "ok"
    assert "WOULD FAIL" in str(dry) and "nothing was sent" in str(dry)

    (work / ".handoffignore").write_text("# generated frames stay here\nframes/\n*.tmp\n")
    rep = save_state(tmp_path / "b", ns={}, root=work, environ={})
    assert sorted(f["path"] for f in rep.files) == [".handoffignore", "analysis.py", "notes/keep.md"]


def test_jupyters_collaboration_store_stays_behind(tmp_path: Path) -> None:
    """A Lab with jupyter-collaboration keeps every shared document's edit history (deleted text
    too) in .jupyter_ystore.db in its working directory: never part of a handoff."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "analysis.py").write_text("x = 1\n")
    for name in (".jupyter_ystore.db", ".jupyter_ystore.db-wal", ".jupyter_ystore.db-shm"):
        (work / name).write_bytes(b"SQLite format 3\0 api_key = 'sk-typed-then-deleted'")
    rep = save_state(tmp_path / "b", ns={}, root=work, environ={})
    assert [f["path"] for f in rep.files] == ["analysis.py"]
