"""Kernel namespace, In/Out history and working files -> a bundle (see DESIGN "Capture").

Per variable: C pickle protocol 5 with out-of-band buffers streamed straight into chunks;
dill only where plain pickle refuses; replay of the defining cell for live resources
(generators, locks, sqlite3, sockets, read-mode files); else skipped with a reason. One bad
object never sinks the rest. Variables sharing objects are pickled together.
"""
from __future__ import annotations

import ast
import dataclasses
import builtins
import gc
import keyword
import os
import reprlib
import pickle
import re
import sys
import time
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from .errors import Blocked, SecretFound

from .chunks import CHUNK_SIZE, CHUNKS, ChunkRef, ChunkStore, worth_compressing
from .errors import BundleError
from .manifest import BufferEntry, FileEntry, GroupEntry, Manifest, ReplayEntry, VariableEntry
from .reports import CaptureReport, VarReport
from .secrets import (KEY_PATTERNS, bytes_look_like_key, is_secret_variable, redact, redact_cell, redact_obj,
                      secret_values)

IPY_NAMES = frozenset({"In", "Out", "_", "__", "___", "_i", "_ii", "_iii", "_ih", "_oh", "_dh",
                       "get_ipython", "exit", "quit"})
IPY_RE = re.compile(r"^_(i?\d+)$")
IGNORE_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints", ".handoff", "handoff-runs",
                         "node_modules", ".venv", "venv", ".tox", ".nox", ".mypy_cache", ".pytest_cache",
                         ".ruff_cache", ".cache", ".eggs", ".ipython", ".jupyter", ".local",
                         # credential stores: never travel even if the notebook runs in $HOME
                         ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config", ".password-store"})
SECRET_FILE_RE = re.compile(r"^(\.env(\..*)?|.*\.pem|.*\.key|.*\.p12|.*\.pfx|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|"
                            r"\.netrc|\.git-credentials|\.pypirc|\.pgpass|credentials(\.json)?|handoff\.json)$")
DEFAULT_MAX_FILE = 100 * 1024 * 1024
DEFAULT_MAX_TOTAL = 2 * 1024 * 1024 * 1024
SCAN_BUFFER_LIMIT = 16 * 1024 * 1024   # out-of-band buffers below this are scanned for secrets
MAX_MIME_BYTES = 100_000
MAX_TEXT_PLAIN = 20_000
_ATOMIC = (str, bytes, int, float, complex, bool, type(None), tuple, frozenset, range, slice)


# -- classification ----------------------------------------------------------------
def resource_kind(obj: Any) -> tuple[str, bool] | None:
    """(reason, replayable) for live resources that must not be pickled, else None."""
    import io
    import socket
    import sqlite3
    import threading

    if isinstance(obj, io.IOBase):
        name = getattr(obj, "name", "?")
        mode = str(getattr(obj, "mode", "") or "")
        if getattr(obj, "closed", False):
            return f"closed file {name!r}", True
        if any(c in mode for c in "wax+"):
            return (f"open file {name!r} in mode {mode!r}: reopening it would truncate or overwrite it", False)
        return f"open file {name!r} (read mode)", True
    if isinstance(obj, (_LOCK, _RLOCK)):
        return "a lock: it cannot be copied, only re-created", True
    if isinstance(obj, socket.socket):
        return "an open socket", True
    if isinstance(obj, (sqlite3.Connection, sqlite3.Cursor)):
        return "a sqlite3 connection", True
    if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return f"a {type(obj).__name__}: its progress cannot be saved", True
    if isinstance(obj, threading.Thread):
        return "a thread: re-running it could repeat its work", False
    if isinstance(obj, (types.FrameType, types.TracebackType)):
        return "a stack frame or traceback", False
    mod = type(obj).__module__ or ""
    if mod.startswith("subprocess") and type(obj).__name__ == "Popen":
        return "a running process", False
    return None


import threading as _threading  # noqa: E402

_LOCK = type(_threading.Lock())
_RLOCK = type(_threading.RLock())


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
    if "ipywidgets" in sys.modules:
        try:
            if isinstance(value, sys.modules["ipywidgets"].Widget):
                return "ipywidgets object (UI, not data)"
        except Exception:  # noqa: BLE001 - a broken ipywidgets must not stop capture
            pass
    return None


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


# -- pickling ----------------------------------------------------------------------
_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+|\b0x[0-9a-fA-F]{8,}\b")   # memory addresses in reprs
_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxtuple = 4
_REPR.maxstring = _REPR.maxother = 60


class _PayloadSink:
    """File-like target for a Pickler: cuts the stream into chunks as it is written.

    Memory stays bounded to a chunk or two; each chunk is checked for secret values (with
    an overlap across chunk edges) before it reaches the disk.
    """

    def __init__(self, store: ChunkStore, secrets: list[bytes]) -> None:
        self.store, self.secrets = store, secrets
        self.buf = bytearray()
        self.futs: list[Future[ChunkRef]] = []
        self.tail = b""
        self.total = 0
        self._overlap = max([len(s) for s in secrets] + [8])

    def write(self, data: Any) -> int:
        n = len(data)
        self.buf += data
        if len(self.buf) >= CHUNK_SIZE:
            with memoryview(self.buf) as mv:
                chunk = bytes(mv[:CHUNK_SIZE])
            del self.buf[:CHUNK_SIZE]
            self._emit(chunk)
        return n

    def _emit(self, chunk: bytes) -> None:
        window = self.tail + chunk
        for s in self.secrets:
            if s in window:
                raise SecretFound("it contains the value of a secret")
        if bytes_look_like_key(window):
            raise SecretFound("it contains a string shaped like an API key")
        self.tail = chunk[-self._overlap:]
        self.total += len(chunk)
        self.futs.append(self.store.submit(chunk, True, owned=True))

    def close(self) -> list[Future[ChunkRef]]:
        if self.buf or not self.futs:
            self._emit(bytes(self.buf))
            self.buf = bytearray()
        return self.futs


def _np_root(arr: Any) -> Any:
    root = arr
    import numpy as np
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


STR_ARRAY_MIN = 2048          # object arrays smaller than this pickle fine as they are
STR_SLICE = 1 << 18           # strings per encoded slice: bounds the extra memory


def _array_reducer(roots: dict[int, Any] | None) -> Callable[[Any], Any]:
    """reducer_override for numpy arrays (called by the C pickler only for non-builtin types):

    - views of a group's arrays are pickled as views, so they stay views of one base;
    - big object arrays holding only str (pandas text columns) are pickled as a few UTF-8 blobs
      instead of millions of memoised str objects: several times faster, far less memory.
    """
    import numpy as np

    def reduce(obj: Any) -> Any:
        if type(obj) is not np.ndarray:
            return NotImplemented
        if roots and obj.base is not None:
            root = _np_root(obj)
            if root is not obj and id(root) in roots and root.flags.c_contiguous:
                off = obj.__array_interface__["data"][0] - root.__array_interface__["data"][0]
                return (_rebuild_view, (root, off, obj.shape, obj.strides, obj.dtype.str if not obj.dtype.fields
                                        else obj.dtype, bool(obj.flags.writeable)))
        kind = obj.dtype.kind
        if kind == "O" and obj.size >= STR_ARRAY_MIN:
            return _reduce_str_array(obj)
        if kind in "mM" and obj.size and (obj.flags.c_contiguous or obj.flags.f_contiguous):
            # numpy pickles datetime64/timedelta64 data in-band (a copy); send it out of band instead
            order = "C" if obj.flags.c_contiguous else "F"
            ints = obj.view(f"<i{obj.dtype.itemsize}" if obj.dtype.byteorder != ">" else f">i{obj.dtype.itemsize}")
            return (_rebuild_from_buffer, (pickle.PickleBuffer(ints), obj.dtype.str, obj.shape, order,
                                           bool(obj.flags.writeable)))
        return NotImplemented
    return reduce


def _rebuild_from_buffer(buf: Any, dtype: str, shape: tuple, order: str, writeable: bool) -> Any:
    import numpy as np
    dt = np.dtype(dtype)
    arr = np.frombuffer(buf, dtype=np.dtype(f"{dt.str[0]}i{dt.itemsize}")).view(dt)
    arr = arr.reshape(shape, order=order)  # type: ignore[call-overload]
    if writeable and not arr.flags.writeable:
        arr = arr.copy(order=order)       # the buffer came read-only: give back a writable array
    elif not writeable:
        arr.flags.writeable = False
    return arr


STR_CODES_SLICE = 1 << 20  # rows factorised at once when building a string table
STR_DEDUP_MIN = 1 << 16       # text columns at least this long are checked for repeated values
STR_DEDUP_SAMPLE = 20_000


def _repeats_a_lot(flat: Any) -> bool:
    """Whether a text column holds far fewer distinct values than items (city, status, label...),
    judged from a random sample: with s of n items drawn and k distinct values, about s²/2k
    of the drawn items repeat, so a column of unique strings shows none and costs nothing more."""
    import numpy as np
    n = flat.size
    s = min(n, STR_DEDUP_SAMPLE)
    idx = np.random.default_rng(0).choice(n, size=s, replace=False)
    repeats = s - len(set(flat[idx].tolist()))
    return repeats > 0 and s * s / (2 * repeats) * 4 <= n   # estimated distinct values <= n/4


def _reduce_str_codes(arr: Any, flat: Any) -> Any:
    """A text column with repeated values as its distinct strings (one UTF-8 blob) plus integer codes:
    the load then builds only the distinct str objects and one take, not millions of strs."""
    import pandas as pd
    import numpy as np
    # Factorised a slice at a time into one shared table, so only a slice's intp codes exist at
    # once (a whole-column factorize holds 8 bytes per row on top of the column: +30% peak memory).
    table: dict[Any, int] = {}
    codes = np.empty(flat.size, dtype=np.int32 if flat.size < 1 << 31 else np.int64)
    for start in range(0, flat.size, STR_CODES_SLICE):
        part_codes, part_uniques = pd.factorize(flat[start:start + STR_CODES_SLICE], use_na_sentinel=True)
        if part_codes.size and int(part_codes.min()) < 0:
            return None
        to_global = np.fromiter((table.setdefault(u, len(table)) for u in part_uniques),
                                dtype=codes.dtype, count=len(part_uniques))
        codes[start:start + STR_CODES_SLICE] = to_global[part_codes]
    k = len(table)
    if not k:
        return None
    small = np.uint8 if k <= 1 << 8 else np.uint16 if k <= 1 << 16 else codes.dtype
    if small != codes.dtype:
        codes = codes.astype(small)
    items = list(table)
    del table
    if set(map(type, items)) != {str}:
        return None
    text = "\0".join(items)
    if text.count("\0") != k - 1:
        return None
    del items
    return (_rebuild_str_codes, (arr.shape, k, text.encode("utf-8", "surrogatepass"), codes,
                                 bool(arr.flags.writeable)))


def _rebuild_str_codes(shape: tuple, k: int, blob: bytes, codes: Any, writeable: bool = True) -> Any:
    import numpy as np
    items = blob.decode("utf-8", "surrogatepass").split("\0")
    if len(items) != k:
        raise pickle.UnpicklingError(f"string table holds {len(items)} items, expected {k}")
    uniques = np.empty(k, dtype=object)
    uniques[:] = items
    out = uniques[np.asarray(codes)].reshape(shape)
    if not writeable:
        out.flags.writeable = False
    return out


def _reduce_str_array(arr: Any) -> Any:
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel()
    if flat.size >= STR_DEDUP_MIN and "pandas" in sys.modules and _repeats_a_lot(flat):
        try:
            reduced = _reduce_str_codes(arr, flat)
        except (TypeError, ValueError):   # unhashable or odd items: the plain path decides
            reduced = None
        if reduced is not None:
            return reduced
    parts: list[bytes] = []
    for i in range(0, flat.size, STR_SLICE):
        items = flat[i: i + STR_SLICE].tolist()
        if set(map(type, items)) != {str}:
            return NotImplemented
        text = "\0".join(items)
        if text.count("\0") != len(items) - 1:   # a string holds NUL itself: keep the normal path
            return NotImplemented
        parts.append(text.encode("utf-8", "surrogatepass"))
    return (_rebuild_str_array, (arr.shape, int(flat.size), parts, bool(arr.flags.writeable)))


def _rebuild_str_array(shape: tuple, n: int, parts: list[bytes], writeable: bool = True) -> Any:
    import numpy as np
    out = np.empty(n, dtype=object)
    i = 0
    for part in parts:
        items = part.decode("utf-8", "surrogatepass").split("\0")
        out[i: i + len(items)] = items
        i += len(items)
    if i != n:
        raise pickle.UnpicklingError(f"string array holds {i} items, expected {n}")
    out = out.reshape(shape)
    if not writeable:
        out.flags.writeable = False
    return out


def _rebuild_view(root: Any, offset: int, shape: tuple, strides: tuple, dtype: Any, writeable: bool) -> Any:
    import numpy as np
    base = root.reshape(-1).view(np.uint8) if root.ndim else root.reshape(1).view(np.uint8)
    arr = np.ndarray(shape, dtype=dtype, buffer=base, offset=offset, strides=strides)
    if not writeable:
        arr.flags.writeable = False
    return arr


def _needs_by_value(obj: Any) -> bool:
    """Classes and functions the fresh kernel cannot import: defined in the notebook, closures, lambdas."""
    qual = getattr(obj, "__qualname__", "") or ""
    return getattr(obj, "__module__", None) == "__main__" or "<locals>" in qual or "<lambda>" in qual


class _FastPickler(pickle.Pickler):
    """The C pickler, plus two reductions it calls only for non-builtin types:

    - notebook classes/functions go by value through dill, one small dill stream each, while
      their instances and everything else stay on the C path (100k dataclass instances take
      a fraction of a second instead of dill's many seconds);
    - numpy arrays: views stay views, text columns go as UTF-8 blobs, datetimes out of band.
    """

    def __init__(self, file: Any, *, reduce_array: Callable[[Any], Any] | None, top_defs: dict[int, Any],
                 **kw: Any) -> None:
        super().__init__(file, **kw)
        self.reduce_array = reduce_array
        self.top_defs = top_defs
        self.by_value = 0

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            if _needs_by_value(obj):
                self.by_value += 1
                return _reduce_by_value(obj, self.top_defs)
            return NotImplemented
        if self.reduce_array is not None:
            return self.reduce_array(obj)
        return NotImplemented


def _reduce_by_value(obj: Any, top_defs: dict[int, Any]) -> Any:
    """dill-pickle one class/function; other notebook-level definitions it mentions (a base
    class, a decorator) are left as references resolved by the outer pickle, so identities hold."""
    global _DILL
    if _DILL is None:
        _DILL = _dill_pickler_class()
    import io
    deps: list[Any] = []
    buf = io.BytesIO()
    p = _DILL(buf, protocol=5, byref=False, recurse=False)
    root = id(obj)

    def persistent_id(o: Any) -> int | None:
        if id(o) != root and id(o) in top_defs and top_defs[id(o)] is o:
            deps.append(o)
            return len(deps) - 1
        return None

    p.persistent_id = persistent_id
    p.dump(obj)
    return (_rebuild_by_value, (buf.getvalue(), tuple(deps)))


def _rebuild_by_value(payload: bytes, deps: tuple) -> Any:
    import io

    import dill
    u = dill.Unpickler(io.BytesIO(payload))
    u.persistent_load = lambda pid: deps[pid]  # type: ignore[method-assign]
    return u.load()


def _dill_pickler_class() -> type:
    import dill

    class SafeDillPickler(dill.Pickler):  # type: ignore[misc,valid-type]
        """dill that refuses live resources instead of 'restoring' them as something else."""

        def save(self, obj: Any, save_persistent_id: bool = True) -> None:  # noqa: D401
            if not isinstance(obj, _ATOMIC):
                kind = resource_kind(obj)
                if kind is not None:
                    raise Blocked(*kind)
            super().save(obj, save_persistent_id)

    return SafeDillPickler


_DILL: type | None = None


class Packed:
    """One pickle stream (a group of one or more variables) on its way into chunks."""

    def __init__(self, method: str, payload: list[Future[ChunkRef]], buffers: list[tuple[int, list]],
                 nbytes: int) -> None:
        self.method, self.payload, self.buffers, self.nbytes = method, payload, buffers, nbytes
        self.stream: str | None = None

    def refs(self) -> tuple[list[ChunkRef], list[tuple[int, list[ChunkRef]]]]:
        return [f.result() for f in self.payload], [(n, [f.result() for f in fs]) for n, fs in self.buffers]


_CONTAINERS = (list, dict, set, bytearray, types.CellType)


def _singleton_ids(ns: dict[str, Any]) -> set[int]:
    """Objects shared by everything (module dicts, the namespace itself) that imply no sharing."""
    ids = {id(ns)}
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if d is not None:
            ids.add(id(d))
    return ids


_LEAVES = frozenset({str, bytes, int, float, complex, bool, type(None), range, slice})
_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
_MUTABLE = frozenset({dict, list, set, bytearray})
_RC_SINGLETON = 5_000
_NO_DESCEND = (types.ModuleType, types.BuiltinFunctionType, types.MethodType, types.CodeType, types.FrameType,
               types.GetSetDescriptorType, types.MemberDescriptorType, types.WrapperDescriptorType)


def _rc_single() -> int:
    """sys.getrefcount of an object with one referrer, seen from inside _share_ids' loop."""
    parent: list[Any] = [[]]
    frontier = [parent]
    refs = gc.get_referents(*frontier)
    frontier = []
    for o in refs:
        return sys.getrefcount(o)
    return 4


_RC_SINGLE = _rc_single()


def _share_ids(root: Any, skip: set[int]) -> set[int]:
    """Ids of objects under ``root`` that another variable could also reach.

    Walks the live object graph with gc.get_referents (C speed, level by level) and records
    only objects referenced more than once (refcount) plus notebook classes/functions: an
    object with a single referrer cannot be shared, so the result stays tiny even for 200k
    small objects, and no pickle memo has to be copied. Cycles always pass through a
    multi-referenced object, which is recorded once and not walked again.
    """
    ids = {id(root)}
    if type(root) in _LEAVES or isinstance(root, _NO_DESCEND):
        return ids
    if isinstance(root, (type, types.FunctionType)) and getattr(root, "__module__", None) != "__main__":
        return ids
    getrc = sys.getrefcount
    single = _RC_SINGLE
    numpy = sys.modules.get("numpy")
    ndarray = numpy.ndarray if numpy is not None else None
    leaves = _LEAVES
    plain = _PLAIN_CONTAINERS
    frontier = [root]
    walked = {id(root)}   # multi-referenced objects walked but not recorded as shareable
    if ndarray is not None and type(root) is ndarray and root.dtype.kind == "O" and 0 < root.size <= 100_000:
        frontier.append(root.ravel().tolist())
    while frontier:
        refs = gc.get_referents(*frontier)
        frontier = []
        push = frontier.append
        for o in refs:
            t = type(o)
            if t in leaves:
                continue
            if t not in plain:   # the common containers skip these checks
                if isinstance(o, (type, types.FunctionType)):
                    # notebook classes/functions travel by value: their bases, methods, closures and
                    # defaults tie variables together; library ones travel by name and tie nothing
                    if getattr(o, "__module__", None) != "__main__" or id(o) in ids:
                        continue
                    ids.add(id(o))
                    push(o)
                    continue
                if isinstance(o, _NO_DESCEND):
                    continue
                if t is ndarray and o.dtype.kind == "O" and 0 < o.size <= 100_000:
                    push(o.ravel().tolist())     # object arrays do not report their items to gc
            i = id(o)
            if i in skip:
                continue
            rc = getrc(o)
            if rc > single:
                if i in ids or i in walked:
                    continue
                if t is tuple or t is frozenset:
                    walked.add(i)      # immutable: identity never matters, but walk it only once
                # library singletons (cached dtypes, enum members) are referenced from everywhere;
                # they would glue unrelated variables together
                elif rc < _RC_SINGLETON or t in _MUTABLE or t.__module__ == "__main__":
                    ids.add(i)
                else:
                    walked.add(i)
            push(o)
    return ids



def pack(obj: Any, store: ChunkStore, secrets: list[bytes], *, use_dill: bool,
         view_roots: dict[int, Any] | None = None, top_defs: dict[int, Any] | None = None) -> Packed:
    """Pickle ``obj`` into chunks; raises on failure (the caller tries the next method)."""
    global _DILL
    sink = _PayloadSink(store, secrets)
    buffers: list[tuple[int, list]] = []

    def on_buffer(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:       # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes <= SCAN_BUFFER_LIMIT and secrets:
            data = raw.tobytes()
            if any(s in data for s in secrets):
                raise SecretFound("it contains the value of a secret")
        buffers.append((raw.nbytes, store.put_buffer(raw)))
        return False

    if use_dill:
        if _DILL is None:
            _DILL = _dill_pickler_class()
        p = _DILL(sink, protocol=5, buffer_callback=on_buffer, byref=False, recurse=False)
        if view_roots:
            p.reducer_override = _array_reducer(view_roots)  # type: ignore[attr-defined]
    else:
        p = _FastPickler(sink, protocol=5, buffer_callback=on_buffer, top_defs=top_defs or {},
                         reduce_array=_array_reducer(view_roots) if "numpy" in sys.modules else None)
    p.dump(obj)
    futs = sink.close()
    nbytes = sink.total + sum(n for n, _ in buffers)
    by_value = getattr(p, "by_value", 0)
    packed = Packed("dill" if use_dill or by_value else "pickle5", futs, buffers, nbytes)
    packed.stream = "pickle" if by_value and not use_dill else None  # C stream with embedded dill parts
    return packed


def _pickle_var(obj: Any, store: ChunkStore, secrets: list[bytes],
                view_roots: dict[int, Any] | None = None, force_dill: bool = False,
                top_defs: dict[int, Any] | None = None) -> tuple[Packed | None, str | None, bool]:
    """Try pickle5 then dill. Returns (packed, reason-if-failed, replayable)."""
    first: BaseException | None = None
    if not force_dill:
        try:
            return pack(obj, store, secrets, use_dill=False, view_roots=view_roots, top_defs=top_defs), None, False
        except SecretFound as exc:
            return None, f"not saved: {exc}", False
        except RecursionError as exc:
            first = exc
        except Exception as exc:  # noqa: BLE001 - any pickling error means "try the next method"
            first = exc
    try:
        return pack(obj, store, secrets, use_dill=True, view_roots=view_roots), None, False
    except SecretFound as exc:
        return None, f"not saved: {exc}", False
    except Blocked as exc:
        return None, exc.reason, exc.replayable
    except Exception as exc:  # noqa: BLE001
        err = first or exc
        msg = f"{type(err).__name__}: {err}"
        replayable = "cannot pickle" in str(err) and type(obj).__module__ != "__main__"
        return None, f"cannot be pickled ({msg[:200]})", replayable


# -- history -----------------------------------------------------------------------
def capture_history(shell: Any, values: set[str]) -> dict[str, Any]:
    """In as text, Out as text/plain + small rich mime, with secrets redacted."""
    if shell is None:
        return {"In": [], "Out": {}}
    hm = shell.history_manager
    ins = [redact_cell(str(s), values) for s in hm.input_hist_parsed]
    raw = [redact_cell(str(s), values) for s in hm.input_hist_raw]
    out: dict[str, dict[str, Any]] = {}
    for n, obj in list(hm.output_hist.items()):
        try:
            data, _md = shell.display_formatter.format(obj)
        except Exception:  # noqa: BLE001 - a broken repr only loses rich output
            data = {"text/plain": repr(obj)}
        keep: dict[str, Any] = {}
        for mime, v in data.items():
            text = v if isinstance(v, str) else None
            if mime == "text/plain":
                keep[mime] = redact(str(v)[:MAX_TEXT_PLAIN], values, patterns=True)
            elif text is not None and len(text) <= MAX_MIME_BYTES:
                keep[mime] = redact(text, values, patterns=True)
        out[str(n)] = keep
    return {"In": ins, "In_raw": raw, "Out": out, "execution_count": int(getattr(shell, "execution_count", 0))}


# -- files -------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _ignored_dir(path: str, name: str, skip_real: set[str]) -> bool:
    """Version control, venvs, caches, checkpoints, our own bundles (this one or any other)."""
    return (name in IGNORE_DIRS or os.path.islink(path) or os.path.exists(os.path.join(path, "pyvenv.cfg"))
            or os.path.realpath(path) in skip_real
            or (os.path.isdir(os.path.join(path, CHUNKS)) and os.path.isfile(os.path.join(path, "manifest.json"))))


def capture_files(root: Path, store: ChunkStore, secrets: list[bytes], skip: list[Path],
                  previous: dict[str, FileEntry]) -> tuple[list[FileEntry], list[dict], list[tuple[str, list]]]:
    """Working-directory files -> chunk futures. Returns (entries, skipped, pending)."""
    import hashlib
    max_file = _env_int("HANDOFF_MAX_FILE_BYTES", DEFAULT_MAX_FILE)
    max_total = _env_int("HANDOFF_MAX_TOTAL_BYTES", DEFAULT_MAX_TOTAL)
    skip_real = {os.path.realpath(p) for p in skip}
    entries: list[FileEntry] = []
    skipped: list[dict] = []
    pending: list[tuple[str, list]] = []
    total = 0
    root_s = str(root)
    for dirpath, dirnames, filenames in os.walk(root_s, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _ignored_dir(os.path.join(dirpath, d), d, skip_real))
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            rel = os.path.relpath(full, root_s).replace(os.sep, "/")
            try:
                st = os.lstat(full)
            except OSError as exc:
                skipped.append({"path": rel, "reason": f"cannot stat: {exc}"})
                continue
            if not os.path.isfile(full) or os.path.islink(full):
                if os.path.islink(full):
                    skipped.append({"path": rel, "reason": "symlink"})
                continue
            if SECRET_FILE_RE.match(fn):
                skipped.append({"path": rel, "reason": "looks like a secrets file"})
                continue
            if st.st_size > max_file:
                skipped.append({"path": rel, "reason": f"larger than the {max_file} byte cap (HANDOFF_MAX_FILE_BYTES)"})
                continue
            if total + st.st_size > max_total:
                skipped.append({"path": rel, "reason": f"total size cap {max_total} bytes reached "
                                                       "(HANDOFF_MAX_TOTAL_BYTES)"})
                continue
            prev = previous.get(rel)
            if (prev and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns
                    and all(store.has(s) for s in prev.chunks)):
                entries.append(dataclasses.replace(prev, mode=st.st_mode & 0o7777))
                total += st.st_size
                continue
            try:
                h = hashlib.sha256()
                futs: list = []
                tail = b""
                compress: bool | None = None
                with open(full, "rb") as f:
                    while True:
                        block = f.read(CHUNK_SIZE)
                        if not block and futs:
                            break
                        window = tail + block
                        if any(s in window for s in secrets):
                            raise SecretFound("contains the value of a secret")
                        tail = block[-64:]
                        h.update(block)
                        if compress is None:
                            compress = worth_compressing(block[:65536])
                        futs.append(store.submit(block, compress, owned=True))
                        if not block:
                            break
            except SecretFound as exc:
                for fu in futs:
                    fu.result()
                skipped.append({"path": rel, "reason": str(exc)})
                continue
            except OSError as exc:
                skipped.append({"path": rel, "reason": f"cannot read: {exc}"})
                continue
            total += st.st_size
            entries.append(FileEntry(rel, st.st_size, st.st_mode & 0o7777, h.hexdigest(), [], st.st_mtime_ns))
            pending.append((rel, futs))
    return entries, skipped, pending


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
               ns: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> CaptureReport:
    """Snapshot variables, imports, In/Out history, run state and working files into bundle ``path``.

    ``ns`` (optional) captures a plain dict instead of the shell's user namespace (scripts, benchmarks).
    """
    t_start = time.perf_counter()
    shell, ns = target_namespace(shell, ns, "save_state")
    hidden = getattr(shell, "user_ns_hidden", {}) if shell is not None else {}
    bundle = Path(path).expanduser().absolute()
    root = Path(root if root is not None else os.getcwd()).absolute()
    bundle.mkdir(parents=True, exist_ok=True)
    store = ChunkStore(bundle / CHUNKS, batch=True)
    previous_files: dict[str, FileEntry] = {}
    previous_chunks: dict[str, ChunkRef] = {}
    try:
        prev = Manifest.read(bundle)
        previous_chunks = prev.chunks
        store.register(previous_chunks)
        previous_files = {f.path: f for f in prev.files}
    except BundleError:
        pass
    report = CaptureReport(path=str(bundle))
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
            manifest.imports.append(line)
            manifest.variables.append(VariableEntry(name, "import", _type_name(value), summary=line))
            report.variables.append(VarReport(name, _type_name(value), "import"))
            continue
        candidates.append((name, value))

    gc_was_enabled = gc.isenabled()
    gc.disable()  # pickling allocates many tracked objects; full collections would dominate the time
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
            entries, skipped, pending = capture_files(root, store, secret_bytes, [bundle], previous_files)
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
        manifest.write(bundle)
    finally:
        store.close()
        store.abort()
        if gc_was_enabled:
            gc.enable()
    report.bytes_new = store.bytes_new
    report.bytes_total = manifest.stored_bytes
    report.manifest = manifest.to_dict()
    report.seconds = time.perf_counter() - t_start
    return report


def _prev_ref(store: ChunkStore, sha: str, known: ChunkRef | None) -> ChunkRef:
    """The ref of a chunk reused from the previous save (a file that did not change)."""
    size = store.path(sha).stat().st_size
    if known and known.stored == size:
        return known
    codec = store.codecs.get(sha)
    raw = len(store.get(sha, codec)) if codec == "zstd" else size
    return ChunkRef(sha, raw, size, codec)


class _UnionFind:
    def __init__(self, names: list[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, n: str) -> str:
        while self.parent[n] != n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _capture_vars(candidates: list[tuple[str, Any]], ns: dict[str, Any], shell: Any, store: ChunkStore,
                  secrets: list[bytes], manifest: Manifest, report: CaptureReport) -> None:
    """Find sharing, pickle each group once (members alone if the group fails), plan replays."""
    failed: dict[str, tuple[str, bool]] = {}
    timing: dict[str, float] = {}
    saved: set[str] = set()
    values = dict(candidates)
    skip_ids = _singleton_ids(ns) if len(candidates) > 1 else set()
    top_defs = {id(v): v for _, v in candidates if isinstance(v, (type, types.FunctionType)) and _needs_by_value(v)}

    # 1. sharing, found before pickling so every variable is pickled once: an object reachable
    #    from two variables, or numpy arrays over the same base, puts them in one group
    uf = _UnionFind(list(values))
    np_roots: dict[int, Any] = {}
    numpy = sys.modules.get("numpy")
    owner: dict[int, str] = {}
    for name, v in candidates:
        ids = _share_ids(v, skip_ids) if len(candidates) > 1 else set()
        if numpy is not None and isinstance(v, numpy.ndarray):
            root = _np_root(v)
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
            pk, reason, _ = _pickle_var(objs, store, secrets, view_roots=roots or None, top_defs=top_defs)
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
            pk, reason, replayable = _pickle_var(values[n], store, secrets, top_defs=top_defs)
            timing[n] = timing.get(n, 0.0) + time.perf_counter() - t1
            if pk is None:
                failed[n] = (reason or "cannot be pickled", replayable)
                continue
            _add_group(manifest, report, f"g{gid}" if len(names) == 1 else f"g{gid}_{n}", [n], pk, values,
                       timing, note, secrets)
            saved.add(n)

    # replays for live resources
    secret_strs = [s.decode("utf-8", "replace") for s in secrets]
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
        manifest.variables.append(VariableEntry(n, pk.method, _type_name(v), share, group_id, text, note))
        report.variables.append(VarReport(n, _type_name(v), pk.method, share, timing.get(n, 0.0), "ok", note))


# -- replay planning ---------------------------------------------------------------
UNSAFE_ATTRS = frozenset({"write", "writelines", "write_text", "write_bytes", "unlink", "rmdir", "rmtree", "remove",
                          "rename", "touch", "system", "popen", "Popen", "call", "check_call", "check_output",
                          "kill", "terminate", "to_csv", "to_parquet", "to_excel", "to_json", "to_pickle",
                          "to_sql", "savefig", "dump", "send", "sendall", "sendto", "post", "put", "delete",
                          "patch", "truncate", "makedirs", "mkdir", "start", "submit", "urlopen", "retrieve"})
UNSAFE_MODULES = frozenset({"os", "shutil", "subprocess", "requests", "httpx", "urllib", "socketserver"})
_BUILTINS = frozenset(dir(builtins))


class ReplayPlan:
    def __init__(self) -> None:
        self.names: dict[str, int] = {}        # variable -> cell number replayed for it
        self.why_not: dict[str, str] = {}
        self.replays: list[ReplayEntry] = []


def _top_bindings(tree: ast.Module) -> set[str]:
    """Names a cell binds at module level (not inside functions, classes, lambdas or comprehensions)."""
    out: set[str] = set()

    def targets(node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(st.name)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in st.names)
            elif isinstance(st, ast.Assign):
                for t in st.targets:
                    targets(t)
            elif isinstance(st, (ast.AugAssign, ast.AnnAssign)):
                targets(st.target)
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                targets(st.target)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(st, field, None)
                if isinstance(sub, list) and not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(sub)
            for h in getattr(st, "handlers", []) or []:
                if h.name:
                    out.add(h.name)
                visit(h.body)
        for st in stmts:
            for n in ast.walk(st):
                if isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
                    out.add(n.target.id)

    visit(tree.body)
    return out


def _free_names(tree: ast.Module) -> set[str]:
    loads: set[str] = set()
    stores: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else stores).add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores.add(n.name)
        elif isinstance(n, ast.arg):
            stores.add(n.arg)
        elif isinstance(n, ast.alias):
            stores.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            stores.add(n.name)
    return loads - stores - _BUILTINS


def replay_hazard(tree: ast.Module) -> str | None:
    """Why re-running this cell could change the world (write files, run commands), or None."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in ("get_ipython", "exec", "eval", "__import__"):
            return "it uses IPython magics, shell commands or exec"
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in UNSAFE_MODULES:
            return f"it calls {f.value.id}.{f.attr}()"
        if name in UNSAFE_ATTRS:
            return f"it calls {name}(), which may write or send data"
        if name == "open":
            mode: ast.AST | None = None
            if isinstance(f, ast.Name) and len(n.args) >= 2:
                mode = n.args[1]
            elif isinstance(f, ast.Attribute) and n.args:
                mode = n.args[1] if len(n.args) >= 2 and not (isinstance(n.args[0], ast.Constant) and
                                                                 isinstance(n.args[0].value, str) and
                                                                 set(n.args[0].value) <= set("rbt")) else n.args[0]
            for kw in n.keywords:
                if kw.arg == "mode":
                    mode = kw.value
            if mode is not None:
                if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
                    return "it opens a file with a mode that is not a constant"
                if any(c in mode.value for c in "wax+"):
                    return f"it opens a file for writing (mode {mode.value!r}); replaying would truncate it"
    return None


def plan_replays(needed: dict[str, str], shell: Any, restorable: set[str], secrets: list[str]) -> ReplayPlan:
    """For each live resource, find the cell that last bound it (AST over In) and decide if it is safe to replay.

    A replay runs on restore in a scratch namespace seeded with the restored values, and
    only the needed names are copied back, so the cell's other assignments change nothing.
    """
    plan = ReplayPlan()
    if not needed:
        return plan
    cells: list[str] = list(shell.history_manager.input_hist_parsed) if shell is not None else []
    parsed: dict[int, ast.Module | None] = {}

    def tree_of(i: int) -> ast.Module | None:
        if i not in parsed:
            try:
                parsed[i] = ast.parse(cells[i])
            except (SyntaxError, ValueError):
                parsed[i] = None
        return parsed[i]

    where: dict[str, int] = {}
    for name in needed:
        for i in range(len(cells) - 1, 0, -1):
            tree = tree_of(i)
            if tree is not None and name in _top_bindings(tree):
                where[name] = i
                break
        else:
            plan.why_not[name] = "no cell in this kernel's history defines it, so it cannot be replayed"
    ok_names = set(restorable)
    by_cell: dict[int, list[str]] = {}
    for name, i in sorted(where.items(), key=lambda kv: kv[1]):
        by_cell.setdefault(i, []).append(name)
    for i in sorted(by_cell):
        names = by_cell[i]
        tree = tree_of(i)
        assert tree is not None
        code = cells[i]
        why = replay_hazard(tree)
        if why is None and (any(s and s in code for s in secrets) or KEY_PATTERNS.search(code)):
            why = "its cell contains a secret"
        if why is None:
            missing = sorted(_free_names(tree) - ok_names - set(names))
            if missing:
                why = f"cell {i} needs {', '.join(missing[:5])}, which cannot be restored"
        if why is not None:
            for n in names:
                plan.why_not[n] = f"not replayed: {why}"
            continue
        ok_names.update(names)
        plan.replays.append(ReplayEntry(names, i, code))
        for n in names:
            plan.names[n] = i
    return plan
