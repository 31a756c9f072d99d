"""Crash-safe file writes shared by the client and the server extension.

Every write goes to a temp file in the target's own directory (so the rename never crosses a
filesystem), is flushed and fsync'd, then ``os.replace``d over the target: a reader sees the old
file or the new one, never a torn one. The temp file is removed if anything fails.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "copy_file", "fsync_dir", "fsync_file",
           "link_or_copy"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, *,
                       mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically. ``mode`` sets the file's permissions (without it the
    file keeps ``mkstemp``'s private 0o600); parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, mode: int | None = None) -> None:
    """``atomic_write_text`` of ``data`` as compact JSON (non-ASCII kept as is)."""
    atomic_write_text(path, json.dumps(data, ensure_ascii=False), mode=mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems refuse opening directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file already written and closed (a batch of them is flushed together later)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(dst: Path) -> Path | None:
    """Where a content-addressed ``dst`` is first written, or None when it exists already (its
    bytes are right by its name)."""
    if dst.exists():
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst.with_name(f".{dst.name}.tmp{os.getpid()}-{threading.get_ident()}")


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link ``src`` to ``dst`` (copy where links are impossible), unless ``dst`` exists.

    Used for content-addressed files, so an existing ``dst`` already has the right bytes; the
    link/copy lands under a temp name first, so ``dst`` is never seen half-copied."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_beside(dst)
    if tmp is None:
        return
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or hard links not allowed: copy instead
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` as a file of its own (a new inode, unlike ``link_or_copy``), unless
    ``dst`` exists; under a temp name first. The bytes move inside the OS (``copy_file_range``:
    ~0.5 s per GB here, no trip through Python) where it can, else ``shutil.copyfile``."""
    src, dst = Path(src), Path(dst)
    tmp = _temp_beside(dst)
    if tmp is None:
        return
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            left = os.fstat(fin.fileno()).st_size
            try:
                while left > 0:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), left)
                    if n == 0:
                        break
                    left -= n
            except (AttributeError, OSError):   # no copy_file_range here, or not across these filesystems
                fin.seek(0)
                fout.seek(0)
                fout.truncate()
                shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
