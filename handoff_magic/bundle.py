"""A bundle on disk: ``manifest.json`` plus content-addressed chunks ``chunks/<sha[:2]>/<sha>``.

A chunk's address is the sha256 of its *stored* bytes (after optional zstd), so a server can
verify uploads and hard-link chunks without decoding or unpickling anything. Everything in
this module is JSON/bytes only: it is safe to import and run on the server.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import zstandard

from .atomic import atomic_write_bytes, fsync_dir
from .errors import BundleError, BundleSchemaError, StateError

SCHEMA_VERSION = 1
KIND = "handoff-bundle"
CHUNK_SIZE = 4 * 1024 * 1024
MANIFEST = "manifest.json"
CHUNKS = "chunks"
METHODS = ("pickle5", "dill", "replay", "import", "skipped")
CODECS = (None, "zstd")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
IMPORT_RE = re.compile(
    r"^(import [A-Za-z_][\w.]*( as [A-Za-z_]\w*)?|from [A-Za-z_][\w.]* import [A-Za-z_]\w*( as [A-Za-z_]\w*)?)$"
)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 1

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
        if not SHA_RE.match(sha):
            raise BundleError(f"{sha!r} is not a sha256 chunk address")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def register(self, chunks: dict[str, dict[str, Any]]) -> None:
        """Learn codecs of existing chunks from a manifest's ``chunks`` map."""
        for sha, meta in chunks.items():
            self.codecs[sha] = meta.get("codec")
            if isinstance(meta.get("crc32"), int):
                self.crcs[sha] = meta["crc32"]

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


# -- manifest -------------------------------------------------------------------
def new_manifest() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "created": time.time(), "chunks": {},
            "variables": [], "groups": [], "replays": [], "imports": [],
            "history": {"In": [], "Out": {}}, "files": [], "run": None}


def write_manifest(dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``dir/manifest.json`` atomically (temp, fsync, rename, fsync dir)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write(dir / MANIFEST, data)
    fsync_dir(dir)


def read_manifest(dir: Path) -> dict[str, Any]:
    """Parse ``dir/manifest.json``; BundleError if missing, truncated, malformed or too new."""
    path = Path(dir) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist: {dir} is not a handoff bundle (save one with "
                          "%snapshot save PATH)") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is truncated or damaged — "
                          "copy or save it again") from exc
    check_header(manifest)
    return manifest


def check_header(manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError("manifest is not a handoff bundle manifest (kind != 'handoff-bundle')")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"manifest has invalid schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise BundleSchemaError(
            f"bundle uses schema version {version}, but this jupyter-handoff reads up to {SCHEMA_VERSION}: "
            "upgrade jupyter-handoff here (pip install -U jupyter-handoff)")


def check_relpath(path: Any) -> str | None:
    """Why ``path`` is not a safe relative POSIX path inside a root, or None if it is."""
    if not isinstance(path, str) or not path:
        return "path must be a non-empty string"
    if len(path) > 4096 or "\x00" in path or "\\" in path:
        return f"path {path[:80]!r} has a NUL, a backslash or is too long"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return f"path {path!r} is absolute"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"path {path!r} has empty, '.' or '..' parts"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def validate_manifest(manifest: dict[str, Any], *, max_bytes: int | None = None,
                      max_entries: int = 100_000) -> list[str]:
    """Structural check using JSON only (safe on a server); returns every chunk sha referenced.

    Raises BundleError listing the problems found.
    """
    check_header(manifest)
    problems: list[str] = []
    chunks = manifest.get("chunks")
    if not isinstance(chunks, dict):
        raise BundleError("manifest 'chunks' must be an object sha -> {size, stored, codec}")
    total = 0
    for sha, meta in chunks.items():
        if not SHA_RE.match(str(sha)):
            problems.append(f"chunk address {str(sha)[:80]!r} is not a lowercase sha256")
        elif not isinstance(meta, dict) or not _is_int(meta.get("size")) or not _is_int(meta.get("stored")):
            problems.append(f"chunk {sha} needs integer size and stored")
        elif meta.get("codec") not in CODECS:
            problems.append(f"chunk {sha} has unknown codec {meta.get('codec')!r}")
        elif "crc32" in meta and not (_is_int(meta["crc32"]) and meta["crc32"] < 2 ** 32):
            problems.append(f"chunk {sha} has an invalid crc32")
        else:
            total += meta["stored"]
    referenced: set[str] = set()

    def refs(shas: Any, where: str) -> None:
        if not isinstance(shas, list):
            problems.append(f"{where}: chunk list must be a list")
            return
        for s in shas:
            if not isinstance(s, str) or s not in chunks:
                problems.append(f"{where}: chunk {str(s)[:80]} is not listed in 'chunks'")
            else:
                referenced.add(s)

    def listof(key: str) -> list[Any]:
        v = manifest.get(key, [])
        if not isinstance(v, list):
            problems.append(f"'{key}' must be a list")
            return []
        return v

    variables, groups, replays = listof("variables"), listof("groups"), listof("replays")
    imports, files = listof("imports"), listof("files")
    n_entries = len(chunks) + len(variables) + len(groups) + len(replays) + len(imports) + len(files)
    if n_entries > max_entries:
        problems.append(f"manifest has {n_entries} entries, more than the limit {max_entries}")
    for v in variables:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].isidentifier():
            problems.append(f"variable entry {str(v)[:80]} needs an identifier 'name'")
        elif v.get("method") not in METHODS:
            problems.append(f"variable {v['name']}: unknown method {v.get('method')!r}")
    group_ids = set()
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("id"), str) or not isinstance(g.get("names"), list):
            problems.append(f"group entry {str(g)[:80]} needs 'id' and 'names'")
            continue
        group_ids.add(g["id"])
        if g.get("method") not in ("pickle5", "dill"):
            problems.append(f"group {g['id']}: method must be pickle5 or dill")
        if not all(isinstance(n, str) and n.isidentifier() for n in g["names"]):
            problems.append(f"group {g['id']}: names must be identifiers")
        refs(g.get("payload"), f"group {g['id']} payload")
        bufs = g.get("buffers", [])
        if not isinstance(bufs, list):
            problems.append(f"group {g['id']}: buffers must be a list")
            continue
        for b in bufs:
            if not isinstance(b, dict) or not _is_int(b.get("size")):
                problems.append(f"group {g['id']}: buffer entries need an integer size")
                continue
            refs(b.get("chunks"), f"group {g['id']} buffer")
            if isinstance(b.get("chunks"), list) and all(  # sizes only when every chunk entry is sound
                    isinstance(s, str) and isinstance(chunks.get(s), dict) and _is_int(chunks[s].get("size"))
                    for s in b["chunks"]):
                if sum(chunks[s]["size"] for s in b["chunks"]) != b["size"]:
                    problems.append(f"group {g['id']}: buffer size does not match its chunks")
    for v in variables:
        if isinstance(v, dict) and v.get("method") in ("pickle5", "dill") and \
                not (isinstance(v.get("group"), str) and v["group"] in group_ids):
            problems.append(f"variable {v.get('name')}: group {v.get('group')!r} is not in 'groups'")
    for r in replays:
        if (not isinstance(r, dict) or not isinstance(r.get("code"), str) or not isinstance(r.get("names"), list)
                or not _is_int(r.get("cell"))):
            problems.append(f"replay entry {str(r)[:80]} needs names, cell and code")
    for line in imports:
        if not isinstance(line, str) or not IMPORT_RE.match(line):
            problems.append(f"import line {str(line)[:80]!r} is not a plain import statement")
    seen_paths: set[str] = set()
    for f in files:
        if not isinstance(f, dict):
            problems.append("file entries must be objects")
            continue
        why = check_relpath(f.get("path"))
        if why:
            problems.append(f"file: {why}")
            continue
        if f["path"] in seen_paths:
            problems.append(f"file {f['path']!r} is listed twice")
        seen_paths.add(f["path"])
        if not _is_int(f.get("size")) or not _is_int(f.get("mode")) or not SHA_RE.match(str(f.get("sha256"))):
            problems.append(f"file {f['path']!r} needs integer size and mode and a sha256")
        refs(f.get("chunks"), f"file {f['path']!r}")
    history = manifest.get("history", {"In": [], "Out": {}})
    if not isinstance(history, dict) or not isinstance(history.get("In", []), list) or \
            not isinstance(history.get("Out", {}), dict):
        problems.append("'history' must be {In: [text], Out: {n: mime bundle}}")
    run = manifest.get("run")
    if run is not None:
        from .state import RunState
        try:
            RunState.from_dict(run)
        except StateError as exc:
            problems.append(f"run: {exc}")
    if max_bytes is not None and total > max_bytes:
        problems.append(f"bundle holds {total} bytes, more than the limit {max_bytes}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BundleError("invalid manifest: " + "; ".join(problems[:10]) + more)
    return sorted(referenced)


def chunk_owners(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Map chunk sha -> what it belongs to ('variable df', 'file data.csv'), for error messages."""
    owners: dict[str, list[str]] = {}
    for g in manifest.get("groups", []):
        label = "variable " + ", ".join(g.get("names", [])) if len(g.get("names", [])) < 2 else \
            "variables " + ", ".join(g.get("names", []))
        for s in g.get("payload", []):
            owners.setdefault(s, []).append(label)
        for b in g.get("buffers", []):
            for s in b.get("chunks", []):
                owners.setdefault(s, []).append(label)
    for f in manifest.get("files", []):
        for s in f.get("chunks", []):
            owners.setdefault(s, []).append(f"file {f.get('path')}")
    return owners


def verify(dir: Path, shas: Iterable[str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> None:
    """Check the manifest and every chunk's hash; BundleError names each bad chunk and its owner."""
    dir = Path(dir)
    manifest = read_manifest(dir)
    referenced = validate_manifest(manifest)
    store = ChunkStore(dir / CHUNKS)
    owners = chunk_owners(manifest)
    todo = list(referenced if shas is None else shas)
    bad: list[str] = []
    for i, sha in enumerate(todo):
        path = store.path(sha)
        try:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            ok = h.hexdigest() == sha
            why = "is corrupt (sha256 mismatch)"
        except FileNotFoundError:
            ok, why = False, "is missing"
        if not ok:
            bad.append(f"chunk {sha} {why}, belongs to {', '.join(owners.get(sha, ['nothing']))}")
        if progress:
            progress(i + 1, len(todo))
    if bad:
        raise BundleError(f"bundle {dir} failed verification: " + "; ".join(bad[:10]) +
                          ("" if len(bad) <= 10 else f" (and {len(bad) - 10} more)") +
                          ". Save or copy the bundle again.")


__all__ = ["BundleError", "BundleSchemaError", "CHUNK_SIZE", "ChunkRef", "ChunkStore", "write_manifest",
           "read_manifest", "validate_manifest", "verify", "check_relpath", "chunk_owners", "new_manifest",
           "atomic_write", "SCHEMA_VERSION"]
