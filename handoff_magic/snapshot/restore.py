"""Bundle -> kernel namespace, In/Out history and working files.

Two phases: first read and verify the manifest and every chunk it needs (nothing in the
namespace or the working directory changes if anything is wrong), then apply: imports,
unpickled groups, files, replays of defining cells, and the In/Out history.

(Just over 400 lines: the two phases read top to bottom; split apart, the checks would sit away from
what they guard.)
"""
from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import pickle
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir
from ..chunks import CHUNK_SIZE, CHUNKS, ChunkRef, ChunkStore
from ..errors import BundleError, StateError
from ..manifest import FileEntry, GroupEntry, Manifest, ReplayEntry, VariableEntry
from ..state import RunState
from ..tracking import TRACKER
from . import reducers, sources
from .trust import PullTrust
from .capture import target_namespace
from .files import file_sha, safe_target, write_file
from .history import restore_history
from .replay import run_replays
from .reports import RestoreReport, VarReport

log = logging.getLogger(__name__)


# -- phase 1: read and verify ------------------------------------------------------
def _read_buffers(store: Any, chunks: dict[str, ChunkRef], groups: list[GroupEntry],
                  verify: bool = True) -> dict[str, list[Any]]:
    """Every out-of-band buffer, verified: small single chunks memory-mapped copy-on-write, others read
    straight into their destination bytearray (no intermediate copies), in parallel. A store without
    local files (``store.local`` False: chunks arriving over HTTP) fills the buffers as they come.
    Buffers are then handed to the change tracker with their chunk refs, so the next capture does
    not read them again unless they were written to. ``verify=False``: mapped chunks are not
    hashed again (their sizes still are checked), so nothing is read until the code uses it."""
    out: dict[str, list[Any]] = {}
    tasks: list[tuple[str, memoryview, str | None]] = []
    checks: list[tuple[str, memoryview, list[str]]] = []
    track: list[tuple[memoryview, list[ChunkRef], bool]] = []
    local = getattr(store, "local", True)
    for g in groups:
        bufs: list[Any] = []
        for b in g.buffers:
            shas = b.chunks
            if local and len(shas) == 1 and chunks[shas[0]].codec is None and b.size > 0:
                path = store.find(shas[0])
                try:
                    with open(path, "rb") as f:
                        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except FileNotFoundError:
                    raise BundleError(f"chunk {shas[0]} is missing from {store.root}; the bundle is incomplete "
                                      "— copy or save it again") from None
                except ValueError:  # empty or shorter file
                    raise BundleError(f"chunk {shas[0]} is truncated; save or copy the bundle again") from None
                if len(m) != b.size or (verify and not store.intact(shas[0], m)):
                    m.close()
                    raise BundleError(f"chunk {shas[0]} is corrupt (sha256 mismatch), it belongs to "
                                      f"{', '.join(g.names)}; save or copy the bundle again")
                bufs.append(m)
                continue
            refs = [chunks[s] for s in shas]
            mapped = None
            if local and all(ref.codec is None for ref in refs):
                mapped = _stitched_map([(store.find(ref.sha), ref.size) for ref in refs], b.size, g.names)
            if mapped is not None:
                off = 0
                for ref in refs:
                    if verify:
                        checks.append((ref.sha, mapped[off: off + ref.size], g.names))
                    off += ref.size
                bufs.append(mapped)
                track.append((mapped, refs, False))
                continue
            dest = _empty_buffer(b.size)
            mv = memoryview(dest).cast("B")
            off = 0
            for ref in refs:
                tasks.append((ref.sha, mv[off: off + ref.size], ref.codec))
                off += ref.size
            bufs.append(dest)
            track.append((mv, refs, True))
        out[g.id] = bufs
    def check(item: tuple[str, memoryview, list[str]]) -> None:
        sha, view, names = item
        if not store.intact(sha, view):
            raise BundleError(f"chunk {sha} is corrupt (checksum mismatch), it belongs to {', '.join(names)}; "
                              "save or copy the bundle again")

    if tasks or checks:
        with ThreadPoolExecutor(getattr(store, "readers", 2), thread_name_prefix="handoff-load") as pool:
            list(pool.map(lambda t: store.read_into(*t), tasks))
            list(pool.map(check, checks))
    for view, refs, anonymous in track:   # cut at CHUNK_SIZE, as a capture would cut them
        if all(r.size == CHUNK_SIZE for r in refs[:-1]):
            if anonymous:
                TRACKER.track_loaded(view)
            TRACKER.record(view, CHUNK_SIZE, refs)
    return out


# -- stitched mappings: a multi-chunk buffer as one contiguous copy-on-write mapping ----
_MAP_FIXED = 0x10
_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux") and hasattr(mmap, "MAP_ANONYMOUS"):
            try:
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_long]
                lib.munmap.restype = ctypes.c_int
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                _LIBC = lib
            except (OSError, AttributeError):
                _LIBC = False
    return _LIBC or None


def _stitched_map(parts: list[tuple[Path, int]], total: int, names: list[str]) -> memoryview | None:
    """Map each chunk file (MAP_PRIVATE, copy-on-write) side by side into one reserved region.

    Loading then costs no copy and no fresh memory: the array's pages are the page cache's
    until the user writes to them. Chunk files are never modified in place (content-addressed,
    written by rename), so a private mapping is safe. Returns None where this is not possible
    (not Linux, chunk sizes not page multiples); the caller then reads into a buffer.
    """
    lib = _libc()
    page = mmap.PAGESIZE
    if lib is None or total <= 0 or any(n % page for _, n in parts[:-1]):
        return None
    length = (total + page - 1) // page * page
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    failed = ctypes.c_void_p(-1).value
    base = lib.mmap(None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, failed):
        return None
    try:
        off = 0
        for path, n in parts:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise BundleError(f"chunk {path.name} is missing (it belongs to {', '.join(names)}); the bundle "
                                  "is incomplete — copy or save it again") from None
            try:
                if os.fstat(fd).st_size != n:
                    raise BundleError(f"chunk {path.name} is truncated or has the wrong size (it belongs to "
                                      f"{', '.join(names)}); save or copy the bundle again")
                if n and lib.mmap(base + off, n, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0) in (None, failed):
                    raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            finally:
                os.close(fd)
            off += n
    except BaseException:
        lib.munmap(base, length)
        raise
    off = 0
    for path, n in parts:   # their pages stay the files' until written: the tracker can tell
        TRACKER.track_file_map(base + off, n, str(path))
        off += n
    region = (ctypes.c_char * total).from_address(base)
    weakref.finalize(region, _unmap, lib, base, length)  # when the last array using it is gone
    return memoryview(region).cast("B")


def _unmap(lib: Any, base: int, length: int) -> None:
    TRACKER.forget_file_maps(base, length)
    lib.munmap(base, length)


def _empty_buffer(size: int) -> Any:
    """A writable buffer that is not filled first. A large one is a private anonymous mapping:
    page-aligned (the change tracker protects whole pages) and left to the kernel's default page
    policy — numpy.empty asks for transparent huge pages, whose direct compaction made the first
    touch of 1 GB cost 1.8 s of system time instead of 1.4 s here. Small ones: numpy.empty (one
    mapping per buffer would run into vm.max_map_count), else a bytearray."""
    if size >= CHUNK_SIZE and hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        import numpy
    except ImportError:
        return bytearray(size)
    return numpy.empty(size, dtype=numpy.uint8)


def _verify_chunks(store: ChunkStore, shas: list[str]) -> None:
    def check(sha: str) -> None:
        store.read_stored(sha)
    if shas:
        with ThreadPoolExecutor(2, thread_name_prefix="handoff-verify") as pool:
            list(pool.map(check, shas))


# -- phase 2: apply ----------------------------------------------------------------


TRUST_HINT = "left out: it came from the remote run and can run code on load; %pull ID --trust loads it"


def load_state(path: Any, shell: Any = None, *, files: bool = True, root: Path | None = None,
               file_conflicts: dict[str, str] | None = None, ns: dict[str, Any] | None = None,
               trust: PullTrust | None = None, verify: bool = True) -> RestoreReport:
    """Restore bundle ``path`` into this kernel. Validates everything before changing anything.

    ``trust`` (a pull back without ``--trust``): only plain data and what this laptop sent is
    loaded; every other variable is reported as skipped with the reason (see trust.py).
    ``verify=False`` skips re-hashing the large buffers it maps (not reads), for a bundle whose
    chunks were hash-checked when stored and cannot have changed since: a server's run kernel
    reading its read-only view of the server's store. 1 GB then loads without being read.

    Raises BundleError (a StateError) naming the problem when the bundle is unreadable,
    corrupt or from a newer version; then the namespace and files are untouched.
    """
    t_start = time.perf_counter()
    bundle = Path(path).expanduser().absolute()
    manifest = Manifest.read(bundle)
    store = ChunkStore(bundle / CHUNKS)
    store.register(manifest.chunks)
    report = restore_from(manifest, store, shell, files=files, root=root, file_conflicts=file_conflicts, ns=ns,
                          trust=trust, verify=verify)
    report.path = str(bundle)
    report.seconds = time.perf_counter() - t_start
    return report


def restore_from(manifest: Manifest, store: Any, shell: Any = None, *, files: bool = True,
                 root: Path | None = None, file_conflicts: dict[str, str] | None = None,
                 ns: dict[str, Any] | None = None, trust: PullTrust | None = None,
                 verify: bool = True) -> RestoreReport:
    """``load_state`` from any chunk source: a bundle's ``ChunkStore``, or chunks fetched from a
    server as they are needed (pull back, remote/download.py) with no local bundle in between."""
    t_start = time.perf_counter()
    shell, ns = target_namespace(shell, ns, "load_state")
    root = Path(root if root is not None else os.getcwd()).absolute()
    report = RestoreReport(path="")
    try:
        report.run = RunState.from_dict(manifest.run) if manifest.run else None
    except StateError as exc:
        raise BundleError(f"the bundle's run state cannot be read: {exc}") from exc

    # phase 1: everything needed, verified, nothing touched
    groups = manifest.groups
    payloads: dict[str, bytes] = {}
    for g in groups:
        try:
            payloads[g.id] = b"".join(store.get(s) for s in g.payload)
        except BundleError as exc:
            raise BundleError(f"{exc} (it belongs to {', '.join(g.names)})") from None
    buffers = _read_buffers(store, manifest.chunks, groups, verify)
    file_plan: list[tuple[FileEntry, Path]] = []
    if files:
        for entry in manifest.files:
            file_plan.append((entry, safe_target(root, entry.path)))
        _verify_chunks(store, sorted({s for e, _ in file_plan for s in e.chunks}))

    # phase 2: apply. Files first: local modules import from them and reopened files and
    # databases find them; then imports, notebook definitions by source, the pickles, replays.
    touched_dirs: set[Path] = set()
    for entry, target in file_plan:
        rel = entry.path
        try:
            if target.exists():
                current = file_sha(target) if target.is_file() else None
                if current == entry.sha256:
                    continue
                at_handoff = (file_conflicts or {}).get(rel)
                if at_handoff is not None and current != at_handoff:
                    remote = target.with_name(target.name + ".remote")
                    write_file(store, entry, remote)
                    report.conflicts.append({"path": rel, "written_as": rel + ".remote"})
                    continue
            write_file(store, entry, target)
            report.files.append(rel)
            touched_dirs.add(target.parent)
        except (OSError, BundleError) as exc:
            report.conflicts.append({"path": rel, "written_as": "", "error": f"not written: {exc}"})
    for d in touched_dirs:
        fsync_dir(d)  # the renames themselves survive a crash too

    for rel in manifest.module_paths:
        if trust is not None and not trust.allows_module_path(rel):
            continue   # a remote folder on sys.path would let a planted module run on import
        path = str(safe_target(root, rel) if rel else root)
        if path not in sys.path:
            sys.path.insert(0, path)   # modules imported from the working directory
    staged: dict[str, Any] = {}
    results: dict[str, VarReport] = {}
    by_name = {v.name: v for v in manifest.variables}
    for line in manifest.imports:
        t0 = time.perf_counter()
        scratch: dict[str, Any] = {}
        name = line.rsplit(" ", 1)[-1].split(".")[0]
        if trust is not None and not trust.allows_import(line):
            results[name] = VarReport(name, _declared_type(by_name, name, "module"), "import", 0, 0.0,
                                      "skipped", f"{line!r} {TRUST_HINT}")
            continue
        try:
            exec(compile(line, "<handoff import>", "exec"), scratch)  # noqa: S102 - validated import line
            staged[name] = scratch[name]
            results[name] = VarReport(name, _declared_type(by_name, name, "module"), "import",
                                      seconds=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - one missing package must not sink the rest
            results[name] = VarReport(name, _declared_type(by_name, name, "module"), "import", 0,
                                      time.perf_counter() - t0, "skipped",
                                      f"{line!r} failed here ({type(exc).__name__}: {exc}); install the package "
                                      "and run the line yourself")
    ns.update(staged)   # definitions and pickles below may refer to imported names
    definitions = _sent_code("definitions", manifest.definitions, trust, by_name, results)
    for name, err in sources.define([d.to_dict() for d in definitions], ns).items():
        if err is not None:
            results[name] = VarReport(name, _declared_type(by_name, name, "?"), "replay", 0, 0.0, "skipped", err)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # unpickling builds many containers; collections in between would dominate
    root_token = reducers.RESTORE_ROOT.set(root)   # reopened files and databases resolve in this directory
    try:
        _unpickle_groups(groups, payloads, buffers, by_name, staged, results, trust)
    finally:
        reducers.RESTORE_ROOT.reset(root_token)
        if gc_was_enabled:
            gc.enable()
    ns.update(staged)


    run_replays(_sent_code("replays", manifest.replays, trust, by_name, results), ns, root, by_name, results)
    for name, meta in by_name.items():
        if meta.method == "skipped" and name not in results:
            results[name] = VarReport(name, meta.type, "skipped", 0, 0.0, "skipped", meta.reason)
    if shell is not None and ns is shell.user_ns:
        restore_history(shell, ns, manifest.history or {})
    order = [v.name for v in manifest.variables]
    report.variables = [results[n] for n in order if n in results] + \
        [r for n, r in results.items() if n not in by_name]
    report.seconds = time.perf_counter() - t_start
    return report


def _unpickle_groups(groups: list[GroupEntry], payloads: dict[str, bytes], buffers: dict[str, list[Any]],
                     by_name: dict[str, VariableEntry], staged: dict[str, Any], results: dict[str, VarReport],
                     trust: PullTrust | None = None) -> None:
    """Unpickle each group on its own, so one that fails (a package missing here) loses only itself."""
    for g in groups:
        t0 = time.perf_counter()
        names = g.names
        refusal = trust.group_refusal(g, payloads[g.id], buffers[g.id]) if trust is not None else None
        if refusal is not None:
            for n in names:
                meta = by_name.get(n)
                results[n] = VarReport(n, _declared_type(by_name, n, "?"), g.method, meta.size if meta else 0,
                                       0.0, "skipped", f"{refusal}; {TRUST_HINT}")
            payloads.pop(g.id, None)
            continue
        try:
            if g.stream == "dill" or (g.method == "dill" and g.stream != "pickle"):
                import dill
                obj = dill.loads(payloads[g.id], buffers=buffers[g.id])  # noqa: S301 - in a kernel, never the server
            else:
                obj = pickle.loads(payloads[g.id], buffers=buffers[g.id])  # noqa: S301 - in a kernel, never the server
            values = (obj,) if len(names) == 1 else tuple(obj)
            if len(values) != len(names):
                raise ValueError(f"group holds {len(values)} values for {len(names)} names")
            spent = (time.perf_counter() - t0) / len(names)
            for n, v in zip(names, values):
                staged[n] = v
                meta = by_name.get(n)
                results[n] = VarReport(n, meta.type if meta else type(v).__name__, g.method,
                                       meta.size if meta else 0, spent, "ok", meta.reason if meta else None)
        except Exception as exc:  # noqa: BLE001 - e.g. a package missing here; others still restore
            hint = _load_hint(exc)
            for n in names:
                meta = by_name.get(n)
                results[n] = VarReport(n, _declared_type(by_name, n, "?"), g.method, meta.size if meta else 0,
                                       time.perf_counter() - t0, "skipped",
                                       f"could not be unpickled: {type(exc).__name__}: {exc}{hint}")
        payloads.pop(g.id, None)


def _sent_code(kind: str, entries: list[ReplayEntry], trust: PullTrust | None, by_name: dict[str, VariableEntry],
               results: dict[str, VarReport]) -> list[ReplayEntry]:
    """The notebook definitions or replayed cells (``kind``) a restore may run: all of them, or on a
    pull back without --trust only those this laptop sent; the others are reported as left out."""
    if trust is None:
        return entries
    what = "its definition" if kind == "definitions" else "its cell"
    kept = []
    for entry in entries:
        if trust.allows_code(kind, entry):
            kept.append(entry)
            continue
        for name in entry.names:
            results[name] = VarReport(name, _declared_type(by_name, name, "?"), "replay", 0, 0.0, "skipped",
                                      f"{what} {TRUST_HINT}")
    return kept


def _declared_type(by_name: dict[str, VariableEntry], name: str, default: str) -> str:
    meta = by_name.get(name)
    return meta.type if meta is not None else default


def _load_hint(exc: BaseException) -> str:
    """What to do about an unpickling failure; a notebook name is never a missing package."""
    if "__main__" in str(exc):
        return (" (it refers to something defined in the notebook that was not rebuilt here: run its "
                "defining cell, then load again)")
    if isinstance(exc, (ImportError, AttributeError)):
        return " (install the missing package here)"
    return ""
