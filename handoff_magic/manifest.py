"""The manifest: what a bundle holds, typed, and checked once where it crosses a boundary.

A bundle is ``manifest.json`` plus its chunks (see chunks.py). The manifest travels as JSON
between the kernel, the laptop and the server; ``Manifest.parse`` turns that JSON into typed
entries and refuses anything malformed (unsafe paths, unknown methods, chunks referenced but
not listed, sizes over a limit) with one BundleError naming the problems. It reads JSON only,
never a pickle, so the server uses it too. ``to_dict`` gives back exactly the wire form, and
keys this version does not know are carried through untouched (``extra``).

(Over 400 lines: the entry types and the one parser that checks them belong together; the parser
collects every problem instead of stopping at the first, which is what makes it long.)
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .atomic import atomic_write_bytes, fsync_dir
from .chunks import CHUNKS, CODECS, AddressHasher, ChunkRef, ChunkStore, is_sha, is_sha256
from .errors import BundleError, BundleSchemaError, StateError

SCHEMA_VERSION = 1
KIND = "handoff-bundle"
MANIFEST = "manifest.json"
METHODS = ("pickle5", "dill", "reducer", "replay", "import", "skipped")
PICKLED = ("pickle5", "dill", "reducer")
IMPORT_RE = re.compile(
    r"^(import [A-Za-z_][\w.]*( as [A-Za-z_]\w*)?|from [A-Za-z_][\w.]* import [A-Za-z_]\w*( as [A-Za-z_]\w*)?)$"
)
MAX_ENTRIES = 1_000_000   # a working dir of 50k files is 50k file entries plus their chunks
MAX_VARIABLES = 100_000   # no namespace holds more names; a longer list is an attack, not a notebook
RESERVED_DIR = ".handoff"   # a run's own files (bundle, checkpoints) in its workspace
SAFE_MODE_BITS = 0o775      # rwxrwxr-x at most


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _extra(d: dict[str, Any], known: Iterable[str]) -> dict[str, Any]:
    keys = set(known)
    return {k: v for k, v in d.items() if k not in keys}


@dataclass
class VariableEntry:
    """One namespace name: how it travels (``method``) and, when pickled, in which group."""
    name: str
    method: str
    type: str = "?"
    size: int = 0
    group: str | None = None
    summary: str | None = None
    reason: str | None = None            # why skipped / replayed / split from its group
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "size": self.size, "method": self.method,
                "group": self.group, "summary": self.summary, "reason": self.reason, **self.extra}


@dataclass
class BufferEntry:
    """One out-of-band pickle buffer: its raw size and the chunks it is cut into."""
    size: int
    chunks: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "size": self.size}


@dataclass
class GroupEntry:
    """One pickle stream holding one or more variables (so shared objects stay shared)."""
    id: str
    names: list[str]
    method: str
    payload: list[str]
    buffers: list[BufferEntry] = field(default_factory=list)
    stream: str | None = None            # "pickle": a C stream with embedded dill parts; "dill": a dill stream
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "names": self.names, "method": self.method, "payload": self.payload,
                             "buffers": [b.to_dict() for b in self.buffers]}
        if self.stream:
            d["stream"] = self.stream
        d.update(self.extra)
        return d

    @property
    def label(self) -> str:
        return ("variable " if len(self.names) < 2 else "variables ") + ", ".join(self.names)


@dataclass
class ReplayEntry:
    """A cell re-run on restore to re-create live resources (``names``)."""
    names: list[str]
    cell: int
    code: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "cell": self.cell, "code": self.code, **self.extra}


@dataclass
class FileEntry:
    """A working-directory file: relative POSIX path, mode, content hash and chunks."""
    path: str
    size: int
    mode: int
    sha256: str
    chunks: list[str] = field(default_factory=list)
    mtime_ns: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "mode": self.mode, "size": self.size, "sha256": self.sha256}
        if self.mtime_ns is not None:
            d["mtime_ns"] = self.mtime_ns
        d["chunks"] = self.chunks
        d.update(self.extra)
        return d


@dataclass
class Manifest:
    chunks: dict[str, ChunkRef] = field(default_factory=dict)
    variables: list[VariableEntry] = field(default_factory=list)
    groups: list[GroupEntry] = field(default_factory=list)
    replays: list[ReplayEntry] = field(default_factory=list)
    definitions: list[ReplayEntry] = field(default_factory=list)   # notebook code defined from its source
    imports: list[str] = field(default_factory=list)
    module_paths: list[str] = field(default_factory=list)   # working-dir folders local modules import from
    history: dict[str, Any] = field(default_factory=lambda: {"In": [], "Out": {}})
    files: list[FileEntry] = field(default_factory=list)
    run: dict[str, Any] | None = None    # RunState.to_dict(), checked by parse
    created: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- wire form --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "kind": KIND, "created": self.created,
                "chunks": {s: r.meta() for s, r in self.chunks.items()},
                "variables": [v.to_dict() for v in self.variables], "groups": [g.to_dict() for g in self.groups],
                "replays": [r.to_dict() for r in self.replays], "definitions": [d.to_dict() for d in self.definitions],
                "imports": list(self.imports), "module_paths": list(self.module_paths),
                "history": self.history, "files": [f.to_dict() for f in self.files], "run": self.run, **self.extra}

    @classmethod
    def parse(cls, data: Any, *, max_bytes: int | None = None, max_entries: int = MAX_ENTRIES) -> "Manifest":
        """Check ``data`` (parsed JSON) and type it; BundleError lists the problems found."""
        return _Parser(data, max_bytes, max_entries).manifest()

    @classmethod
    def read(cls, dir: Path) -> "Manifest":
        """``dir/manifest.json``, parsed and checked."""
        return cls.parse(read_manifest(dir))

    def write(self, dir: Path) -> None:
        write_manifest(dir, self.to_dict())

    # -- queries ----------------------------------------------------------------------
    @property
    def shas(self) -> list[str]:
        """Every chunk the entries reference, sorted (the chunks an upload or a copy needs)."""
        out: set[str] = set()
        for g in self.groups:
            out.update(g.payload)
            for b in g.buffers:
                out.update(b.chunks)
        for f in self.files:
            out.update(f.chunks)
        return sorted(out)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored for r in self.chunks.values())

    def owners(self) -> dict[str, list[str]]:
        """Map chunk sha -> what it belongs to ('variable df', 'file data.csv'), for error messages."""
        owners: dict[str, list[str]] = {}
        for g in self.groups:
            for s in [*g.payload, *(s for b in g.buffers for s in b.chunks)]:
                owners.setdefault(s, []).append(g.label)
        for f in self.files:
            for s in f.chunks:
                owners.setdefault(s, []).append(f"file {f.path}")
        return owners


# -- raw JSON on disk ---------------------------------------------------------------------
def write_manifest(dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``dir/manifest.json`` atomically (temp, fsync, rename, fsync dir)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(dir / MANIFEST, data, mode=0o644)
    fsync_dir(dir)


def read_manifest(dir: Path) -> dict[str, Any]:
    """The JSON of ``dir/manifest.json`` with its header checked (kind, schema version); not typed."""
    path = Path(dir) / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist: {dir} is not a handoff bundle (save one with "
                          "%snapshot save PATH)") from None
    try:
        manifest: dict[str, Any] = json.loads(raw)
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


def safe_mode(mode: int) -> int:
    """A file's mode as it may be written: plain permission bits, never setuid, setgid, sticky
    or world-writable (a manifest is untrusted input on both sides)."""
    return int(mode) & SAFE_MODE_BITS


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


class _Parser:
    """JSON -> Manifest, collecting every problem rather than stopping at the first."""

    def __init__(self, data: Any, max_bytes: int | None, max_entries: int) -> None:
        check_header(data)
        self.data: dict[str, Any] = data
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.problems: list[str] = []

    def manifest(self) -> Manifest:
        d = self.data
        chunks = self._chunks(d.get("chunks"))
        lists = {k: self._list(k) for k in ("variables", "groups", "replays", "definitions", "imports", "files",
                                            "module_paths")}
        n_entries = len(d["chunks"]) + sum(len(v) for v in lists.values())
        too_many = [f"manifest has {n_entries} entries, more than the limit {self.max_entries}"] \
            if n_entries > self.max_entries else []
        if len(lists["variables"]) > min(MAX_VARIABLES, self.max_entries):
            too_many.append(f"manifest has {len(lists['variables'])} variable entries, more than the limit "
                            f"{min(MAX_VARIABLES, self.max_entries)}")
        if too_many:  # refused before checking each entry: that work is what an oversized manifest costs
            raise BundleError("invalid manifest: " + "; ".join(too_many + self.problems[:8]))
        self.listed = d["chunks"]
        variables = [v for v in map(self._variable, lists["variables"]) if v is not None]
        groups = [g for g in map(self._group, lists["groups"]) if g is not None]
        group_ids = {g["id"] for g in lists["groups"] if isinstance(g, dict) and isinstance(g.get("id"), str)}
        for v in variables:
            if v.method in PICKLED and not (isinstance(v.group, str) and v.group in group_ids):
                self.problems.append(f"variable {v.name}: group {v.group!r} is not in 'groups'")
        replays = [r for r in map(self._replay, lists["replays"]) if r is not None]
        definitions = [r for r in map(self._replay, lists["definitions"]) if r is not None]
        module_paths = []
        for rel in lists["module_paths"]:
            why = "not a string" if not isinstance(rel, str) else None if rel == "" else check_relpath(rel)
            if why:
                self.problems.append(f"module path {str(rel)[:80]!r}: {why}")
            else:
                module_paths.append(rel)
        imports = []
        for line in lists["imports"]:
            if not isinstance(line, str) or not IMPORT_RE.match(line):
                self.problems.append(f"import line {str(line)[:80]!r} is not a plain import statement")
            else:
                imports.append(line)
        files = self._files(lists["files"])
        history = d.get("history", {"In": [], "Out": {}})
        if not isinstance(history, dict) or not isinstance(history.get("In", []), list) or \
                not isinstance(history.get("Out", {}), dict):
            self.problems.append("'history' must be {In: [text], Out: {n: mime bundle}}")
        run = d.get("run")
        if run is not None:
            from .state import RunState
            try:
                RunState.from_dict(run)
            except StateError as exc:
                self.problems.append(f"run: {exc}")
        total = sum(r.stored for r in chunks.values())
        if self.max_bytes is not None and total > self.max_bytes:
            self.problems.append(f"bundle holds {total} bytes, more than the limit {self.max_bytes}")
        if self.problems:
            p = self.problems
            more = f" (and {len(p) - 10} more)" if len(p) > 10 else ""
            raise BundleError("invalid manifest: " + "; ".join(p[:10]) + more)
        created = d.get("created")
        known = ("schema_version", "kind", "created", "chunks", "variables", "groups", "replays", "definitions",
                 "imports", "module_paths", "history", "files", "run")
        return Manifest(chunks=chunks, variables=variables, groups=groups, replays=replays, definitions=definitions,
                        imports=imports, module_paths=module_paths,
                        history=history, files=files, run=run,
                        created=created if isinstance(created, (int, float)) else 0.0,
                        schema_version=d["schema_version"], extra=_extra(d, known))

    def _chunks(self, chunks: Any) -> dict[str, ChunkRef]:
        if not isinstance(chunks, dict):
            raise BundleError("manifest 'chunks' must be an object sha -> {size, stored, codec}")
        out: dict[str, ChunkRef] = {}
        for sha, meta in chunks.items():
            if not is_sha(sha):
                self.problems.append(f"chunk address {str(sha)[:80]!r} is not a lowercase sha256")
            elif not isinstance(meta, dict) or not _is_int(meta.get("size")) or not _is_int(meta.get("stored")):
                self.problems.append(f"chunk {sha} needs integer size and stored")
            elif meta.get("codec") not in CODECS:
                self.problems.append(f"chunk {sha} has unknown codec {meta.get('codec')!r}")
            elif "crc32" in meta and not (_is_int(meta["crc32"]) and meta["crc32"] < 2 ** 32):
                self.problems.append(f"chunk {sha} has an invalid crc32")
            else:
                out[sha] = ChunkRef(sha, meta["size"], meta["stored"], meta.get("codec"), crc32=meta.get("crc32"))
        return out

    def _list(self, key: str) -> list[Any]:
        v = self.data.get(key, [])
        if not isinstance(v, list):
            self.problems.append(f"'{key}' must be a list")
            return []
        return v

    def _refs(self, shas: Any, where: str) -> list[str]:
        if not isinstance(shas, list):
            self.problems.append(f"{where}: chunk list must be a list")
            return []
        for s in shas:
            if not isinstance(s, str) or s not in self.listed:
                self.problems.append(f"{where}: chunk {str(s)[:80]} is not listed in 'chunks'")
        return [s for s in shas if isinstance(s, str)]

    def _variable(self, v: Any) -> VariableEntry | None:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"].isidentifier():
            self.problems.append(f"variable entry {str(v)[:80]} needs an identifier 'name'")
            return None
        if v.get("method") not in METHODS:
            self.problems.append(f"variable {v['name']}: unknown method {v.get('method')!r}")
            return None
        size = v.get("size", 0)
        return VariableEntry(v["name"], v["method"], str(v.get("type", "?")), size if _is_int(size) else 0,
                             v.get("group"), v.get("summary"), v.get("reason"),
                             _extra(v, ("name", "type", "size", "method", "group", "summary", "reason")))

    def _group(self, g: Any) -> GroupEntry | None:
        if not isinstance(g, dict) or not isinstance(g.get("id"), str) or not isinstance(g.get("names"), list):
            self.problems.append(f"group entry {str(g)[:80]} needs 'id' and 'names'")
            return None
        gid = g["id"]
        if g.get("method") not in PICKLED:
            self.problems.append(f"group {gid}: method must be pickle5, dill or reducer")
        if not all(isinstance(n, str) and n.isidentifier() for n in g["names"]):
            self.problems.append(f"group {gid}: names must be identifiers")
        payload = self._refs(g.get("payload"), f"group {gid} payload")
        bufs = g.get("buffers", [])
        if not isinstance(bufs, list):
            self.problems.append(f"group {gid}: buffers must be a list")
            return None
        buffers = []
        for b in bufs:
            if not isinstance(b, dict) or not _is_int(b.get("size")):
                self.problems.append(f"group {gid}: buffer entries need an integer size")
                continue
            refs = self._refs(b.get("chunks"), f"group {gid} buffer")
            listed = self.listed
            if isinstance(b.get("chunks"), list) and all(  # sizes only when every chunk entry is sound
                    isinstance(s, str) and isinstance(listed.get(s), dict) and _is_int(listed[s].get("size"))
                    for s in b["chunks"]):
                if sum(listed[s]["size"] for s in b["chunks"]) != b["size"]:
                    self.problems.append(f"group {gid}: buffer size does not match its chunks")
            buffers.append(BufferEntry(b["size"], refs))
        stream = g.get("stream")
        return GroupEntry(gid, list(g["names"]), str(g.get("method")), payload, buffers,
                          stream if isinstance(stream, str) else None,
                          _extra(g, ("id", "names", "method", "payload", "buffers", "stream")))

    def _replay(self, r: Any) -> ReplayEntry | None:
        if (not isinstance(r, dict) or not isinstance(r.get("code"), str) or not isinstance(r.get("names"), list)
                or not _is_int(r.get("cell"))):
            self.problems.append(f"replay entry {str(r)[:80]} needs names, cell and code")
            return None
        return ReplayEntry(list(r["names"]), r["cell"], r["code"], _extra(r, ("names", "cell", "code")))

    def _files(self, files: list[Any]) -> list[FileEntry]:
        out: list[FileEntry] = []
        seen: set[str] = set()
        for f in files:
            if not isinstance(f, dict):
                self.problems.append("file entries must be objects")
                continue
            why = check_relpath(f.get("path"))
            if why:
                self.problems.append(f"file: {why}")
                continue
            path = f["path"]
            if path.split("/")[0] == RESERVED_DIR:
                self.problems.append(f"file {path!r} is inside {RESERVED_DIR}/, the run's own directory")
                continue
            if path in seen:
                self.problems.append(f"file {path!r} is listed twice")
            seen.add(path)
            refs = self._refs(f.get("chunks"), f"file {path!r}")
            if not _is_int(f.get("size")) or not _is_int(f.get("mode")) or not is_sha256(f.get("sha256")):
                self.problems.append(f"file {path!r} needs integer size and mode and a sha256")
                continue
            mtime = f.get("mtime_ns")
            out.append(FileEntry(path, f["size"], safe_mode(f["mode"]), f["sha256"], refs,
                                 mtime if _is_int(mtime) else None,
                                 _extra(f, ("path", "size", "mode", "sha256", "chunks", "mtime_ns"))))
        return out


def verify(dir: Path, shas: Iterable[str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> None:
    """Check the manifest and every chunk's hash; BundleError names each bad chunk and its owner."""
    dir = Path(dir)
    manifest = Manifest.read(dir)
    store = ChunkStore(dir / CHUNKS)
    owners = manifest.owners()
    todo = list(manifest.shas if shas is None else shas)
    bad: list[str] = []
    for i, sha in enumerate(todo):
        path = store.path(sha)
        try:
            h = AddressHasher(sha)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            ok = h.matches()
            why = "is corrupt (hash mismatch)"
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
