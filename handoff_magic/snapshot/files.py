"""Working-directory files: which travel (not VCS, venvs, caches, Jupyter's own state, secrets files, over the caps),
their chunks on capture, and a safe, atomic write inside the root on restore.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

from ..chunks import CHUNK_SIZE, CHUNKS, ChunkStore, worth_compressing
from ..errors import BundleError, SecretFound
from ..manifest import FileEntry, check_relpath, safe_mode

IGNORE_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".ipynb_checkpoints", ".handoff", "handoff-runs",
                         "node_modules", ".venv", "venv", ".tox", ".nox", ".mypy_cache", ".pytest_cache",
                         ".ruff_cache", ".cache", ".eggs", ".ipython", ".jupyter", ".local",
                         # credential stores: never travel even if the notebook runs in $HOME
                         ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config", ".password-store"})


# Jupyter's own server state in a working directory: jupyter-collaboration's store of every shared
# document's edit history (text typed and deleted included) and its SQLite side files
IGNORE_FILE_RE = re.compile(r"^\.jupyter_ystore\.db(-wal|-shm|-journal)?$")


SECRET_FILE_RE = re.compile(r"^(\.env(\..*)?|.*\.pem|.*\.key|.*\.p12|.*\.pfx|id_(rsa|dsa|ecdsa|ed25519)(\.pub)?|"
                            r"\.netrc|\.git-credentials|\.pypirc|\.pgpass|credentials(\.json)?|handoff\.json)$")


DEFAULT_MAX_FILE = 100 * 1024 * 1024


DEFAULT_MAX_TOTAL = 2 * 1024 * 1024 * 1024
DEFAULT_MAX_FILES = 20_000
IGNORE_FILE = ".handoffignore"


def listing(root: Path, skip_real: set[str]) -> list[tuple[str, list[str]]]:
    """(directory, file names) of what may travel: the built-in ignores, then ``.handoffignore``
    (gitignore syntax). Refuses, before anything is read or sent, a tree with more files than
    HANDOFF_MAX_FILES, naming the largest directories and how to leave them out."""
    ignore_file = root / IGNORE_FILE
    spec = None
    if ignore_file.is_file():   # pathspec is imported only when there is something to ignore
        import pathspec
        spec = pathspec.GitIgnoreSpec.from_lines(ignore_file.read_text(errors="replace").splitlines())
    root_s = str(root)
    out: list[tuple[str, list[str]]] = []
    per_dir: dict[str, int] = {}
    count = 0
    for dirpath, dirnames, filenames in os.walk(root_s, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root_s).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not _ignored_dir(os.path.join(dirpath, d), d, skip_real)
                             and not (spec is not None and spec.match_file(prefix + d + "/")))
        names = sorted(f for f in filenames if not IGNORE_FILE_RE.match(f)
                       and (spec is None or not spec.match_file(prefix + f)))
        if names:
            out.append((dirpath, names))
            count += len(names)
            top = prefix.split("/", 2)
            for depth in (1, 2):
                if len(top) > depth:
                    key = "/".join(top[:depth]) + "/"
                    per_dir[key] = per_dir.get(key, 0) + len(names)
    limit = _env_int("HANDOFF_MAX_FILES", DEFAULT_MAX_FILES)
    if count > limit:
        largest = sorted(per_dir.items(), key=lambda kv: -kv[1])[:5]
        where = ", ".join(f"{d} ({n} files)" for d, n in largest) or "the top directory"
        raise BundleError(f"the working directory {root} has {count} files to send, more than the limit of {limit}; "
                          f"the largest directories: {where}",
                          f"list what should stay behind in {ignore_file} (gitignore syntax, e.g. "
                          f"'{largest[0][0] if largest else 'data/'}'), or raise HANDOFF_MAX_FILES")
    return out


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
    for dirpath, filenames in listing(root, skip_real):
        for fn in filenames:
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


def safe_target(root: Path, rel: str) -> Path:
    why = check_relpath(rel)
    if why:
        raise BundleError(f"refusing to restore file: {why}")
    target = root / rel
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(target.parent)
    if os.path.commonpath([real_root, real_parent]) != real_root:
        raise BundleError(f"refusing to restore {rel!r}: it would land outside {root}")
    if target.is_symlink():
        raise BundleError(f"refusing to restore {rel!r}: the local path is a symlink")
    return target


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_file(store: ChunkStore, entry: FileEntry, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.handoff-tmp-{os.getpid()}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for sha in entry.chunks:
                data = store.get(sha)
                h.update(data)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != entry.sha256:
            raise BundleError(f"file {entry.path} does not match its sha256 after decoding; not written")
        os.chmod(tmp, safe_mode(entry.mode))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
