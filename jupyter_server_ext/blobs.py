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

Uploads are written with O_DIRECT where the file system takes it (``direct``; one that refuses
it, such as tmpfs before Linux 6.6, gets the page cache): whole 4 KiB blocks gathered in a writer lane's aligned buffer
go straight to the disk, the last partial block through the cache. Buffered writes cost this
2-core VM 1-2.5 s of system time per GB (page-cache growth) plus the write-back at fsync;
direct ones about 0.3 s, and the data is on the disk when the upload ends, so the flusher's
fsync only has metadata left. The price is that the first read of a chunk comes from the disk
(a run's kernel maps its chunks without reading them): ``prefetch`` queues those reads all at
once when they are known to be next (a pull back), so the disk works ahead of the GETs.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
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
LANES = 4      # threads that hash and write uploads (a handoff PUTs 3 chunks at once)
ALIGN = 4096   # O_DIRECT: buffer address, length and file offset in whole blocks of this
STAGE = 1024 * 1024   # a lane's aligned buffer: uploaded bytes are gathered here into whole blocks


def check_sha(sha: str) -> str:
    """Return ``sha`` if it is a chunk address (``blake3-<hex>`` or a sha256 hex digest); a path
    can never come out of it."""
    if not is_sha(sha):
        raise BlobError(f"{sha!r} is not a chunk address (blake3-<64 hex digits> or 64 hex digits of sha256)",
                        "chunk ids are the BLAKE3 (or sha256) hex digests of the stored bytes")
    return sha


class _Lane:
    """A long-lived thread that hashes and writes the pieces of the uploads bound to it, each
    upload's pieces in order. Starting a thread per upload stalled the event loop until the new
    thread first ran (``Thread.start`` waits for it): about a fifth of the loop's time during a
    1 GB handoff on a busy 2-core machine."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[tuple[BlobWriter, bytes | memoryview | None]] = queue.SimpleQueue()
        self.bound = 0   # uploads bound to this lane now (the store's lock guards it)
        self.stage = mmap.mmap(-1, STAGE)   # page-aligned, reused by every upload on the lane
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            writer, piece = self.jobs.get()
            writer._work(piece, self.stage)


class BlobWriter:
    """Streams one upload to a temp file, hashing as it goes; ``commit`` verifies and renames.

    Hashing and writing happen on one of the store's writer lanes while the event loop keeps
    reading the socket (``offer`` hands a piece over without blocking; when the disk falls
    behind, the handler awaits ``write`` instead, which holds the connection back), so each byte
    is hashed once, as it arrives, off the loop.
    """

    QUEUE = 32   # pieces (tornado reads 64 KiB-1 MiB at a time) waiting for the disk

    def __init__(self, store: BlobStore, sha: str, max_bytes: int) -> None:
        self.store = store
        self.sha = check_sha(sha)
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = AddressHasher(self.sha)   # the algorithm the address names
        final = store.final_path(sha)
        self._tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        self._fd: int | None = None   # opened by the lane at the first piece (no file work on the loop)
        self._direct = False
        self._finished = False        # committed or aborted: no more pieces
        self._aborted = False
        self._carry = b""   # the bytes past the last whole block (O_DIRECT writes whole blocks)
        self._room = threading.Semaphore(self.QUEUE)
        self._drained = threading.Event()
        self._failed: BaseException | None = None
        self._lane: _Lane | None = None

    def _count(self, data: bytes | memoryview) -> None:
        if self._finished:
            raise BlobError("upload already finished", "retry the PUT")
        self.size += len(data)
        if self.size > self.max_bytes:
            self.abort()
            raise BlobTooLarge(f"chunk is larger than the {self.max_bytes} byte limit",
                               "split data into smaller chunks or raise HandoffApp.max_chunk_bytes")
        if self._lane is None:
            self._lane = self.store._bind_lane()

    def offer(self, data: bytes) -> bool:
        """Queue ``data`` without blocking; False when the queue is full (then call ``write``)."""
        if not self._room.acquire(blocking=False):
            return False
        try:
            self._count(data)
        except BaseException:
            self._room.release()
            raise
        self._enqueue(data)
        return True

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``, waiting for room (call it off the event loop)."""
        self._count(data)
        self._room.acquire()
        self._enqueue(data)

    def _enqueue(self, data: bytes | memoryview) -> None:
        lane = self._lane
        if lane is None or self._aborted:   # aborted while it waited for room: dropped
            self._room.release()
            return
        lane.jobs.put((self, data))

    def _work(self, piece: bytes | memoryview | None, stage: mmap.mmap) -> None:
        """On the lane: hash and write one piece (None: every earlier piece is done)."""
        if piece is None:
            self._drained.set()
            return
        try:
            if self._failed is None and not self._aborted:
                if self._fd is None:
                    self._fd, self._direct = self.store._open_temp(self._tmp)
                self._hash.update(piece)
                self._store(self._fd, memoryview(piece).cast("B"), stage)
        except BaseException as exc:  # noqa: BLE001 - raised by commit()
            self._failed = exc
        finally:
            self._room.release()

    def _store(self, fd: int, data: memoryview, stage: mmap.mmap) -> None:
        """Write ``data`` after what came before. With O_DIRECT the bytes are gathered in the
        lane's aligned buffer and whole blocks go to the disk; the rest waits for the next piece
        (or ``commit``)."""
        while data and self._direct:
            held = len(self._carry)
            stage[:held] = self._carry
            take = min(STAGE - held, len(data))
            stage[held: held + take] = data[:take]
            data = data[take:]
            end = held + take
            whole = end - end % ALIGN
            self._carry = stage[whole:end]
            if whole:
                self._write(fd, memoryview(stage)[:whole])
        if data or (self._carry and not self._direct):
            self._write(fd, memoryview(self._carry + bytes(data)) if self._carry else data)
            self._carry = b""

    def _write(self, fd: int, view: memoryview) -> None:
        while view:
            try:
                n = os.write(fd, view)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered(fd)   # this file system takes no direct writes: write through the cache
                continue
            view = view[n:]
            if self._direct and n % ALIGN:
                self._buffered(fd)   # a short write left the offset off a block boundary

    def _buffered(self, fd: int) -> None:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
        self._direct = False

    def _join(self) -> None:
        """Wait until the lane has handled every piece queued so far, and leave the lane."""
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.jobs.put((self, None))
            self._drained.wait()
            self.store._unbind_lane(lane)

    def commit(self, *, durable: bool = True) -> bool:
        """Verify the hash and publish the blob; True if it was new. ``durable=False`` leaves it
        pending (see the module docstring) until ``BlobStore.settle``: visible to ``has`` and
        ``missing`` at once, published under its address by the settle."""
        if self._finished:
            raise BlobError("upload already finished", "retry the PUT")
        self._finished = True
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
        if self._fd is None:   # an empty upload: no piece opened the file
            self._fd, self._direct = self.store._open_temp(self._tmp)
        fd, self._fd = self._fd, None
        try:
            if self._carry:   # the last partial block goes through the page cache
                self._buffered(fd)
                self._write(fd, memoryview(self._carry))
                self._carry = b""
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self._tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        if not durable:
            return self.store.add_pending(self.sha, self._tmp)
        final = self.store.final_path(self.sha)
        existed = final.exists()
        os.replace(self._tmp, final)
        fsync_dir(final.parent)
        return not existed

    def abort(self) -> None:
        """Drop the upload: the lane skips its queued pieces, the temp file is removed."""
        self._finished = self._aborted = True   # from now on the lane writes none of its pieces
        self._join()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


class BlobStore:
    """``root/<sha[:2]>/<sha>``; every method is safe from any thread (files are published by rename)."""

    def __init__(self, root: Path, max_chunk_bytes: int = 256 * 1024 * 1024, *, direct: bool = True) -> None:
        """``direct``: write uploads with O_DIRECT where the file system allows it (see the
        module docstring)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_chunk_bytes = max_chunk_bytes
        self.direct = direct
        self._pending: dict[str, tuple[Path, Future[None]]] = {}   # sha -> (temp file, its fsync)
        self._moved = 0.0   # time.monotonic() when chunk bytes last went in or out (``moved``)
        self._lock = threading.Lock()
        self._flusher: ThreadPoolExecutor | None = None
        self._lanes: list[_Lane] = []
        self._dirs: set[Path] = set()   # shard directories known to exist (GC never removes them)

    def moved(self) -> None:
        """Chunk bytes are moving now (a GET or PUT of a blob)."""
        self._moved = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since chunk bytes last moved (``moved``)."""
        return time.monotonic() - self._moved

    def prefetch(self, shas: Iterable[str]) -> None:
        """Start reading these chunks into the page cache in the background (``posix_fadvise``
        WILLNEED: the OS queues the reads and returns). Advice only: a missing chunk, a
        platform without the call or a refusal changes nothing; the readers still read."""
        if hasattr(os, "posix_fadvise"):
            paths = [self.final_path(sha) for sha in shas if is_sha(sha)]
            threading.Thread(target=_will_need, args=(paths,), name="handoff-prefetch", daemon=True).start()

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

    def _open_temp(self, tmp: Path) -> tuple[int, bool]:
        """A new upload's temp file (descriptor, written with O_DIRECT?); its shard directory is
        made the first time only."""
        if tmp.parent not in self._dirs:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(tmp.parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if self.direct else 0
        try:
            return self._create(tmp, flags, direct)
        except FileNotFoundError:   # the directory went away behind our back: once more
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return self._create(tmp, flags, direct)

    @staticmethod
    def _create(tmp: Path, flags: int, direct: int) -> tuple[int, bool]:
        if direct:
            try:
                return os.open(tmp, flags | direct, 0o666), True
            except OSError as exc:   # tmpfs and some others refuse O_DIRECT
                if exc.errno != errno.EINVAL:
                    raise
        return os.open(tmp, flags, 0o666), False

    def _bind_lane(self) -> _Lane:
        """The writer lane with the fewest uploads now (a new one while there are fewer than LANES)."""
        with self._lock:
            lane = min(self._lanes, key=lambda ln: ln.bound, default=None)
            if lane is None or (lane.bound and len(self._lanes) < LANES):
                lane = _Lane(f"handoff-blob-writer-{len(self._lanes)}")
                self._lanes.append(lane)
            lane.bound += 1
            return lane

    def _unbind_lane(self, lane: _Lane) -> None:
        with self._lock:
            lane.bound -= 1

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


def _will_need(paths: list[Path]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:   # gone or pending: whoever reads it says so, not the prefetch
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass   # no read-ahead advice on this file system: the reads just come later
        finally:
            os.close(fd)


def _older(path: Path, now: float, age: float) -> bool:
    try:
        return now - path.stat().st_mtime >= age
    except FileNotFoundError:
        return True
