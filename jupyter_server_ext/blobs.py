"""BlobStore: uploaded chunks in ``data_dir/blobs/<sha[:2]>/<sha>``, and their garbage collection.

The address is the hash of the stored bytes (the layout of ``handoff_magic``'s chunk store, so
a client's local store and the server's share one format), so the server verifies uploads without decoding
(or unpickling) anything. Uploads stream through a ``BlobWriter``: a large chunk never sits in
memory and a cut connection leaves nothing but a temp file that ``abort`` removes.

Durability is off the request path: a verified upload is answered at once and stays under its
temp name ("pending") while a background flusher fsyncs it, overlapping the disk with the next
chunks' upload; ``settle`` waits for a batch's flushes and publishes it under its addresses.
The run is created (the laptop told "safe to close") only after ``settle``, so the guarantee is
unchanged, but a 1 GB handoff no longer pays 256 fsyncs one after the other in its uploads. A
pending chunk is never visible under its address, so a power cut can leave temp files (GC
removes them) but never a torn chunk.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from handoff_magic.atomic import fsync_dir, fsync_file
from handoff_magic.chunks import AddressHasher, address_matches, is_sha, shard_path

from .errors import BlobError, BlobTooLarge

TMP_PREFIX = ".tmp-"
FLUSHERS = 2   # background fsyncs of pending uploads at once (the disk merges them)


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
        final = store.final_path(sha)
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

    def commit(self, *, durable: bool = True) -> bool:
        """Verify the hash and publish the blob; True if it was new. ``durable=False`` leaves it
        pending (see the module docstring) until ``BlobStore.settle``: visible to ``has`` and
        ``missing`` at once, published under its address by the settle."""
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
        if durable:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if not durable:
            return self.store.add_pending(self.sha, self._tmp)
        final = self.store.final_path(self.sha)
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
        self._pending: dict[str, tuple[Path, Future[None]]] = {}   # sha -> (temp file, its fsync)
        self._lock = threading.Lock()
        self._flusher: ThreadPoolExecutor | None = None

    def final_path(self, sha: str) -> Path:
        return shard_path(self.root, check_sha(sha))

    def path(self, sha: str) -> Path:
        """Where the chunk's bytes are (a pending upload is settled first)."""
        self.settle([sha])
        return self.final_path(sha)

    def has(self, sha: str) -> bool:
        with self._lock:
            if sha in self._pending:
                return True
        return self.final_path(sha).is_file()

    def add_pending(self, sha: str, tmp: Path) -> bool:
        """Take a verified, not yet durable upload; True if the store did not have it."""
        with self._lock:
            new = sha not in self._pending and not self.final_path(sha).is_file()
            if new:
                if self._flusher is None:
                    self._flusher = ThreadPoolExecutor(FLUSHERS, thread_name_prefix="handoff-fsync")
                self._pending[sha] = (tmp, self._flusher.submit(fsync_file, tmp))
        if not new:
            tmp.unlink(missing_ok=True)
        return new

    def settle(self, shas: Iterable[str]) -> None:
        """Make the pending ones of ``shas`` durable and publish them under their addresses:
        wait for their fsyncs, rename, then fsync each directory once."""
        with self._lock:
            if not self._pending:
                return
            batch = {sha: self._pending.pop(sha) for sha in set(shas) if sha in self._pending}
        if not batch:
            return
        try:
            for _tmp, flushed in batch.values():
                flushed.result()
            for sha, (tmp, _f) in batch.items():
                os.replace(tmp, self.final_path(sha))
            for d in {self.final_path(sha).parent for sha in batch}:
                fsync_dir(d)
        except BaseException:
            retry = {sha: tmp for sha, (tmp, _f) in batch.items() if tmp.exists()}
            with self._lock:   # not published: a later settle flushes again, GC removes stale ones
                for sha, tmp in retry.items():
                    if sha not in self._pending:
                        assert self._flusher is not None   # it made the flushes that failed
                        self._pending[sha] = (tmp, self._flusher.submit(fsync_file, tmp))
            raise

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
            self.settle([sha])   # what refers to it next (a checkpoint) must survive a crash
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
        with self._lock:   # a pending upload older than min_age is as dead as an unreferenced chunk
            stale = {sha for sha, (tmp, _f) in self._pending.items() if _older(tmp, now, min_age)}
            for sha in stale - referenced:
                del self._pending[sha]
            pending = {tmp for tmp, _f in self._pending.values()}
        deleted = kept = freed = 0
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for f in sub.iterdir():
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if now - st.st_mtime < min_age or f in pending:
                    kept += 1
                    continue
                if f.name.startswith(TMP_PREFIX) or (f.name not in referenced and is_sha(f.name)):
                    f.unlink(missing_ok=True)
                    deleted += 1
                    freed += st.st_size
                else:
                    kept += 1
        return {"deleted": deleted, "kept": kept, "bytes_freed": freed}


def _older(path: Path, now: float, age: float) -> bool:
    try:
        return now - path.stat().st_mtime >= age
    except FileNotFoundError:
        return True
