"""Chunks from the pickler straight to the server: no local bundle is written first.

``UploadSink`` stands where a ``ChunkStore`` stands during a capture (``submit``, ``put_buffer``,
``refs``...). Each chunk is hashed (and compressed where it pays) in a worker thread, then a few
uploader threads ask the server in batches which chunks it lacks (``POST /blobs/missing``) and
PUT only those, concurrently, on the client's kept-alive httpx connections. Buffers of live
objects are sent from their own memory; only the pickle stream and compressed chunks are
copies, and at most ``max_owned`` of those wait at once, so memory stays bounded.

``finish()`` waits until every chunk is on the server (or raises the first upload error); only
then may the run be created and the user told "safe to close".
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..chunks import CHUNK_SIZE, ChunkRef, encode_chunk, remember_chunks, reusable_chunks, worth_compressing
from ..errors import BundleTooLarge

Progress = Callable[[int, int], None]   # (bytes sent, bytes known so far)
BATCH = 16                              # chunks per /blobs/missing question


@dataclass
class SinkStats:
    chunks_total: int = 0
    chunks_sent: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    retries: int = 0


_SERVER_HAS: dict[str, dict[str, ChunkRef]] = {}   # server url -> chunks it confirmed (this process)


class UploadSink:
    """Hash, compress where it pays and upload what the server lacks, while the capture runs."""

    def __init__(self, client: Any, *, hashers: int = 2, uploaders: int = 3, max_owned: int = 12,
                 progress: Progress | None = None, limit: int | None = None, dry: bool = False) -> None:
        """``limit``: the server's bundle limit; going over it stops the uploads with BundleTooLarge.
        ``dry``: hash only, upload nothing (to learn a bundle's exact size first)."""
        self.client = client
        self.limit = limit
        self.dry = dry
        self.progress = progress
        self.refs: dict[str, ChunkRef] = {}
        self.codecs: dict[str, str | None] = {}
        self.new_shas: set[str] = set()
        self.bytes_new = 0
        self.stats = SinkStats()
        self._known = _SERVER_HAS.setdefault(client.url, {})
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(hashers, thread_name_prefix="handoff-hash")
        self._owned = threading.BoundedSemaphore(max_owned)
        self._queue: queue.Queue[tuple[ChunkRef, Any, bool, Any] | None] = queue.Queue()
        self._sending: set[str] = set()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._error: BaseException | None = None
        self._finished = False
        self.seconds = 0.0
        self._uploaders = [threading.Thread(target=self._upload_loop, name=f"handoff-upload-{i}", daemon=True)
                           for i in range(0 if dry else uploaders)]
        for t in self._uploaders:
            t.start()

    # -- what capture calls (the ChunkStore interface) ----------------------------------------
    def has(self, sha: str) -> bool:
        """Known to be on the server already (a file unchanged since the last handoff)."""
        ref = self._known.get(sha)
        if ref is not None:
            with self._lock:
                self.refs[sha] = ref
                self.codecs[sha] = ref.codec
        return ref is not None

    def register(self, chunks: dict[str, Any]) -> None:
        pass

    def submit(self, data: bytes | bytearray | memoryview, compress: bool, owned: bool = False
               ) -> Future[ChunkRef]:
        self._check()
        if owned:
            self._owned.acquire()
        with self._lock:
            self._pending += 1
        return self._pool.submit(self._hash_and_queue, data, compress, owned)

    def put_buffer(self, data: memoryview, compress: bool | None = None) -> list[Future[ChunkRef]]:
        """Split a buffer into chunks without copying it; chunks the tracker proves unchanged
        since the last capture are not read again (only checked against the server)."""
        mv = memoryview(data).cast("B")
        reuse = reusable_chunks(mv)
        if compress is None:
            mid = len(mv) // 2
            compress = worth_compressing(mv[mid: mid + 65536]) if len(mv) else False
        futs: list[Future[ChunkRef]] = []
        for i, ref in enumerate(reuse):
            piece = mv[i * CHUNK_SIZE: (i + 1) * CHUNK_SIZE]
            if ref is not None:
                fut: Future[ChunkRef] = Future()
                fut.set_result(ref)
                with self._lock:
                    self._pending += 1
                    self.refs[ref.sha] = ref
                    self.codecs[ref.sha] = ref.codec
                self._enqueue(ref, piece, False, ref.codec == "zstd")
                futs.append(fut)
            else:
                futs.append(self.submit(piece, compress))
        remember_chunks(mv, futs)
        return futs

    def close(self) -> None:
        """Hashing done (capture calls this before building the manifest)."""
        self._pool.shutdown(wait=True)

    def discard_new(self, keep: set[str]) -> int:
        return 0   # a trial pickle already on the server is unreferenced; the server's GC frees it

    def commit(self) -> None:
        self.finish()

    def flush(self) -> None:
        pass

    def abort(self) -> None:
        """Stop uploading (the capture failed); a no-op once ``finish`` succeeded."""
        if self._finished:
            return
        with self._lock:
            if self._error is None:
                self._error = RuntimeError("upload aborted")
        self._stop()

    # -- pipeline ------------------------------------------------------------------------------
    def _hash_and_queue(self, data: Any, compress: bool, owned: bool) -> ChunkRef:
        try:
            ref, stored = encode_chunk(data, compress)
            if ref.codec is not None and not owned:   # compressed: the copy is ours now
                self._owned.acquire()
                owned = True
            with self._lock:
                self.refs[ref.sha] = ref
                self.codecs[ref.sha] = ref.codec
            self._enqueue(ref, stored, owned, None)
            return ref
        except BaseException as exc:
            if owned:
                self._owned.release()
            self._fail(exc)
            raise

    def _enqueue(self, ref: ChunkRef, stored: Any, owned: bool, recompress: Any) -> None:
        with self._lock:
            self.stats.chunks_total += 1
            self.stats.bytes_total += ref.stored
            total = self.stats.bytes_total
        if self.limit is not None and total > self.limit:
            self._fail(too_large(total, self.limit))
        if self.dry or self._error is not None:
            if owned:
                self._owned.release()
            with self._lock:
                self._pending -= 1
                self._idle.notify_all()
            return
        self._queue.put((ref, stored, owned, recompress))
        self._report()

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                if self._error is None:
                    self._send_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - reported by finish()
                self._fail(exc)
            finally:
                for _ref, _data, owned, _rc in batch:
                    if owned:
                        self._owned.release()
                with self._lock:
                    self._pending -= len(batch)
                    self._idle.notify_all()

    def _send_batch(self, batch: list[tuple[ChunkRef, Any, bool, Any]]) -> None:
        with self._lock:
            todo = [b for b in batch if b[0].sha not in self._known and b[0].sha not in self._sending]
            self._sending.update(b[0].sha for b in todo)
        try:
            lacking = set(self.client.missing([b[0].sha for b in todo])) if todo else set()
            for ref, data, _owned, recompress in todo:
                if ref.sha not in lacking:
                    continue
                if recompress is not None:       # a reused chunk: its stored bytes were not kept
                    again, data = encode_chunk(data, recompress)
                    if again.sha != ref.sha:
                        raise RuntimeError(f"chunk {ref.sha[:19]} re-encoded differently; hand off again")
                self.client.put_blob(ref.sha, data, progress=self._sent)
                with self._lock:
                    self.stats.chunks_sent += 1
                    self.new_shas.add(ref.sha)
                    self.bytes_new += ref.stored
                    self._known[ref.sha] = ref
            with self._lock:
                self._known.update((b[0].sha, b[0]) for b in todo if b[0].sha not in lacking)
        finally:
            with self._lock:
                self._sending.difference_update(b[0].sha for b in todo)

    def _sent(self, n: int) -> None:
        with self._lock:
            self.stats.bytes_sent += n
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(max(0, self.stats.bytes_sent), self.stats.bytes_total)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = exc
            self._idle.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for _ in self._uploaders:
            self._queue.put(None)
        for t in self._uploaders:
            t.join()

    def finish(self) -> SinkStats:
        """Wait until every chunk is on the server; raises the first error of any upload."""
        t0 = time.perf_counter()
        self._pool.shutdown(wait=True)
        with self._lock:
            while self._pending and self._error is None:
                self._idle.wait(0.5)
        self._stop()
        self._check()
        self._finished = True
        self.seconds = time.perf_counter() - t0
        return self.stats


_LAST: dict[str, Any] = {}   # server url -> the last Manifest streamed there (unchanged files are not re-read)


def too_large(total: int, limit: int) -> BundleTooLarge:
    return BundleTooLarge(f"the state to hand off is {total} bytes, over this server's limit of {limit} bytes",
                          "hand off fewer or smaller variables (del big ones, or use files), or ask the admin "
                          "to raise HandoffApp.max_bundle_bytes", 413)


def rough_size(ns: dict[str, Any]) -> int:
    """Bytes the big values of ``ns`` hold (arrays, frames, bytes, str), each base counted once."""
    seen: set[int] = set()
    total = 0
    for v in list(ns.values()):
        base = v
        while getattr(base, "base", None) is not None and hasattr(base, "nbytes"):
            base = base.base
        if id(base) in seen:
            continue
        seen.add(id(base))
        if isinstance(base, (bytes, bytearray, str, memoryview)):
            total += len(base)
        elif isinstance(getattr(base, "nbytes", None), int):
            total += base.nbytes
    return total


def stream_capture(client: Any, shell: Any = None, *, run: Any = None,
                   progress: Progress | None = None) -> tuple[dict[str, Any], Any, UploadSink]:
    """Capture this kernel straight to ``client``'s server: returns (manifest, report, sink) once
    every chunk the manifest names is on the server; nothing is written locally. A state that
    looks bigger than the server accepts is first measured without sending anything, so a
    bundle the server would refuse is never uploaded."""
    from ..snapshot.capture import capture_into, target_namespace
    limit = getattr(client, "max_bundle_bytes", None)
    if limit is not None and rough_size(target_namespace(shell, None, "save_state")[1]) > limit:
        _, measured = capture_into(UploadSink(client, dry=True), shell, run=run, previous=_LAST.get(client.url))
        if measured.bytes_total > limit:
            raise too_large(measured.bytes_total, limit)
    sink = UploadSink(client, progress=progress, limit=limit)
    try:
        manifest, report = capture_into(sink, shell, run=run, previous=_LAST.get(client.url))
    except BaseException:
        sink.abort()
        raise
    _LAST[client.url] = manifest
    return manifest.to_dict(), report, sink


def forget(url: str) -> None:
    """The server lacks chunks we thought it had (its GC freed them): trust nothing remembered."""
    _SERVER_HAS.pop(url, None)
    _LAST.pop(url, None)


__all__ = ["UploadSink", "SinkStats", "forget", "stream_capture"]
