"""Objects -> pickle streams cut into chunks: the C pickler first, dill where it refuses.

The stream is chunked as it is written (memory stays bounded) and every chunk and small
out-of-band buffer is scanned for secret values first. Notebook classes and functions go by
value through dill, one small stream each, inside the fast C stream. Live resources that dill
would 'restore' wrongly (a new lock, a truncated file) are refused (``Blocked``) so the caller
can replay their defining cell instead.
"""
from __future__ import annotations

import io
import pickle
import socket
import sqlite3
import sys
import threading
import types
from concurrent.futures import Future
from typing import Any, Callable

from ..chunks import CHUNK_SIZE, ChunkRef, ChunkStore
from ..errors import Blocked, SecretFound
from ..secrets import bytes_look_like_key
from . import reducers, sources
from .reducers import array_reducer

SCAN_BUFFER_LIMIT = 16 * 1024 * 1024   # out-of-band buffers below this are scanned for secrets


_ATOMIC = (str, bytes, int, float, complex, bool, type(None), tuple, frozenset, range, slice)


def resource_kind(obj: Any) -> tuple[str, bool] | None:
    """(reason, replayable) for live resources that must not be pickled, else None."""
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


_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())


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


def needs_by_value(obj: Any) -> bool:
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
                 by_source: frozenset[int] = frozenset(), **kw: Any) -> None:
        super().__init__(file, **kw)
        self.reduce_array = reduce_array
        self.top_defs = top_defs
        self.by_source = by_source
        self.by_value = 0
        self.reduced = 0

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)):
            if id(obj) in self.by_source:
                return NotImplemented     # by name: the restore defines it from its source first
            if needs_by_value(obj):
                self.by_value += 1
                return _reduce_by_value(obj, self.top_defs)
            return NotImplemented
        reduced = reducers.reduce(obj)
        if reduced is not None:   # a live resource, saved by what it means
            self.reduced += 1
            return reduced
        if type(obj).__module__ != "__main__":
            sources.check_by_reference(obj, self.by_source)
        if self.reduce_array is not None:
            return self.reduce_array(obj)
        return NotImplemented


def _reduce_by_value(obj: Any, top_defs: dict[int, Any]) -> Any:
    """dill-pickle one class/function; other notebook-level definitions it mentions (a base
    class, a decorator) are left as references resolved by the outer pickle, so identities hold."""
    global _DILL
    if _DILL is None:
        _DILL = _dill_pickler_class()
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
    import dill
    u = dill.Unpickler(io.BytesIO(payload))  # noqa: S301 - only inside a kernel's load_state (nested pickle)
    u.persistent_load = lambda pid: deps[pid]
    return u.load()


def _dill_pickler_class() -> type:
    import dill

    class SafeDillPickler(dill.Pickler):
        """dill that uses the reducers and refuses other live resources instead of 'restoring' them
        as something else; notebook definitions rebuilt from source go by name."""

        by_source: frozenset[int] = frozenset()
        reduced = 0

        def save(self, obj: Any, save_persistent_id: bool = True) -> None:
            if not isinstance(obj, _ATOMIC):
                if id(obj) in self.by_source:
                    self.save_global(obj)
                    return
                reduced = reducers.reduce(obj)
                if reduced is not None:
                    self.reduced += 1
                    self.save_reduce(*reduced, obj=obj)
                    return
                sources.check_by_reference(obj, self.by_source)
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


def pack(obj: Any, store: ChunkStore, secrets: list[bytes], *, use_dill: bool,
         view_roots: dict[int, Any] | None = None, top_defs: dict[int, Any] | None = None,
         by_source: frozenset[int] = frozenset()) -> Packed:
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
        p.by_source = by_source
        if view_roots:
            p.reducer_override = array_reducer(view_roots)
    else:
        p = _FastPickler(sink, protocol=5, buffer_callback=on_buffer, top_defs=top_defs or {}, by_source=by_source,
                         reduce_array=array_reducer(view_roots) if "numpy" in sys.modules else None)
    p.dump(obj)
    futs = sink.close()
    nbytes = sink.total + sum(n for n, _ in buffers)
    by_value = getattr(p, "by_value", 0)
    if p.reduced:   # live resources saved by their meaning; the stream says which unpickler reads it
        packed = Packed("reducer", futs, buffers, nbytes)
        packed.stream = "dill" if use_dill else "pickle"
    else:
        packed = Packed("dill" if use_dill or by_value else "pickle5", futs, buffers, nbytes)
        packed.stream = "pickle" if by_value and not use_dill else None  # C stream with embedded dill parts
    return packed


def pickle_var(obj: Any, store: ChunkStore, secrets: list[bytes],
                view_roots: dict[int, Any] | None = None, force_dill: bool = False,
                top_defs: dict[int, Any] | None = None,
                by_source: frozenset[int] = frozenset()) -> tuple[Packed | None, str | None, bool]:
    """Try pickle5 then dill. Returns (packed, reason-if-failed, replayable)."""
    first: BaseException | None = None
    if not force_dill:
        try:
            return pack(obj, store, secrets, use_dill=False, view_roots=view_roots, top_defs=top_defs,
                        by_source=by_source), None, False
        except SecretFound as exc:
            return None, f"not saved: {exc}", False
        except RecursionError as exc:
            first = exc
        except Exception as exc:  # noqa: BLE001 - any pickling error means "try the next method"
            first = exc
    try:
        return pack(obj, store, secrets, use_dill=True, view_roots=view_roots, by_source=by_source), None, False
    except SecretFound as exc:
        return None, f"not saved: {exc}", False
    except Blocked as exc:
        return None, exc.reason, exc.replayable
    except Exception as exc:  # noqa: BLE001
        err = first or exc
        msg = f"{type(err).__name__}: {err}"
        replayable = "cannot pickle" in str(err) and type(obj).__module__ != "__main__"
        return None, f"cannot be pickled ({msg[:200]})", replayable
