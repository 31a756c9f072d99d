"""BlobStore: uploaded chunks in ``data_dir/blobs/<sha[:2]>/<sha>``, and their garbage collection.

The address is the sha256 of the stored bytes (the layout of ``handoff_magic``'s chunk store, so
a run's bundle is materialised by hard links), so the server verifies uploads without decoding
(or unpickling) anything. Uploads stream through a ``BlobWriter``: a large chunk never sits in
memory and a cut connection leaves nothing but a temp file that ``abort`` removes.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from handoff_magic.atomic import fsync_dir
from handoff_magic.chunks import AddressHasher, address_matches, is_sha, shard_path

from .errors import BlobError, BlobTooLarge

TMP_PREFIX = ".tmp-"


def check_sha(sha: str) -> str:
    """Return ``sha`` if it is a chunk address (``blake3-<hex>`` or a sha256 hex digest); a path
    can never come out of it."""
    if not is_sha(sha):
        raise BlobError(f"{sha!r} is not a chunk address (blake3-<64 hex digits> or 64 hex digits of sha256)",
                        "chunk ids are the BLAKE3 (or sha256) hex digests of the stored bytes")
    return sha


class BlobWriter:
    """Streams one upload to a temp file, hashing as it goes; ``commit`` verifies and renames.

    Hashing and writing happen in the writer's own thread while the event loop keeps reading the
    socket (``offer`` hands a piece over without blocking; when the disk falls behind, the
    handler awaits ``write`` instead, which holds the connection back), so each byte is hashed
    once, as it arrives, off the loop.
    """

    QUEUE = 32   # pieces (tornado reads 64 KiB-1 MiB at a time) waiting for the disk

    def __init__(self, store: BlobStore, sha: str, max_bytes: int) -> None:
        self.store = store
        self.sha = check_sha(sha)
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = AddressHasher(self.sha)   # the algorithm the address names
        final = store.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        self._file: BinaryIO | None = open(self._tmp, "wb")
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE)
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _count(self, data: bytes) -> None:
        if self._file is None:
            raise BlobError("upload already finished", "retry the PUT")
        self.size += len(data)
        if self.size > self.max_bytes:
            self.abort()
            raise BlobTooLarge(f"chunk is larger than the {self.max_bytes} byte limit",
                               "split data into smaller chunks or raise HandoffApp.max_chunk_bytes")
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="handoff-blob-writer", daemon=True)
            self._thread.start()

    def offer(self, data: bytes) -> bool:
        """Queue ``data`` without blocking; False when the queue is full (then call ``write``)."""
        if self._queue.full():
            return False
        self._count(data)
        self._queue.put_nowait(data)
        return True

    def write(self, data: bytes) -> None:
        """Queue ``data``, waiting for room (call it off the event loop)."""
        self._count(data)
        self._queue.put(data)

    def _drain(self) -> None:
        file = self._file
        while True:
            piece = self._queue.get()
            if piece is None:
                return
            if self._failed is None and file is not None:
                try:
                    self._hash.update(piece)
                    file.write(piece)
                except BaseException as exc:  # noqa: BLE001 - raised by commit()
                    self._failed = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def commit(self) -> bool:
        """Verify the hash and publish the blob atomically; True if it was new."""
        if self._file is None:
            raise BlobError("upload already finished", "retry the PUT")
        self._join()
        if self._failed is not None:
            self.abort()
            raise BlobError(f"the chunk could not be stored ({self._failed})", "upload the chunk again")
        digest = self._hash.digest()
        if digest != self.sha:
            self.abort()
            raise BlobError(f"uploaded bytes hash to {digest}, not {self.sha}: the chunk was corrupted "
                            "in transit or addressed wrongly; upload it again",
                            "upload the chunk again; nothing was stored")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self.store.path(self.sha)
        existed = final.exists()
        os.replace(self._tmp, final)
        fsync_dir(final.parent)
        return not existed

    def abort(self) -> None:
        file, self._file = self._file, None
        if self._thread is not None:
            while True:   # the writer must not wait on a full queue forever
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._join()
        if file is not None:
            file.close()
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


class BlobStore:
    """``root/<sha[:2]>/<sha>``; every method is safe from any thread (files are published by rename)."""

    def __init__(self, root: Path, max_chunk_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_chunk_bytes = max_chunk_bytes

    def path(self, sha: str) -> Path:
        return shard_path(self.root, check_sha(sha))

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def missing(self, shas: Iterable[str]) -> list[str]:
        seen: set[str] = set()
        out: list[str] = []
        for sha in shas:
            if sha in seen:
                continue
            seen.add(sha)
            if not self.has(sha):
                out.append(sha)
        return out

    def writer(self, sha: str, max_bytes: int | None = None) -> BlobWriter:
        return BlobWriter(self, sha, self.max_chunk_bytes if max_bytes is None else max_bytes)

    def put(self, sha: str, data: bytes | memoryview) -> bool:
        """Store ``data`` under ``sha`` after verifying it; idempotent; True if it was new."""
        if self.has(sha):
            if not address_matches(sha, data):
                raise BlobError(f"data does not hash to {sha}", "send the chunk's own bytes")
            return False
        w = self.writer(sha)
        try:
            w.write(bytes(data))
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def open(self, sha: str) -> BinaryIO:
        return open(self.path(sha), "rb")

    def read(self, sha: str) -> bytes:
        with self.open(sha) as f:
            return f.read()

    def size(self, sha: str) -> int:
        return self.path(sha).stat().st_size

    def collect(self, referenced: set[str], *, min_age: float) -> dict[str, int]:
        """Delete chunks not in ``referenced`` and stale upload temp files, sparing anything
        younger than ``min_age`` seconds (an upload whose run is not created yet)."""
        now = time.time()
        deleted = kept = freed = 0
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime < min_age:
                    kept += 1
                    continue
                if f.name.startswith(TMP_PREFIX) or (f.name not in referenced and is_sha(f.name)):
                    f.unlink(missing_ok=True)
                    deleted += 1
                    freed += st.st_size
                else:
                    kept += 1
        return {"deleted": deleted, "kept": kept, "bytes_freed": freed}
