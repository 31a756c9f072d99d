"""save_state: kernel namespace, In/Out history and working files -> a bundle (DESIGN "Capture").

This module orchestrates; each step is its own module. The namespace is sorted (IPython
internals, secrets and UI objects out; modules and importable functions as import lines), the
rest is grouped by shared objects (sharing.py) and each group pickled once (pickling.py,
reducers.py); what cannot be pickled is replayed from its defining cell (replay.py) or skipped
with a reason. Then history.py, files.py, and the manifest (written last, atomically). One bad
object never sinks the rest.

(Just over 400 lines: the order of the capture steps is what this module is for.)
"""
from __future__ import annotations

import gc
import keyword
import os
import re
import reprlib
import sys
import time
import types
from pathlib import Path
from typing import Any

from ..chunks import CHUNKS, ChunkRef, ChunkStore
from ..errors import BundleError
from ..manifest import (
    BufferEntry,
    FileEntry,
    GroupEntry,
    Manifest,
    ReplayEntry,
    VariableEntry,
)
from ..secrets import is_secret_variable, redact, redact_obj, secret_values
from . import reducers, sources
from .digest import content_digest
from .files import capture_files
from .history import capture_history
from .pickling import Packed, needs_by_value, pickle_var
from .reducers import np_root
from .replay import plan_replays
from .reports import CaptureReport, VarReport
from .sharing import UnionFind, share_ids, singleton_ids

IPY_NAMES = frozenset({"In", "Out", "_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh",
                       "get_ipython", "exit", "quit"})
IPY_RE = re.compile(r"^_(i?\d+)$")


# -- classification ----------------------------------------------------------------
_INTERNAL_MODULES = ("ipykernel.", "handoff_magic.", "jupyter_client.", "zmq.", "IPython.core.interactiveshell",
                     "IPython.core.history", "IPython.core.autocall", "IPython.core.magic", "IPython.terminal.",
                     "IPython.core.displayhook", "IPython.core.formatters")


def _excluded(name: str, value: Any, hidden: dict[str, Any]) -> str | None:
    """Why a namespace entry is not user state (None: it is)."""
    if name in IPY_NAMES or IPY_RE.match(name) or (name.startswith("__") and name.endswith("__")) \
            or name.startswith("_handoff"):   # helpers the server defines while it saves or restores
        return "IPython internal"
    if name in hidden and hidden[name] is value:
        return "IPython internal"
    mod = type(value).__module__ or ""
    if mod.startswith(_INTERNAL_MODULES):  # the shell, kernel, sockets, our own runs; not IPython.display data
        return "handoff/IPython object"
    return None


def _local_module_dir(line: str, root: Path) -> str | None:
    """For an import of a module from the working directory (``import helpers as h``, ``from
    mypkg.util import clean``), the directory it is imported from, relative to ``root``. An
    installed package is not one, even in a venv inside the project (``.venv/lib/.../
    site-packages``), nor is a folder that only a symlink puts under ``root``."""
    top = line.split()[1].split(".")[0]
    path = getattr(sys.modules.get(top), "__file__", None)
    if not path:
        return None
    path = os.path.realpath(path)
    base = os.path.dirname(os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path)
    if os.path.basename(base) in ("site-packages", "dist-packages"):
        return None
    rel = os.path.relpath(base, os.path.realpath(root))
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        return None
    return "" if rel == "." else rel.replace(os.sep, "/")


def import_line(name: str, value: Any) -> str | None:
    """An import statement that rebinds ``name`` to ``value`` in a fresh kernel, if one exists."""
    if isinstance(value, types.ModuleType):
        mod = getattr(value, "__name__", None)
        if not mod or sys.modules.get(mod) is not value or mod == "__main__":
            return None
        if mod == name:
            return f"import {mod}"
        if "." in mod:
            pkg, _, leaf = mod.rpartition(".")
            return f"from {pkg} import {leaf}" if leaf == name else f"from {pkg} import {leaf} as {name}"
        return f"import {mod} as {name}"
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        mod, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        if not mod or not qual or mod == "__main__" or "." in qual or "<" in qual:
            return None
        m = sys.modules.get(mod)
        if m is None or getattr(m, qual, None) is not value:
            return None
        return f"from {mod} import {qual}" if qual == name else f"from {mod} import {qual} as {name}"
    return _library_global(name, value)


def _library_global(name: str, value: Any) -> str | None:
    """``from numpy import *`` / ``from pylab import *`` bind library objects (``rcParams``,
    ``False_``, ``average``) under their own names: they travel as the import that binds them,
    keeping their identity, instead of as copies of library state."""
    home = getattr(value, "__module__", None)
    tmod = type(value).__module__
    if tmod in ("builtins", "__main__") and not isinstance(home, str):
        return None
    for mod in dict.fromkeys(m for m in (home if isinstance(home, str) else None, tmod, tmod.split(".")[0])
                             if m and m not in ("builtins", "__main__")):
        m = sys.modules.get(mod)
        try:
            if m is not None and getattr(m, name, None) is value:
                return f"from {mod} import {name}"
        except Exception:  # noqa: BLE001 - a module with a broken __getattr__ binds nothing
            continue
    return None


def _type_name(value: Any) -> str:
    t = type(value)
    mod = t.__module__
    if mod in ("builtins", "__main__"):
        return t.__qualname__
    return f"{mod.split('.')[0]}.{t.__qualname__}"


def summary(value: Any) -> str:
    """Short non-secret description: type, shape/len and the first characters of repr."""
    tn = _type_name(value)
    try:
        shape = getattr(value, "shape", None)
        if isinstance(shape, tuple):
            dims = "×".join(str(s) for s in shape)
            dtype = getattr(value, "dtype", None)
            return f"{type(value).__name__} {dims}" + (f" {dtype}" if dtype is not None and
                                                         not hasattr(value, "columns") else "")
        head = _REPR.repr(value) if isinstance(value, (list, dict, set, tuple, frozenset, str, bytes)) \
            else repr(value)[:400]
        # "<Point object at 0x7f…>", "Generator(PCG64) at 0x7F…": an address changes with every
        # process, so a diff would flag an unchanged variable as changed
        head = _ADDRESS.sub("", head)
        if len(head) > 80:
            head = head[:77] + "..."
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            return f"{tn} len={len(value)}: {head}"
        return f"{tn}: {head}"
    except Exception:  # noqa: BLE001 - a broken __repr__ must not stop capture
        return tn


_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]{8,}\b")   # memory addresses in reprs
_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxtuple = 4
_REPR.maxstring = _REPR.maxother = 60


# -- the whole capture -------------------------------------------------------------
def target_namespace(shell: Any, ns: dict[str, Any] | None, action: str) -> tuple[Any, dict[str, Any]]:
    """``ns`` when given, else the user namespace of ``shell`` or of the running IPython."""
    if ns is not None:
        return shell, ns
    if shell is None:
        try:
            from IPython import get_ipython
            shell = get_ipython()
        except ImportError:
            shell = None
    if shell is None:
        raise BundleError(f"{action} needs an IPython kernel (or pass ns=dict); run it inside Jupyter")
    return shell, shell.user_ns


def save_state(path: Any, shell: Any = None, *, run: Any = None, files: bool = True, root: Path | None = None,
               ns: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
               base: Any = None) -> CaptureReport:
    """Snapshot variables, imports, In/Out history, run state and working files into bundle ``path``.

    ``ns`` (optional) captures a plain dict instead of the shell's user namespace (scripts, benchmarks).
    ``base`` (optional): the bundle this state was loaded from, left as it is. Its chunks are
    referenced, not written again, so ``path`` holds only what changed (a server's checkpoint
    beside the read-only bundle its kernel was restored from); ``path`` alone is then incomplete.
    """
    t_start = time.perf_counter()
    bundle = Path(path).expanduser().absolute()
    bundle.mkdir(parents=True, exist_ok=True)
    based = Path(base).expanduser().absolute() if base is not None else None
    store = ChunkStore(bundle / CHUNKS, batch=True, base=based / CHUNKS if based is not None else None)
    previous: Manifest | None = None
    for candidate in (bundle, based):
        if candidate is None:
            continue
        try:
            previous = Manifest.read(candidate)
        except BundleError:
            continue
        store.register(previous.chunks)
        break
    manifest, report = capture_into(store, shell, run=run, files=files, root=root, ns=ns, environ=environ,
                                    skip=[bundle, *([based] if based else [])], previous=previous)
    manifest.write(bundle)
    report.path = str(bundle)
    report.seconds = time.perf_counter() - t_start
    return report


def capture_into(store: Any, shell: Any = None, *, run: Any = None, files: bool = True, root: Path | None = None,
                 ns: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
                 skip: list[Path] | None = None, previous: Manifest | None = None) -> tuple[Manifest, CaptureReport]:
    """The capture itself, into any chunk store: a bundle's ``ChunkStore``, or an upload sink that
    streams chunks to a server (remote/upload.py). Returns once ``store.commit()`` made every chunk
    durable (or uploaded); the caller then writes or sends the manifest. ``previous``: the last
    manifest sent there, so unchanged working files are not read again."""
    t_start = time.perf_counter()
    shell, ns = target_namespace(shell, ns, "save_state")
    hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
    root = Path(root if root is not None else os.getcwd()).absolute()
    previous_files: dict[str, FileEntry] = {f.path: f for f in previous.files} if previous else {}
    previous_chunks: dict[str, ChunkRef] = previous.chunks if previous else {}
    report = CaptureReport(path="")
    manifest = Manifest()
    secret_vals = secret_values(ns, environ)
    secret_bytes = sorted({v.encode("utf-8") for v in secret_vals}, key=len, reverse=True)
    # 1. sort the namespace: internals out, secrets out, modules/functions as imports
    candidates: list[tuple[str, Any]] = []
    for name, value in list(ns.items()):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            continue  # set through globals()[...]: cannot be rebound by name
        why = _excluded(name, value, hidden)
        if why == "IPython internal":
            continue
        if why:
            report.variables.append(VarReport(name, _type_name(value), "skipped", outcome="skipped", reason=why))
            continue
        if is_secret_variable(name, value, secret_vals):
            report.variables.append(VarReport(name, _type_name(value), "skipped", outcome="skipped",
                                              reason="looks like a secret"))
            continue
        line = import_line(name, value)
        if line is not None:
            local = _local_module_dir(line, root)
            if local is not None and local not in manifest.module_paths:
                manifest.module_paths.append(local)   # its files travel; the restore imports from there
            manifest.imports.append(line)
            manifest.variables.append(VariableEntry(name, "import", _type_name(value), summary=line))
            report.variables.append(VarReport(name, _type_name(value), "import"))
            continue
        candidates.append((name, value))

    gc_was_enabled = gc.isenabled()
    gc.disable()  # pickling allocates many tracked objects; full collections would dominate the time
    root_token = reducers.CAPTURE_ROOT.set(root)   # files and databases inside it travel by relative path
    try:
        _capture_vars(candidates, ns, shell, store, secret_bytes, manifest, report)
        history = capture_history(shell, secret_vals)
        manifest.history = history
        if run is not None:
            manifest.run = redact_obj(run.to_dict(), secret_vals, patterns=True)
        for v in manifest.variables:  # reasons quote error messages, which may quote values
            if v.reason:
                v.reason = redact(v.reason, secret_vals, patterns=True)
        for r in report.variables:
            if r.reason:
                r.reason = redact(r.reason, secret_vals, patterns=True)
        if files:
            entries, skipped, pending = capture_files(root, store, secret_bytes, list(skip or []), previous_files)
            by_path = {e.path: e for e in entries}
            for rel, futs in pending:
                by_path[rel].chunks = [f.result().sha for f in futs]
            manifest.files = entries
            report.files = [{"path": e.path, "size": e.size} for e in entries]
            report.skipped_files = skipped
        referenced = manifest.shas
        manifest.chunks = {s: store.refs[s] if s in store.refs else _prev_ref(store, s, previous_chunks.get(s))
                           for s in referenced}
        store.close()                 # every chunk future has finished
        store.discard_new(set(referenced))  # trial pickles that ended up in a shared group
        store.commit()
        store.flush()
    finally:
        reducers.CAPTURE_ROOT.reset(root_token)
        store.close()
        store.abort()
        if gc_was_enabled:
            gc.enable()
    report.bytes_new = store.bytes_new
    report.bytes_total = manifest.stored_bytes
    report.manifest = manifest.to_dict()
    report.seconds = time.perf_counter() - t_start
    return manifest, report



def _prev_ref(store: ChunkStore, sha: str, known: ChunkRef | None) -> ChunkRef:
    """The ref of a chunk reused from the previous save (a file that did not change)."""
    size = store.find(sha).stat().st_size
    if known and known.stored == size:
        return known
    codec = store.codecs.get(sha)
    raw = len(store.get(sha, codec)) if codec == "zstd" else size
    return ChunkRef(sha, raw, size, codec)


def _capture_vars(candidates: list[tuple[str, Any]], ns: dict[str, Any], shell: Any, store: ChunkStore,
                  secrets: list[bytes], manifest: Manifest, report: CaptureReport) -> None:
    """Find sharing, pickle each group once (members alone if the group fails), plan replays."""
    failed: dict[str, tuple[str, bool]] = {}
    timing: dict[str, float] = {}
    saved: set[str] = set()
    values = dict(candidates)
    skip_ids = singleton_ids(ns) if len(candidates) > 1 else set()
    top_defs = {id(v): v for _, v in candidates if isinstance(v, (type, types.FunctionType)) and needs_by_value(v)}
    secret_strs = [s.decode("utf-8", "replace") for s in secrets]
    defs = sources.plan(candidates, shell, secret_strs)
    manifest.definitions = [ReplayEntry(d["names"], d["cell"], d["code"]) for d in defs.definitions]
    top_defs.update(defs.objects)
    by_source = defs.ids

    # 1. sharing, found before pickling so every variable is pickled once: an object reachable
    #    from two variables, or numpy arrays over the same base, puts them in one group
    uf = UnionFind(list(values))
    np_roots: dict[int, Any] = {}
    numpy = sys.modules.get("numpy")
    owner: dict[int, str] = {}
    for name, v in candidates:
        ids = share_ids(v, skip_ids) if len(candidates) > 1 else set()
        if numpy is not None and isinstance(v, numpy.ndarray):
            root = np_root(v)
            ids.add(id(root))
            np_roots[id(root)] = root
        for i in ids:
            other = owner.setdefault(i, name)
            if other != name:
                uf.union(other, name)
    del owner
    groups: dict[str, list[str]] = {}
    for name in values:
        groups.setdefault(uf.find(name), []).append(name)

    # 2. one pickle stream per group; a group that cannot be pickled as a whole falls back to
    #    its members one by one (identity between them is then lost, and the report says so)
    gid = 0
    for names in groups.values():
        gid += 1
        note = None
        t0 = time.perf_counter()
        if len(names) > 1:
            objs = tuple(values[n] for n in names)
            roots = {i: r for i, r in np_roots.items() if any(r is values[n] for n in names)}
            pk, reason, _ = pickle_var(objs, store, secrets, view_roots=roots or None, top_defs=top_defs,
                                       by_source=by_source)
            spent = (time.perf_counter() - t0) / len(names)
            for n in names:
                timing[n] = spent
            if pk is not None:
                _add_group(manifest, report, f"g{gid}", names, pk, values, timing, None, secrets)
                saved.update(names)
                continue
            note = f"shares objects with {', '.join(n for n in names)} but could not be saved together ({reason})"
        for n in names:
            t1 = time.perf_counter()
            pk, reason, replayable = pickle_var(values[n], store, secrets, top_defs=top_defs, by_source=by_source)
            timing[n] = timing.get(n, 0.0) + time.perf_counter() - t1
            if pk is None:
                failed[n] = (reason or "cannot be pickled", replayable)
                continue
            _add_group(manifest, report, f"g{gid}" if len(names) == 1 else f"g{gid}_{n}", [n], pk, values,
                       timing, note, secrets)
            saved.add(n)

    for v in manifest.variables:
        if v.name in defs.cells and v.name in saved:
            v.reason = f"rebuilt from its source (cell {defs.cells[v.name]})"
    for r in report.variables:
        if r.name in defs.cells and r.name in saved:
            r.reason = f"rebuilt from its source (cell {defs.cells[r.name]})"

    # replays for live resources
    plan = plan_replays(
        {n: r for n, (r, ok) in failed.items() if ok}, shell,
        restorable=saved | {v.name for v in manifest.variables if v.method == "import"},
        secrets=secret_strs)
    for n, (reason, _ok) in failed.items():
        value = values[n]
        type_name, text = _type_name(value), redact(summary(value), secret_strs, patterns=True)
        if n in plan.names:
            cell = plan.names[n]
            manifest.variables.append(VariableEntry(n, "replay", type_name, summary=text,
                                                    reason=f"{reason}; re-created by replaying cell {cell}"))
            report.variables.append(VarReport(n, type_name, "replay", 0, timing[n], "ok",
                                              f"re-created by replaying cell {cell} ({reason})"))
        else:
            why = reason + (f"; {plan.why_not[n]}" if n in plan.why_not else "")
            manifest.variables.append(VariableEntry(n, "skipped", type_name, summary=text, reason=why))
            report.variables.append(VarReport(n, type_name, "skipped", 0, timing[n], "skipped", why))
    manifest.replays = plan.replays


def _add_group(manifest: Manifest, report: CaptureReport, group_id: str, names: list[str], pk: Packed,
               values: dict[str, Any], timing: dict[str, float], note: str | None, secrets: list[bytes]) -> None:
    payload, buffers = pk.refs()
    manifest.groups.append(GroupEntry(group_id, names, pk.method, [r.sha for r in payload],
                                      [BufferEntry(n, [r.sha for r in refs]) for n, refs in buffers], pk.stream))
    share = pk.nbytes // len(names)
    for n in names:
        v = values[n]
        text = redact(summary(v), [s.decode("utf-8", "replace") for s in secrets], patterns=True)
        digest = content_digest(v)
        manifest.variables.append(VariableEntry(n, pk.method, _type_name(v), share, group_id, text, note,
                                                {"digest": digest} if digest else {}))
        report.variables.append(VarReport(n, _type_name(v), pk.method, share, timing.get(n, 0.0), "ok", note))
