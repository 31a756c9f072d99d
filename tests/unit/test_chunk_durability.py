"""What a user relies on when save_state returns or fails: every chunk it names is on disk for
good, and a save cut off half way leaves no torn chunk and no temp file behind, whether or not
the early write-back (sync_file_range) is available."""
from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handoff_magic import atomic, chunks
from handoff_magic.chunks import CHUNK_SIZE, start_writeback
from handoff_magic.snapshot.capture import save_state
from handoff_magic.snapshot.restore import load_state

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux only")


def _save(bundle: Path, ns: dict[str, Any]) -> Any:
    return save_state(bundle, ns=ns, files=False, environ={})


def _arrays(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)   # noise: stored uncompressed, several chunks each
    return {"a": rng.random((2 * CHUNK_SIZE + 4096) // 8), "b": rng.random(CHUNK_SIZE // 8 + 7)}


def _visible(bundle: Path) -> set[str]:
    return {p.name for p in (bundle / "chunks").rglob("*") if p.is_file() and not p.name.startswith(".")}


def _temps(bundle: Path) -> list[Path]:
    return [p for p in (bundle / "chunks").rglob(".*") if p.is_file()]


@pytest.fixture(params=["writeback", "no-writeback"])
def writeback(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with early write-back as on Linux, and as where the call does not exist."""
    if request.param == "no-writeback":
        monkeypatch.setattr(chunks, "_sync_file_range", False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range is Linux only")
    return str(request.param)


def test_every_chunk_is_fsynced_before_it_is_visible_and_its_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: str) -> None:
    events: list[tuple[str, str]] = []
    real_fsync_file, real_fsync_dir, real_replace = atomic.fsync_file, atomic.fsync_dir, os.replace

    def fsync_file(path: Any) -> None:
        real_fsync_file(path)
        events.append(("fsync", str(path)))

    def fsync_dir(path: Any) -> None:
        real_fsync_dir(path)
        events.append(("dirsync", str(path)))

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("replace", f"{src}\0{dst}"))

    started = [0]
    real_start = chunks.start_writeback

    def start(fd: int) -> bool:
        ok = real_start(fd)
        started[0] += ok
        return ok

    monkeypatch.setattr(chunks, "fsync_file", fsync_file)
    monkeypatch.setattr(chunks, "fsync_dir", fsync_dir)
    monkeypatch.setattr(chunks, "start_writeback", start)
    monkeypatch.setattr(os, "replace", replace)
    bundle = tmp_path / "b"
    ns = _arrays(1)
    _save(tmp_path / "first", _arrays(0))   # the process's own lasting fds (the change tracker's) exist now
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
    started[0] = 0
    events.clear()
    report = _save(bundle, ns)
    assert (started[0] > 0) == (writeback == "writeback")
    if fds:
        assert len(os.listdir("/proc/self/fd")) == fds, "the save left files open"
    names = _visible(bundle)
    assert len(names) >= 4 and report.bytes_new >= ns["a"].nbytes + ns["b"].nbytes
    for name in names:
        moves = [i for i, (kind, arg) in enumerate(events) if kind == "replace" and arg.endswith("/" + name)]
        assert len(moves) == 1, name
        tmp, dst = events[moves[0]][1].split("\0")
        assert ("fsync", tmp) in events[:moves[0]], f"{name} became visible before its bytes were fsynced"
        assert ("dirsync", str(Path(dst).parent)) in events[moves[0]:], f"{name}'s directory entry never fsynced"
    assert ("dirsync", str(bundle / "chunks")) in events, "new shard directories' entries never fsynced"
    assert not _temps(bundle)
    back: dict[str, Any] = {}
    load_state(bundle, ns=back, files=False)
    assert all(np.array_equal(back[k], v) for k, v in ns.items())


def test_a_save_cut_off_by_a_full_disk_leaves_the_last_bundle_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: str) -> None:
    bundle = tmp_path / "b"
    first = _arrays(1)
    _save(bundle, first)
    before = _visible(bundle)
    manifest = (bundle / "manifest.json").read_bytes()
    real_write = os.write
    written = [0]

    def write(fd: int, data: Any) -> int:    # the disk fills up half way through the third chunk
        if os.fstat(fd).st_size >= CHUNK_SIZE // 2 and written[0] >= 2 * CHUNK_SIZE:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, memoryview(data)[:CHUNK_SIZE // 2])
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left"):
        _save(bundle, _arrays(2))
    monkeypatch.undo()
    assert written[0] >= 2 * CHUNK_SIZE, "the failure was meant to come after some chunks were written"
    assert _visible(bundle) == before, "a chunk of the failed save is visible"
    assert not _temps(bundle), "the failed save left temp files"
    assert (bundle / "manifest.json").read_bytes() == manifest
    back: dict[str, Any] = {}
    load_state(bundle, ns=back, files=False)
    assert all(np.array_equal(back[k], v) for k, v in first.items())


def test_a_failed_fsync_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writeback: str) -> None:
    bundle = tmp_path / "b"
    calls = [0]
    real = atomic.fsync_file

    def fsync_file(path: Any) -> None:     # the disk reports a write error for one chunk
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(chunks, "fsync_file", fsync_file)
    with pytest.raises(OSError, match="Input/output"):
        _save(bundle, _arrays(3))
    assert not _visible(bundle) and not _temps(bundle)
    assert not (bundle / "manifest.json").exists()


@linux
def test_start_writeback_takes_regular_files_and_declines_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 65536)
        assert start_writeback(fd) is True
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert start_writeback(w) is False     # ESPIPE: declined, never raised
    finally:
        os.close(r)
        os.close(w)
    assert chunks._sync_file_range is not False, "one file it cannot take must not turn it off for the others"


def test_where_the_call_is_missing_it_is_not_tried_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tried = [0]

    def missing(*_a: Any) -> int:
        tried[0] += 1
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(chunks, "_sync_file_range", missing)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert start_writeback(fd) is False and start_writeback(fd) is False
    finally:
        os.close(fd)
    assert tried[0] == 1
    monkeypatch.setattr(chunks, "_sync_file_range", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    fd = os.open(tmp_path / "f", os.O_WRONLY)
    try:
        assert start_writeback(fd) is False
    finally:
        os.close(fd)
