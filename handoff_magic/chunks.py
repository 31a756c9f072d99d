"""Content-addressed chunks: the one place that knows a chunk's address and where it lives.

A chunk's address names its hash and is computed over its *stored* bytes (after optional zstd),
so a server can verify uploads and hard-link chunks without decoding or unpickling anything:

* ``blake3-<64 hex>``: BLAKE3 (what this version writes; ~4x faster than SHA-256 here, and
  still a cryptographic hash, so the server's check of every upload means what it did);
* ``<64 hex>``: SHA-256, what bundles and checkpoints written before were addressed by; they
  keep loading, and a manifest may mix both.

On disk a chunk of a bundle is ``chunks/<hex[:2]>/<address>`` (``chunk_relpath``); the server's
BlobStore uses the same shard under its own root (``shard_path``). Bytes only: safe on the server.

(Just over 400 lines: the address format, the hashing and the store that checks both belong
together.)
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import re
import sys
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any, Mapping

import blake3
import zstandard

from .atomic import atomic_write_bytes, fsync_dir, fsync_file
from .errors import BundleError

CHUNK_SIZE = 4 * 1024 * 1024
CHUNKS = "chunks"                 # a bundle's chunk directory
CODECS = (None, "zstd")
SHA_RE = re.compile(r"^(?:blake3-)?[0-9a-f]{64}$")   # a chunk address, either hash
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")            # a plain SHA-256 digest (file contents)
BLAKE3 = "blake3-"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 1


def is_sha(value: Any) -> bool:
    """Whether ``value`` is a chunk address (``blake3-<hex>`` or a legacy SHA-256 hex digest)."""
    return isinstance(value, str) and SHA_RE.match(value) is not None


def is_sha256(value: Any) -> bool:
    """Whether ``value`` is a lowercase hex SHA-256 digest (what file entries carry)."""
    return isinstance(value, str) and SHA256_RE.match(value) is not None


def address_of(stored: bytes | bytearray | memoryview) -> str:
    """The address new chunks get: BLAKE3 of their stored bytes."""
    return BLAKE3 + blake3.blake3(stored).hexdigest()


class AddressHasher:
    """Incremental hash in the algorithm ``address`` names: verify bytes while they stream."""

    def __init__(self, address: str) -> None:
        if not is_sha(address):
            raise BundleError(f"{str(address)[:80]!r} is not a chunk address")
        self.address = address
        self._h: Any = blake3.blake3() if address.startswith(BLAKE3) else hashlib.sha256()

    def update(self, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        self._h.update(data)

    def digest(self) -> str:
        """The address the bytes seen so far have (same algorithm as the expected one)."""
        return (BLAKE3 if self.address.startswith(BLAKE3) else "") + str(self._h.hexdigest())

    def matches(self) -> bool:
        return self.digest() == self.address


def address_matches(address: str, stored: bytes | bytearray | memoryview | mmap.mmap) -> bool:
    """Whether ``stored`` hashes to ``address`` (in the algorithm the address names)."""
    h = AddressHasher(address)
    h.update(stored)
    return h.matches()


def shard_path(root: Path, sha: str) -> Path:
    """``root/<hex[:2]>/<address>``: where a chunk lives in a chunk directory or the server's BlobStore."""
    if not is_sha(sha):
        raise BundleError(f"{str(sha)[:80]!r} is not a chunk address (blake3-<hex> or a sha256 hex digest)")
    return Path(root) / sha[-64:-62] / sha


def chunk_relpath(sha: str) -> str:
    """``chunks/<hex[:2]>/<address>``: a chunk's POSIX path inside a bundle directory."""
    return f"{CHUNKS}/{sha[-64:-62]}/{sha}"


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


def encode_chunk(data: bytes | bytearray | memoryview, compress: bool) -> tuple["ChunkRef", Any]:
    """(ref, stored bytes): zstd only where it saves at least 5%, addressed by BLAKE3."""
    raw = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    size = len(raw)
    stored: Any = raw
    codec = None
    if compress and size >= 64:
        packed = _cctx().compress(raw)
        if len(packed) < 0.95 * size:
            stored, codec = packed, "zstd"
    return ChunkRef(address_of(stored), size, len(stored), codec), stored


def decode_chunk(sha: str, stored: bytes, codec: str | None) -> bytes:
    """A chunk's raw bytes from its stored bytes (undoing zstd)."""
    if codec is None:
        return stored
    if codec != "zstd":
        raise BundleError(f"chunk {sha} uses unknown codec {codec!r}; upgrade jupyter-handoff")
    try:
        return _dctx().decompress(stored)
    except zstandard.ZstdError as exc:
        raise BundleError(f"chunk {sha} cannot be decompressed ({exc}); re-save the bundle") from exc


def reusable_chunks(view: memoryview) -> list["ChunkRef | None"]:
    """Per CHUNK_SIZE slice of ``view``: its ref when the tracker proves the bytes unchanged."""
    from .tracking import TRACKER
    return TRACKER.reusable(view, CHUNK_SIZE)


def remember_chunks(view: memoryview, futs: list["Future[ChunkRef]"]) -> None:
    """Once every chunk of ``view`` is hashed, the tracker remembers their refs."""
    from .tracking import TRACKER
    if len(view) < CHUNK_SIZE:
        return
    left = [len(futs)]
    lock = threading.Lock()

    def done(_f: "Future[ChunkRef]") -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last and all(f.exception() is None for f in futs):
            TRACKER.record(view, CHUNK_SIZE, [f.result() for f in futs])

    for f in futs:
        f.add_done_callback(done)


_SYNC_FILE_RANGE_WRITE = 2       # <fcntl.h>: start write-back of dirty pages, do not wait
_sync_file_range: Any = None      # libc's sync_file_range; False once it proved unavailable


def start_writeback(fd: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk now, without waiting.

    Linux only (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): a chunk's pages then travel to
    disk while later chunks are still being written, instead of all in the final fsync round.
    It makes nothing durable by itself (no metadata, no device cache flush): the fsync in
    ``ChunkStore.commit`` stays, it just finds little left to do. Returns False where it is not
    available (another OS, no such call in libc, a filesystem that refuses it); nothing is lost
    then, the fsync does all the work as before."""
    global _sync_file_range
    fn = _sync_file_range
    if fn is False:
        return False
    if fn is None:
        fn = _sync_file_range = _load_sync_file_range()
        if fn is False:
            return False
    if fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    if ctypes.get_errno() == errno.ENOSYS:   # this kernel never will (ESPIPE, EINVAL...: only this file)
        _sync_file_range = False
    return False


def _load_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range   # ctypes drops the GIL while it runs
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


class ChunkStore:
    """A local content-addressed directory (``<bundle>/chunks``); same layout as the server's BlobStore."""

    def __init__(self, root: Path, *, workers: int = 4, max_in_flight: int = 8, batch: bool = False,
                 base: Path | None = None) -> None:
        """``batch=True``: new chunks go to temp files and become visible only in ``commit()``,
        after one parallel round of fsyncs; far cheaper than an fsync per chunk, same guarantees.

        ``base``: a read-only chunk directory whose chunks count as present (a server kernel's
        checkpoint next to the bundle it was restored from): they are referenced, never copied."""
        self.root = Path(root)
        self.base = Path(base) if base is not None else None
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

    def find(self, sha: str) -> Path:
        """Where a chunk can be read: this store's own file, else the base's if it has it."""
        own = self.path(sha)
        if self.base is not None and not own.is_file():
            based = shard_path(self.base, sha)
            if based.is_file():
                return based
        return own

    def has(self, sha: str) -> bool:
        return self.find(sha).is_file()

    def register(self, chunks: Mapping[str, ChunkRef]) -> None:
        """Learn codecs and checksums of existing chunks from a manifest's ``chunks`` map."""
        for sha, ref in chunks.items():
            self.codecs[sha] = ref.codec
            if ref.crc32 is not None:
                self.crcs[sha] = ref.crc32

    # -- writing -----------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview, compress: bool) -> ChunkRef:
        """Store one chunk atomically; a chunk already present is not rewritten."""
        ref, stored = encode_chunk(data, compress)
        sha, size, codec = ref.sha, ref.size, ref.codec
        path = self.path(sha)
        new = False
        if self.batch:
            with self._lock:
                claim = sha not in self._pending and not self.has(sha)
                if claim:
                    self._pending[sha] = path.parent / f".{sha}.tmp-{os.getpid()}"
            if claim:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_pending(self._pending[sha], stored)
                new = True
        elif not self.has(sha):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, stored)
            new = True
        ref = ChunkRef(sha, size, len(stored), codec, new)
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
        if not len(mv):
            return [self.submit(b"", False)]
        futs: list[Future[ChunkRef]] = []
        for i, ref in enumerate(reusable_chunks(mv)):
            if ref is not None and self.has(ref.sha):   # unchanged and already in this store
                fut: Future[ChunkRef] = Future()
                fut.set_result(ChunkRef(ref.sha, ref.size, ref.stored, ref.codec))
                with self._lock:
                    self.refs[ref.sha] = fut.result()
                    self.codecs[ref.sha] = ref.codec
                futs.append(fut)
            else:
                futs.append(self.submit(mv[i * CHUNK_SIZE: (i + 1) * CHUNK_SIZE], compress))
        remember_chunks(mv, futs)
        return futs

    @staticmethod
    def _write_pending(tmp: Path, data: bytes | memoryview) -> None:
        """Write a pending chunk and start its write-back at once (``start_writeback``), so the
        disk works while the next chunks are hashed and written; ``commit`` still fsyncs it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            start_writeback(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)

    def commit(self) -> None:
        """Batch mode: fsync every pending chunk (in parallel), then rename them into place."""
        if not self._pending:
            return
        pending = list(self._pending.items())
        with ThreadPoolExecutor(self._workers, thread_name_prefix="handoff-fsync") as pool:
            list(pool.map(fsync_file, [t for _, t in pending]))
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
        """Make every new chunk's directory entry durable, and the entries of shard directories
        made for them (the chunk root's own entry is the bundle's, fsynced with its manifest)."""
        if not self._dirs:
            return
        for d in list(self._dirs):
            fsync_dir(d)
        fsync_dir(self.root)
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
    def intact(self, sha: str, stored: bytes | memoryview | mmap.mmap) -> bool:
        """Check stored bytes: a legacy chunk's crc32 from the manifest when known (4x cheaper than
        its SHA-256), else the hash its address names (BLAKE3 is as cheap as crc32)."""
        crc = self.crcs.get(sha)
        if crc is not None and not sha.startswith(BLAKE3):
            return zlib.crc32(stored) == crc
        return address_matches(sha, stored)

    def read_stored(self, sha: str) -> bytes:
        """The stored bytes of a chunk, checked (see ``intact``)."""
        try:
            data = self.find(sha).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"chunk {sha} is missing from {self.root}; the bundle is incomplete — "
                              "copy it again or re-save it") from None
        if not self.intact(sha, data):
            raise BundleError(f"chunk {sha} is corrupt (its checksum does not match); re-save or re-download "
                              "the bundle")
        return data

    def decode(self, sha: str, stored: bytes, codec: str | None | EllipsisType = ...) -> bytes:
        if codec is ...:
            codec = self.codecs.get(sha, "zstd" if stored[:4] == ZSTD_MAGIC else None)
        return decode_chunk(sha, stored, codec)

    def get(self, sha: str, codec: str | None | EllipsisType = ...) -> bytes:
        """Raw (decompressed) bytes of a chunk; verifies its hash first."""
        return self.decode(sha, self.read_stored(sha), codec)

    def read_into(self, sha: str, dest: memoryview, codec: str | None) -> None:
        """Read a chunk straight into ``dest`` (exactly its raw size), verifying the hash."""
        if codec is None:
            try:
                with open(self.find(sha), "rb", buffering=0) as f:
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
