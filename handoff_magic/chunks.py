"""Content-addressed chunks: the one place that knows a chunk's address and where it lives.

A chunk's address is the sha256 of its *stored* bytes (after optional zstd), so a server can
verify uploads and hard-link chunks without decoding or unpickling anything. On disk a chunk of
a bundle is ``chunks/<sha[:2]>/<sha>`` (``chunk_relpath``); the server's BlobStore uses the same
``<sha[:2]>/<sha>`` shard under its own root (``shard_path``). Bytes only: safe on the server.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import zstandard

from .atomic import atomic_write_bytes, fsync_dir
from .errors import BundleError

CHUNK_SIZE = 4 * 1024 * 1024
CHUNKS = "chunks"                 # a bundle's chunk directory
CODECS = (None, "zstd")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 1


def is_sha(value: Any) -> bool:
    """Whether ``value`` is a chunk address (lowercase hex sha256)."""
    return isinstance(value, str) and SHA_RE.match(value) is not None


def shard_path(root: Path, sha: str) -> Path:
    """``root/<sha[:2]>/<sha>``: where a chunk lives in a chunk directory or the server's BlobStore."""
    if not is_sha(sha):
        raise BundleError(f"{str(sha)[:80]!r} is not a sha256 chunk address")
    return Path(root) / sha[:2] / sha


def chunk_relpath(sha: str) -> str:
    """``chunks/<sha[:2]>/<sha>``: a chunk's POSIX path inside a bundle directory."""
    return f"{CHUNKS}/{sha[:2]}/{sha}"


_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class ChunkRef:
    sha: str
    size: int            # raw (decoded) bytes
    stored: int          # bytes on disk
    codec: str | None
    new: bool = False    # written by this put (False: it was already there)
    crc32: int | None = None  # of the stored bytes: a 4x cheaper integrity check for loads

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {"size": self.size, "stored": self.stored, "codec": self.codec}
        if self.crc32 is not None:
            m["crc32"] = self.crc32
        return m


def atomic_write(path: Path, data: bytes | memoryview, mode: int | None = None) -> None:
    """Chunks and manifests are readable like any file the user writes (0o644 unless told)."""
    atomic_write_bytes(path, data, mode=0o644 if mode is None else mode)


def worth_compressing(sample: bytes | memoryview, ratio: float = 0.9) -> bool:
    """Compress a sample; only pay for zstd when it shrinks data by at least 10%."""
    if len(sample) < 64:
        return False
    return len(_cctx().compress(sample)) < ratio * len(sample)


class ChunkStore:
    """A local content-addressed directory (``<bundle>/chunks``); same layout as the server's BlobStore."""

    def __init__(self, root: Path, *, workers: int = 4, max_in_flight: int = 8, batch: bool = False) -> None:
        """``batch=True``: new chunks go to temp files and become visible only in ``commit()``,
        after one parallel round of fsyncs; far cheaper than an fsync per chunk, same guarantees."""
        self.root = Path(root)
        self.batch = batch
        self._pending: dict[str, Path] = {}
        self.codecs: dict[str, str | None] = {}
        self.crcs: dict[str, int] = {}
        self.refs: dict[str, ChunkRef] = {}
        self.new_shas: set[str] = set()
        self.bytes_new = 0
        self._lock = threading.Lock()
        self._dirs: set[Path] = set()
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._owned = threading.BoundedSemaphore(3)   # copies we made (payload, file blocks): keep few

    # -- addressing --------------------------------------------------------------
    def path(self, sha: str) -> Path:
        return shard_path(self.root, sha)

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def register(self, chunks: Mapping[str, ChunkRef]) -> None:
        """Learn codecs and checksums of existing chunks from a manifest's ``chunks`` map."""
        for sha, ref in chunks.items():
            self.codecs[sha] = ref.codec
            if ref.crc32 is not None:
                self.crcs[sha] = ref.crc32

    # -- writing -----------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview, compress: bool) -> ChunkRef:
        """Store one chunk atomically; a chunk already present is not rewritten."""
        raw = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        size = len(raw)
        stored: bytes | memoryview = raw
        codec = None
        if compress and size >= 64:
            packed = _cctx().compress(raw)
            if len(packed) < 0.95 * size:
                stored, codec = packed, "zstd"
        sha = hashlib.sha256(stored).hexdigest()
        path = self.path(sha)
        new = False
        if self.batch:
            with self._lock:
                claim = sha not in self._pending and not path.is_file()
                if claim:
                    self._pending[sha] = path.parent / f".{sha}.tmp-{os.getpid()}"
            if claim:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_pending(self._pending[sha], stored)
                new = True
        elif not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, stored)
            new = True
        ref = ChunkRef(sha, size, len(stored), codec, new, zlib.crc32(stored))
        with self._lock:
            self.codecs[sha] = codec
            if new and sha not in self.new_shas:
                self.new_shas.add(sha)
                self.bytes_new += len(stored)
                self._dirs.add(path.parent)
            self.refs[sha] = ref
        return ref

    def submit(self, data: bytes | bytearray | memoryview, compress: bool, owned: bool = False
               ) -> "Future[ChunkRef]":
        """Like put, in a worker thread (hashlib and zstd release the GIL).

        Memory is bounded: at most a few ``owned`` chunks (copies made just for the bundle)
        are in flight; views of live objects cost nothing extra and may queue deeper.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="handoff-chunk")
        slots = self._owned if owned else self._slots
        slots.acquire()
        try:
            fut = self._pool.submit(self.put, data, compress)
        except BaseException:
            slots.release()
            raise
        fut.add_done_callback(lambda _f: slots.release())
        return fut

    def put_buffer(self, data: memoryview, compress: bool | None = None) -> list["Future[ChunkRef]"]:
        """Split a (possibly huge) buffer into CHUNK_SIZE chunks without copying it.

        ``compress=None`` samples the buffer first and compresses only if it pays.
        """
        mv = memoryview(data).cast("B")
        if compress is None:
            mid = len(mv) // 2
            compress = worth_compressing(mv[mid: mid + 65536]) if len(mv) else False
        return [self.submit(mv[i: i + CHUNK_SIZE], compress) for i in range(0, len(mv), CHUNK_SIZE)] or [
            self.submit(b"", False)]

    @staticmethod
    def _write_pending(tmp: Path, data: bytes | memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)

    def commit(self) -> None:
        """Batch mode: fsync every pending chunk (in parallel), then rename them into place."""
        if not self._pending:
            return

        def sync(tmp: Path) -> None:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        pending = list(self._pending.items())
        with ThreadPoolExecutor(self._workers, thread_name_prefix="handoff-fsync") as pool:
            list(pool.map(sync, [t for _, t in pending]))
        for sha, tmp in pending:
            os.replace(tmp, self.path(sha))
            self._dirs.add(tmp.parent)
        self._pending.clear()

    def abort(self) -> None:
        """Batch mode: drop pending chunks (a failed save leaves nothing half-written behind)."""
        for sha, tmp in list(self._pending.items()):
            tmp.unlink(missing_ok=True)
            self.new_shas.discard(sha)
        self._pending.clear()

    def flush(self) -> None:
        """Make every new chunk's directory entry durable."""
        for d in list(self._dirs):
            fsync_dir(d)
        self._dirs.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def discard_new(self, keep: set[str]) -> int:
        """Delete chunks this store wrote that the final manifest does not reference."""
        removed = 0
        for sha in list(self.new_shas - keep):
            try:
                tmp = self._pending.pop(sha, None)
                (tmp or self.path(sha)).unlink()
                removed += self.refs[sha].stored
            except FileNotFoundError:
                pass
            self.new_shas.discard(sha)
        self.bytes_new -= removed
        return removed

    # -- reading -----------------------------------------------------------------
    def intact(self, sha: str, stored: bytes | memoryview) -> bool:
        """Check stored bytes: crc32 from the manifest when known (fast), else the sha256 address."""
        crc = self.crcs.get(sha)
        if crc is not None:
            return zlib.crc32(stored) == crc
        return hashlib.sha256(stored).hexdigest() == sha

    def read_stored(self, sha: str) -> bytes:
        """The stored bytes of a chunk, checked (see ``intact``)."""
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"chunk {sha} is missing from {self.root}; the bundle is incomplete — "
                              "copy it again or re-save it") from None
        if not self.intact(sha, data):
            raise BundleError(f"chunk {sha} is corrupt (its checksum does not match); re-save or re-download "
                              "the bundle")
        return data

    def decode(self, sha: str, stored: bytes, codec: str | None = ...) -> bytes:  # type: ignore[assignment]
        if codec is ...:
            codec = self.codecs.get(sha, "zstd" if stored[:4] == ZSTD_MAGIC else None)
        if codec is None:
            return stored
        if codec != "zstd":
            raise BundleError(f"chunk {sha} uses unknown codec {codec!r}; upgrade jupyter-handoff")
        try:
            return _dctx().decompress(stored)
        except zstandard.ZstdError as exc:
            raise BundleError(f"chunk {sha} cannot be decompressed ({exc}); re-save the bundle") from exc

    def get(self, sha: str, codec: str | None = ...) -> bytes:  # type: ignore[assignment]
        """Raw (decompressed) bytes of a chunk; verifies its hash first."""
        return self.decode(sha, self.read_stored(sha), codec)

    def read_into(self, sha: str, dest: memoryview, codec: str | None) -> None:
        """Read a chunk straight into ``dest`` (exactly its raw size), verifying the hash."""
        if codec is None:
            try:
                with open(self.path(sha), "rb", buffering=0) as f:
                    n = f.readinto(dest)
                    extra = f.read(1)
            except FileNotFoundError:
                raise BundleError(f"chunk {sha} is missing from {self.root}; the bundle is incomplete") from None
            if n != len(dest) or extra or not self.intact(sha, dest):
                raise BundleError(f"chunk {sha} is corrupt (size or checksum mismatch); re-save or re-download "
                                  "the bundle")
            return
        raw = self.get(sha, codec)
        if len(raw) != len(dest):
            raise BundleError(f"chunk {sha} decodes to {len(raw)} bytes, manifest says {len(dest)}")
        dest[:] = raw
