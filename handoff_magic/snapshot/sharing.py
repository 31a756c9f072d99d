"""Which variables share objects, found before pickling so each group is pickled once
(``a is b``, views and weakrefs stay true on the other side).
"""
from __future__ import annotations

import gc
import sys
import types
from typing import Any

from . import reducers


def singleton_ids(ns: dict[str, Any]) -> set[int]:
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
    """sys.getrefcount of an object with one referrer, seen from inside share_ids' loop."""
    parent: list[Any] = [[]]
    frontier = [parent]
    refs = gc.get_referents(*frontier)
    frontier = []
    for o in refs:
        return sys.getrefcount(o)
    return 4


_RC_SINGLE = _rc_single()


def _reduced_state(obj: Any) -> Any:
    """What the reducer of ``obj`` would save (None if none applies or it declines)."""
    if reducers.reducer_for(type(obj)) is None:
        return None
    try:
        reduced = reducers.reduce(obj)
    except Exception:  # noqa: BLE001 - the pickling pass reports the failure
        return None
    return None if reduced is None else reduced[1]


def share_ids(root: Any, skip: set[int]) -> set[int]:
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
    reduced = _reduced_state(root)
    if reduced is not None:
        root = reduced
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
                if reducers.reducer_for(t) is not None:
                    # a resource (connection, file, widget, weakref) is shared as itself and links
                    # what its reducer saves (a weakref's referent), not its live internals
                    if id(o) not in ids:
                        ids.add(id(o))
                        state = _reduced_state(o)
                        if state is not None:
                            push(state)
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


class UnionFind:
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
