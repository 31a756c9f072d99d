"""What a pull back may load without being asked: plain data, and what this laptop sent.

A remote run's checkpoint is written by code an LLM chose; unpickling it can run anything a
``__reduce__`` names (``exec``, ``os.system``...). ``%pull ID`` therefore loads a pickled
group only when either it is a group this laptop itself sent (same variables, same chunks in
the same places: a chunk the laptop sent as a file or as another group's buffer does not make
a pickle trusted), or the pickle's opcodes, read with :mod:`pickletools` and never executed,
import nothing outside an allowlist of plain data types (builtins' containers and scalars,
datetime, decimal, fractions, uuid, pathlib, collections, numpy, pandas, scipy.sparse, and the
array rebuilds of snapshot/reducers.py).

Reducer rebuilds of resources (a file reopened by path, a database, a pool, a widget, any
``register_reducer`` rebuild) follow the same rule: a remote run's request to reopen
``/etc/shadow`` or append to ``~/.bashrc`` is left out, and the report says what it asked for
(read by a stand-in unpickler that calls nothing). The same rule covers the other ways a bundle
runs code on load: import lines, notebook definitions rebuilt from source, replayed cells and
local module folders are kept only when the laptop sent them. Everything left out is listed
with its type; ``%pull ID --trust`` loads it.
"""
from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..manifest import GroupEntry, ReplayEntry

# module -> allowed names ("*": any name in that module, minus DENY_WORDS)
_EXACT: dict[str, frozenset[str]] = {
    "builtins": frozenset({"list", "dict", "set", "frozenset", "tuple", "bytearray", "bytes", "complex",
                           "int", "float", "str", "bool", "slice", "range", "NoneType", "Ellipsis"}),
    "copyreg": frozenset({"_reconstructor"}),   # calls base.__new__(cls): cls is checked as its own global
    "datetime": frozenset({"date", "datetime", "time", "timedelta", "timezone", "tzinfo"}),
    "decimal": frozenset({"Decimal"}),
    "fractions": frozenset({"Fraction"}),
    "uuid": frozenset({"UUID", "SafeUUID"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter", "ChainMap"}),
    "zoneinfo": frozenset({"ZoneInfo"}),
    "zoneinfo._zoneinfo": frozenset({"ZoneInfo"}),
    "_codecs": frozenset({"encode"}),           # protocol 2 bytes: _codecs.encode(str, 'latin1')
    # array rebuilds (views, text columns, datetimes): numpy arrays from bytes, nothing opened or run;
    # bundles name them at both module paths (handoff_magic.capture re-exports the old one)
    **{m: frozenset({"_rebuild_view", "_rebuild_str_array", "_rebuild_str_codes", "_rebuild_from_buffer"})
       for m in ("handoff_magic.snapshot.reducers", "handoff_magic.capture")},
}
_PACKAGES = ("numpy", "pandas", "scipy.sparse")
# reading files, evaluating strings or loading libraries would run code even inside those packages
DENY_WORDS = ("load", "read", "eval", "exec", "system", "popen", "spawn", "compile", "import", "open",
              "f2py", "distutils", "ctypes", "testing", "subprocess", "io", "query", "getattr", "apply")

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
            "STRING"}
_NO_PUSH = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP", "POP", "POP_MARK"}


def allowed_global(module: str, name: str) -> bool:
    """Whether unpickling may import ``module.name`` from an untrusted pickle."""
    if name in _EXACT.get(module, ()):
        return True
    if not any(module == p or module.startswith(p + ".") for p in _PACKAGES):
        return False
    words = [w for part in (*module.split("."), *name.split(".")) for w in part.lower().split("_") if w]
    return not any(w.startswith(d) for w in words for d in DENY_WORDS)


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle imports, read from its opcodes without running it; a
    STACK_GLOBAL whose operands are not plain strings shows as ("?", "?")."""
    found: list[tuple[str, str]] = []
    memo: dict[int, object] = {}
    pushed: list[object] = []   # the recent pushes, strings or None, enough for STACK_GLOBAL
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            mod, att = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.append((mod, att) if isinstance(mod, str) and isinstance(att, str) else ("?", "?"))
            pushed.append(None)
        elif name in _STRINGS:
            pushed.append(arg if isinstance(arg, str) else None)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None   # type: ignore[arg-type]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))   # type: ignore[arg-type]
        elif name not in _NO_PUSH:
            pushed.append(None)
        del pushed[:-2]
    return found


GroupKey = tuple[tuple[str, ...], str, str, tuple[str, ...], tuple[tuple[str, ...], ...]]


def group_key(group: GroupEntry) -> GroupKey:
    """What makes a pickled group the same one: its variables, how it loads, and every chunk in its place."""
    return (tuple(group.names), group.method, group.stream or "", tuple(group.payload),
            tuple(tuple(b.chunks) for b in group.buffers))


@dataclass
class PullTrust:
    """What this laptop sent in the handoff a pull brings back (recorded at handoff time)."""
    groups: frozenset[GroupKey] = frozenset()
    imports: frozenset[str] = frozenset()
    code: frozenset[tuple[str, tuple[str, ...], str]] = frozenset()   # (kind, names, code)
    module_paths: frozenset[str] = frozenset()

    @classmethod
    def sent_in(cls, manifest: dict[str, Any]) -> dict[str, Any]:
        """The part of a handoff manifest a later pull needs (JSON, kept in the handoff record)."""
        return {"groups": [[list(g.get("names") or []), str(g.get("method")), str(g.get("stream") or ""),
                            list(g.get("payload") or []), [list(b.get("chunks") or []) for b in g.get("buffers") or []]]
                           for g in manifest.get("groups") or [] if isinstance(g, dict)],
                "imports": list(manifest.get("imports") or []),
                "module_paths": list(manifest.get("module_paths") or []),
                "code": [[kind, list(e.get("names") or []), str(e.get("code") or "")]
                         for kind in ("definitions", "replays") for e in manifest.get(kind) or []
                         if isinstance(e, dict)]}

    @classmethod
    def from_sent(cls, sent: dict[str, Any] | None) -> PullTrust:
        """From ``sent_in``'s record; none (a run handed off elsewhere, or a record written before
        groups were recorded): trust nothing remote."""
        sent = sent or {}
        groups = frozenset((tuple(n), m, s, tuple(p), tuple(tuple(b) for b in bufs))
                           for n, m, s, p, bufs in sent.get("groups") or ())
        return cls(groups, frozenset(sent.get("imports") or ()),
                   frozenset((k, tuple(n), c) for k, n, c in sent.get("code") or ()),
                   frozenset(sent.get("module_paths") or ()))

    def group_refusal(self, group: GroupEntry, payload: bytes, buffers: Iterable[Any] = ()) -> str | None:
        """Why a pickled group must not be unpickled here, or None to load it."""
        if group_key(group) in self.groups:
            return None   # the very group this laptop sent, chunk for chunk
        bad = unsafe_globals(payload)
        if not bad:
            return None
        asks = asked_for(payload, buffers)
        if asks:
            return f"it asks this laptop to {'; '.join(asks[:3])}{' and more' if len(asks) > 3 else ''}"
        return (f"its pickle would import {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}, "
                "which can run code on load")

    def allows_import(self, line: str) -> bool:
        return line in self.imports

    def allows_code(self, kind: str, entry: ReplayEntry) -> bool:
        """A definition (``definitions``) or replayed cell (``replays``) this laptop sent."""
        return (kind, tuple(entry.names), entry.code) in self.code

    def allows_module_path(self, rel: str) -> bool:
        return rel in self.module_paths


def unsafe_globals(data: bytes) -> list[str]:
    """The globals of a pickle that are not plain data (empty: safe to load untrusted)."""
    try:
        found = pickle_globals(data)
    except Exception as exc:  # noqa: BLE001 - unreadable opcodes are refused, never run
        return [f"<unreadable pickle: {exc}>"]
    return sorted({f"{m}.{n}" for m, n in found if not allowed_global(m, n)})


# -- what a refused pickle asks for, read without calling anything it names ----------------
_REBUILDS = "handoff_magic.snapshot.reducers."


def _describe(target: str, args: tuple[Any, ...]) -> str | None:
    """A reducer rebuild's request in words (None: not a resource rebuild)."""
    state = args[0] if args else None
    get = state.get if isinstance(state, dict) else (lambda key, default=None: default)
    name = target.removeprefix(_REBUILDS)
    if name == "_rebuild_file" and not get("closed"):
        return f"reopen the file {get('path')!r} (mode {get('mode')!r})"
    if name == "_rebuild_sqlite" and get("path"):
        return f"open the database {get('path')!r}"
    if name == "_rebuild_pool":
        return "start a pool of workers"
    if name == "_rebuild_widget":
        return "create a widget"
    if target.startswith(_REBUILDS) or allowed_global(*target.rsplit(".", 1)):
        return None
    return f"call {target}"


def asked_for(payload: bytes, buffers: Iterable[Any] = ()) -> list[str]:
    """What unpickling ``payload`` would do beyond building data: every global is replaced by a
    stand-in class that records its call, so nothing the pickle names is imported or run."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _stand_in(f"{module}.{name}", calls)

        def persistent_load(self, pid: Any) -> Any:
            return None

    try:
        Reader(io.BytesIO(payload), buffers=list(buffers)).load()
    except Exception:  # noqa: BLE001 - a pickle this reader cannot follow is still refused, named by its globals
        pass
    return list(dict.fromkeys(d for target, args in calls if (d := _describe(target, args)) is not None))


def _stand_in(target: str, calls: list[tuple[str, tuple[Any, ...]]]) -> type:
    """A class that accepts every way a pickle calls or fills an object and only records the call."""
    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        calls.append((target, args))
        return object.__new__(cls)

    def ignore(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    return type("StandIn", (), {"__new__": new, "__init__": ignore, "__setstate__": ignore, "append": ignore,
                                "extend": ignore, "__setitem__": ignore, "add": ignore})
