"""Per-type save/rebuild pairs for objects whose meaning is a resource (DESIGN "Capture").

A pickle of a sqlite3 connection, an open file or a lock is either refused or wrong (a new
empty database, a truncated file). A reducer says what such an object *means*: ``save(obj)``
returns plain, picklable state (it may hold other objects: they are pickled in the same stream,
so identities within a sharing group hold), ``rebuild(state)`` makes the object again on the
other side. The picklers consult the registry before any other method, for every object.

Users add their own::

    import handoff_magic

    class Client:                       # holds a live HTTP session
        def __init__(self, url): self.url, self.session = url, open_session(url)

    handoff_magic.register_reducer(Client, lambda c: c.url, Client)

Shipped here: sqlite3 connections and cursors (their contents, or their file in the working
directory), files in every state (path + mode + position; never truncating), weakrefs and weak
containers (bound to referents pickled alongside), locks, events, conditions, semaphores,
queues (their items), thread and process pools (same configuration), ipywidgets widgets
(class + synced state, a new comm).

Array reductions used by the C pickler itself:

Each ``_reduce_*`` turns one kind of object into a small, fast pickle (``(rebuild, args)``) and each
``_rebuild_*`` is what the pickle names: those names are part of the bundle format (old bundles
name them at ``handoff_magic.capture``, which re-exports them), so never rename one without
keeping the old name importable. Today: numpy views of a shared base stay views, text columns
travel as UTF-8 blobs or a string table + codes, datetimes go out of band.

(Over 400 lines: one save/rebuild pair per resource type (sqlite, files, weakrefs, locks, queues,
pools, widgets), side by side so the registry reads as one table.)
"""
from __future__ import annotations

import contextvars
import io
import os
import pickle
import queue
import sqlite3
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures.thread import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import HandoffError

Save = Callable[[Any], Any]
Rebuild = Callable[[Any], Any]

_REGISTRY: dict[type, tuple[Save, Rebuild]] = {}
# types of packages a kernel may or may not have imported, by "module.QualName"
_BY_NAME: dict[str, tuple[Save, Rebuild]] = {}
_CACHE: dict[type, tuple[Save, Rebuild] | None] = {}

# The working directory a capture is relative to, and the one a restore resolves paths in.
CAPTURE_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("handoff_capture_root", default=None)
RESTORE_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("handoff_restore_root", default=None)


class NotReducible(Exception):
    """Raised by a ``save`` that declines this object: it then goes the ordinary way."""


def register_reducer(cls: type, save: Save, rebuild: Rebuild) -> None:
    """Save instances of ``cls`` (and its subclasses) as ``save(obj)``; rebuild them as ``rebuild(state)``.

    ``rebuild`` must be importable or defined in the notebook (then it travels by value).
    A later registration for the same class replaces the earlier one.
    """
    if not isinstance(cls, type):
        raise HandoffError(f"register_reducer needs a class, got {type(cls).__name__}",
                           "pass the class itself, e.g. register_reducer(MyClient, save, rebuild)")
    if not callable(save) or not callable(rebuild):
        raise HandoffError("register_reducer needs two callables, save(obj) -> state and rebuild(state) -> obj",
                           "pass functions (or lambdas) for save and rebuild")
    _REGISTRY[cls] = (save, rebuild)
    _CACHE.clear()


def reducer_for(t: type) -> tuple[Save, Rebuild] | None:
    """The reducer for instances of ``t`` (nearest class in its MRO), cached per type."""
    try:
        return _CACHE[t]
    except KeyError:
        pass
    found = None
    for c in t.__mro__:
        found = _REGISTRY.get(c) or _BY_NAME.get(f"{c.__module__}.{c.__qualname__}")
        if found is not None:
            break
    _CACHE[t] = found
    return found


def reduce(obj: Any) -> tuple[Rebuild, tuple[Any]] | None:
    """A pickle reduction ``(rebuild, (state,))`` for ``obj``, or None when no reducer applies."""
    entry = reducer_for(type(obj))
    if entry is None:
        return None
    save, rebuild = entry
    try:
        state = save(obj)
    except NotReducible:
        return None
    return rebuild, (state,)


# -- paths -----------------------------------------------------------------------------
def _portable_path(name: str) -> str:
    """A path inside the capture's working directory as a relative path (it travels with the
    files); anything else stays absolute."""
    root = CAPTURE_ROOT.get() or Path.cwd()
    full = os.path.abspath(name)
    try:
        rel = os.path.relpath(full, root)
    except ValueError:  # another drive
        return full
    return full if rel == ".." or rel.startswith(".." + os.sep) else rel.replace(os.sep, "/")


def _local_path(path: str) -> str:
    """Where a saved path lives here: relative paths resolve in the restore's working directory."""
    if os.path.isabs(path):
        return path
    root = RESTORE_ROOT.get() or Path.cwd()
    full = os.path.normpath(os.path.join(root, path))
    if os.path.commonpath([os.path.abspath(root), full]) != os.path.abspath(root):
        raise pickle.UnpicklingError(f"refusing to reopen {path!r}: it points outside {root}")
    return full


# -- sqlite3 ---------------------------------------------------------------------------
def _save_sqlite(con: sqlite3.Connection) -> dict[str, Any]:
    try:
        dbs = con.execute("PRAGMA database_list").fetchall()
    except sqlite3.ProgrammingError:  # closed
        return {"closed": True}
    state: dict[str, Any] = {"isolation_level": con.isolation_level, "row_factory": con.row_factory}
    if con.text_factory is not str:
        state["text_factory"] = con.text_factory
    main_file = next((row[2] for row in dbs if row[1] == "main"), "")
    path = _portable_path(main_file) if main_file else None
    if path is not None and not os.path.isabs(path) and not con.in_transaction:
        state["path"] = path          # the database file travels with the working directory
    elif hasattr(con, "serialize"):
        state["image"] = con.serialize()   # in memory (or outside the working dir): its contents
    else:
        state["script"] = "\n".join(con.iterdump())
    return state


def _load_image(con: sqlite3.Connection, image: bytes) -> None:
    """An image saved by Python 3.11+ loads on 3.10 too (no ``deserialize`` there): through a
    private temporary file copied into the in-memory database with the backup API."""
    if hasattr(con, "deserialize"):
        con.deserialize(image)
        return
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image.sqlite")
        with open(path, "wb") as f:
            f.write(image)
        src = sqlite3.connect(path)
        try:
            src.backup(con)
        finally:
            src.close()


def _rebuild_sqlite(state: dict[str, Any]) -> sqlite3.Connection:
    if state.get("closed"):
        con = sqlite3.connect(":memory:")
        con.close()
        return con
    if "path" in state:
        path = _local_path(state["path"])
        con = sqlite3.connect(f"file:{quote(path)}?mode=rw", uri=True)   # never creates an empty database
    else:
        con = sqlite3.connect(":memory:")
        if "image" in state:
            _load_image(con, state["image"])
        else:
            con.executescript(state.get("script", ""))
    con.isolation_level = state.get("isolation_level", "")
    con.row_factory = state.get("row_factory")
    if "text_factory" in state:
        con.text_factory = state["text_factory"]
    return con


def _save_cursor(cur: sqlite3.Cursor) -> dict[str, Any]:
    return {"connection": cur.connection, "arraysize": cur.arraysize, "row_factory": cur.row_factory}


def _rebuild_cursor(state: dict[str, Any]) -> sqlite3.Cursor:
    cur = state["connection"].cursor()
    cur.arraysize = state["arraysize"]
    cur.row_factory = state["row_factory"]
    return cur


# -- files -----------------------------------------------------------------------------
def _save_file(f: Any) -> dict[str, Any]:
    text = f if isinstance(f, io.TextIOWrapper) else None
    buf = f.buffer if text is not None else f
    raw = getattr(buf, "raw", buf)
    if not isinstance(raw, io.FileIO) or not isinstance(raw.name, str):
        raise NotReducible("not a named file")
    state: dict[str, Any] = {"path": _portable_path(raw.name), "mode": getattr(f, "mode", raw.mode),
                             "kind": "text" if text is not None else "raw" if buf is raw else "buffered",
                             "closed": f.closed, "pos": 0, "relative_name": not os.path.isabs(raw.name)}
    if text is not None:
        state.update(encoding=text.encoding, errors=text.errors, line_buffering=text.line_buffering,
                     write_through=text.write_through)
    if not f.closed:
        if f.writable():
            f.flush()        # what was written so far is in the file that travels
        try:
            state["pos"] = f.tell()
        except OSError:      # a text file iterated with next(): only the byte position is known
            state["pos"] = buf.tell()
            state["pos_is_bytes"] = True
    return state


def _rebuild_file(state: dict[str, Any]) -> Any:
    mode: str = state["mode"]
    plus, reading = "+" in mode, "r" in mode
    if "a" in mode:
        flags, rawmode = os.O_APPEND | os.O_CREAT | (os.O_RDWR if plus else os.O_WRONLY), "a+" if plus else "a"
    elif reading and not plus:
        flags, rawmode = os.O_RDONLY, "r"
    else:   # "w", "x", "r+", "w+": reopened in place, never truncated
        flags = (os.O_RDWR if plus else os.O_WRONLY) | (0 if reading else os.O_CREAT)
        rawmode = "r+" if plus else "w"
    path = _local_path(state["path"])
    closed = state.get("closed", False)
    if closed:   # a closed handle keeps its name and mode, and opens nothing
        fd = os.open(os.devnull, os.O_RDWR)
        rawmode = rawmode.replace("a", "w")
    else:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    raw = io.FileIO(fd, rawmode, closefd=True)
    # open('data.csv').name is 'data.csv': a relative name stays relative (to the new working dir)
    raw.name = state["path"] if state.get("relative_name") and not os.path.isabs(state["path"]) else path
    obj: Any = raw
    if state["kind"] != "raw":
        if raw.readable() and raw.writable():
            obj = io.BufferedRandom(raw)
        elif raw.readable():
            obj = io.BufferedReader(raw)
        else:
            obj = io.BufferedWriter(raw)
        if state["kind"] == "text":
            obj = io.TextIOWrapper(obj, encoding=state.get("encoding"), errors=state.get("errors"),
                                   line_buffering=state.get("line_buffering", False),
                                   write_through=state.get("write_through", False))
            obj.mode = mode
    if closed:
        obj.close()
    elif state.get("pos") and "a" not in mode:
        (obj.buffer if state.get("pos_is_bytes") and state["kind"] == "text" else obj).seek(state["pos"])
    return obj


# -- weak references -------------------------------------------------------------------
class _Gone:
    """Stands in for a referent that had died before the capture."""


def _save_ref(r: weakref.ref) -> tuple[type, Any]:
    cls = type(r) if type(r) in (weakref.ref, weakref.WeakMethod) else weakref.ref
    return cls, r()


def _rebuild_ref(state: tuple[type, Any]) -> weakref.ref:
    cls, referent = state
    if referent is None:
        gone = _Gone()
        dead = weakref.ref(gone)
        del gone
        return dead
    return cls(referent)


def _save_weak_container(d: Any) -> tuple[type, Any]:
    return type(d), (list(d) if isinstance(d, weakref.WeakSet) else dict(d.items()))


def _rebuild_weak_container(state: tuple[type, Any]) -> Any:
    cls, items = state
    return cls(items)


# -- threading -------------------------------------------------------------------------
_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())


def _save_lock(lock: Any) -> bool:
    return lock.locked()


def _rebuild_lock(locked: bool) -> Any:
    lock = threading.Lock()
    if locked:
        lock.acquire()
    return lock


def _save_rlock(lock: Any) -> None:
    return None   # held means held by a thread of this process: the new one starts released


def _rebuild_rlock(_state: None) -> Any:
    return threading.RLock()


def _save_event(ev: threading.Event) -> bool:
    return ev.is_set()


def _rebuild_event(is_set: bool) -> threading.Event:
    ev = threading.Event()
    if is_set:
        ev.set()
    return ev


def _save_condition(cond: threading.Condition) -> Any:
    return cond._lock   # type: ignore[attr-defined]  # the lock it waits on, shared with other variables


def _rebuild_condition(lock: Any) -> threading.Condition:
    return threading.Condition(lock)


def _save_semaphore(sem: threading.Semaphore) -> tuple[type, int, int]:
    return type(sem), sem._value, getattr(sem, "_initial_value", sem._value)


def _rebuild_semaphore(state: tuple[type, int, int]) -> threading.Semaphore:
    cls, value, initial = state
    sem = cls(initial)
    for _ in range(initial - value):
        sem.acquire()
    return sem


def _save_barrier(b: threading.Barrier) -> tuple[int, float | None]:
    return b.parties, b._timeout   # type: ignore[attr-defined]


def _rebuild_barrier(state: tuple[int, float | None]) -> threading.Barrier:
    return threading.Barrier(state[0], timeout=state[1])


def _save_queue(q: queue.Queue) -> tuple[type, int, list[Any], int]:
    with q.mutex:
        return type(q), q.maxsize, list(q.queue), q.unfinished_tasks


def _rebuild_queue(state: tuple[type, int, list[Any], int]) -> queue.Queue:
    cls, maxsize, items, unfinished = state
    q = cls(maxsize)
    for item in items:
        q._put(item)   # the queue's own order (FIFO, LIFO, heap)
    q.unfinished_tasks = unfinished
    return q


def _save_pool(pool: Any) -> dict[str, Any]:
    state = {"cls": type(pool), "max_workers": pool._max_workers, "initializer": pool._initializer,
             "initargs": pool._initargs, "shutdown": getattr(pool, "_shutdown", False)
             or getattr(pool, "_shutdown_thread", False)}
    if isinstance(pool, ThreadPoolExecutor):
        state["thread_name_prefix"] = pool._thread_name_prefix
    return state


def _rebuild_pool(state: dict[str, Any]) -> Any:
    kw = {k: state[k] for k in ("max_workers", "initializer", "initargs", "thread_name_prefix") if k in state}
    pool = state["cls"](**kw)
    if state.get("shutdown"):
        pool.shutdown(wait=False)
    return pool


# -- ipywidgets ------------------------------------------------------------------------
def _save_widget(w: Any) -> tuple[type, dict[str, Any]]:
    return type(w), {k: getattr(w, k) for k in w.keys if not k.startswith("_")}


def _rebuild_widget(state: tuple[type, dict[str, Any]]) -> Any:
    cls, traits = state
    return cls(**traits)   # a new model with its own comm, holding the same state


_BUILT_IN: dict[type, tuple[Save, Rebuild]] = {
    sqlite3.Connection: (_save_sqlite, _rebuild_sqlite),
    sqlite3.Cursor: (_save_cursor, _rebuild_cursor),
    **{t: (_save_file, _rebuild_file) for t in (io.TextIOWrapper, io.BufferedReader, io.BufferedWriter,
                                                 io.BufferedRandom, io.FileIO)},
    weakref.ref: (_save_ref, _rebuild_ref),
    **{t: (_save_weak_container, _rebuild_weak_container) for t in (weakref.WeakValueDictionary,
                                                                     weakref.WeakKeyDictionary, weakref.WeakSet)},
    _LOCK: (_save_lock, _rebuild_lock),
    _RLOCK: (_save_rlock, _rebuild_rlock),
    threading.Event: (_save_event, _rebuild_event),
    threading.Condition: (_save_condition, _rebuild_condition),
    threading.Semaphore: (_save_semaphore, _rebuild_semaphore),
    threading.Barrier: (_save_barrier, _rebuild_barrier),
    queue.Queue: (_save_queue, _rebuild_queue),
    ThreadPoolExecutor: (_save_pool, _rebuild_pool),
}
_REGISTRY.update(_BUILT_IN)
_BY_NAME["ipywidgets.widgets.widget.Widget"] = (_save_widget, _rebuild_widget)
# by name: importing concurrent.futures.process (multiprocessing) would cost every capture ~25 ms
_BY_NAME["concurrent.futures.process.ProcessPoolExecutor"] = (_save_pool, _rebuild_pool)


# -- numpy arrays ----------------------------------------------------------------------
def np_root(arr: Any) -> Any:
    root = arr
    import numpy as np
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


STR_ARRAY_MIN = 2048          # object arrays smaller than this pickle fine as they are


STR_SLICE = 1 << 18           # strings per encoded slice: bounds the extra memory


def array_reducer(roots: dict[int, Any] | None) -> Callable[[Any], Any]:
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
            root = np_root(obj)
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
            return (_rebuild_from_buffer, (pickle.PickleBuffer(ints),  # type: ignore[arg-type]  # numpy: a buffer
                                           obj.dtype.str, obj.shape, order,
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
    import numpy as np
    import pandas as pd
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
