"""How a run's bundle reaches its kernel, and how checkpoints come back.

Two ways, one interface (``BundleTransport``):

* ``SharedDiskTransport`` (the fast case): the kernel runs on this server's machine. A
  sandboxed kernel gets its chunks as hard links in its bundle view, which it sees read-only
  (``sandbox.BUNDLE_MOUNT``): nothing is copied, and its checkpoints in
  ``<workspace>/.handoff/ckpt`` hold only chunks the view lacks. An unsandboxed kernel, which
  could write anything it is shown, gets copies in ``<workspace>/.handoff/ckpt``.
* ``KernelChannelTransport``: the kernel lives elsewhere (Jupyter Enterprise Gateway / Kernel
  Gateway on Kubernetes, YARN, Docker...) and shares no disk with the server. Chunks travel as
  base64 pieces inside small execute requests over the kernel's own channels, are hash-checked
  by the kernel before they are renamed into place, and checkpoint chunks come back as the
  results of kernel calls (``kernel_rpc``), verified again here by the BlobStore.

``make_transport`` picks channels when the server's kernels come from a gateway, else the shared
disk; ``c.HandoffApp.transport = "shared" | "kernel"`` forces one.

The server never unpickles: it moves stored chunk bytes and reads JSON manifests.

Over 400 lines on purpose: the two transports implement one interface over the same kernel-side
bodies (``_OPEN``/``_PUT``/``_GET``/``_SAVE``); split apart, the protocol would be in two places.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from handoff_magic.atomic import atomic_write_bytes, copy_file, link_or_copy
from handoff_magic.chunks import CHUNKS, address_matches, chunk_relpath
from handoff_magic.errors import BundleError, ConfigError
from handoff_magic.manifest import Manifest, check_relpath, safe_mode

from ..errors import BlobError, TransportError
from ..workspace import CKPT_DIR, PRIVATE_DIR, RUN_JSON, RUNS_DIR, SERVER_FILES, Workspace
from .kernel_rpc import ARGS_KEY, check, kernel_call, kernel_call_bulk, kernel_result
from .sandbox import BUNDLE_MOUNT, bundle_view_dir

log = logging.getLogger(__name__)

PIECE_BYTES = 2 * 1024 * 1024      # raw bytes per piece (a chunk is up to 4 MiB)
BATCH_BYTES = 4 * 1024 * 1024      # raw bytes per request: 5.6 MB of base64, under the 10 MiB
                                   # websocket message limit of tornado-based gateways
CALL_TIMEOUT = 600.0               # one transfer request; a slow gateway is slow, not dead
MODES = ("auto", "shared", "kernel")
MAX_MANIFEST_BYTES = 256 * 1024 * 1024   # a manifest is JSON: history and file lists, never data
COPIERS = 2                        # chunk copies into a kernel's workspace at once (in-OS memcpy,
                                   # CPU-bound: one per core of this 2-core reference machine)


class Executor(Protocol):
    """What a transport needs from the run's kernel (``KernelExecutor`` has it)."""

    def execute(self, code: str, timeout: float | None = None, *, silent: bool = False,
                store_history: bool = True, extra_content: dict[str, Any] | None = None) -> Any: ...


class Blobs(Protocol):
    def has(self, sha: str) -> bool: ...
    def missing(self, shas: Any) -> list[str]: ...
    def path(self, sha: str) -> Path: ...
    def put(self, sha: str, data: bytes) -> bool: ...
    def read(self, sha: str) -> bytes: ...


@dataclass
class KernelBundle:
    """Where the kernel finds the materialised bundle and its working directory (kernel paths)."""
    bundle_dir: str
    root: str
    bytes_sent: int = 0
    verified: bool = False   # read-only links to the server's hash-checked chunks: no re-hash


@dataclass
class Checkpoint:
    manifest: dict[str, Any]
    bytes_new: int
    bytes_total: int
    files_mirrored: list[str] = field(default_factory=list)


def _stored_total(manifest: dict[str, Any]) -> int:
    return sum(int(m.get("stored", 0)) for m in (manifest.get("chunks") or {}).values())


def drop_server_files(manifest: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Keep what the server itself writes into the workspace (``result.ipynb``) out of a
    checkpoint: pulling back must not drop the server's report into the user's folder, nor a
    diff list it. A file of that name the user handed off keeps its handoff entry."""
    files = manifest.get("files")
    if not isinstance(files, list) or not any(isinstance(f, dict) and f.get("path") in SERVER_FILES
                                              for f in files):
        return manifest
    base_files = {f.get("path"): f for f in (base or {}).get("files") or [] if isinstance(f, dict)}
    base_chunks = (base or {}).get("chunks") or {}
    chunks = dict(manifest.get("chunks") or {})
    kept: list[Any] = []
    for f in files:
        if isinstance(f, dict) and f.get("path") in SERVER_FILES:
            orig = base_files.get(f["path"])
            if orig is None or not all(c in base_chunks for c in orig.get("chunks") or []):
                continue
            kept.append(orig)
            chunks.update({c: base_chunks[c] for c in orig.get("chunks") or []})
        else:
            kept.append(f)
    out = dict(manifest, files=kept)
    out["chunks"] = chunks
    used = set(Manifest.parse(out).shas)  # raises on a broken manifest, as the caller's check would
    out["chunks"] = {sha: meta for sha, meta in chunks.items() if sha in used}
    return out


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise SendStopped("the run was cancelled or pulled while its bundle was sent to its kernel",
                          "nothing to do: the run ends from its last stored checkpoint")


class SendStopped(TransportError):
    """``send_bundle`` gave up because its ``stop`` said so (the run was cancelled or pulled
    while its bundle was on its way into the kernel): the kernel is not to be used."""


Stop = Callable[[], bool]


class BundleTransport(ABC):
    """Moves a run's bundle into its kernel and the kernel's checkpoints back into the BlobStore."""

    name: str = ""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def attach(self, run_id: str, kernel_root: str | None) -> None:  # noqa: B027 - only one transport needs it
        """Where the run's current kernel sees its workspace (None: the kernel is gone). The
        channels transport asks the kernel itself; the shared disk one needs it for an adopted
        sandboxed spare, which sees its workspace at the path it was booted on."""

    @abstractmethod
    def send_bundle(self, executor: Executor, run_id: str, manifest: dict[str, Any],
                    blobs: Blobs, *, stop: Stop | None = None) -> KernelBundle:
        """Make every chunk of ``manifest`` and the manifest itself readable by the kernel.
        ``stop`` is asked between chunks; once it is true no more are sent and ``SendStopped``
        is raised (a cancelled run does not go on copying a bundle nobody will restore)."""

    @abstractmethod
    def fetch_checkpoint(self, executor: Executor, run_id: str, run_state: dict[str, Any],
                         blobs: Blobs, *, max_bytes: int | None = None,
                         base: dict[str, Any] | None = None) -> Checkpoint:
        """``save_state`` inside the kernel (only new chunks are written), then bring the
        manifest and the chunks ``blobs`` lacks back here, verified by hash. Files the server
        writes itself are left out (``drop_server_files``; ``base`` is the handoff manifest)."""

    # shared by both: the restore call, with kernel-side paths
    @staticmethod
    def restore_code(kb: KernelBundle) -> str:
        return kernel_call(
            "import json, os, handoff_magic\n"
            "os.chdir(a['root'])\n"
            "r = handoff_magic.load_state(a['bundle_dir'], root=a['root']"
            # only said when needed: a gateway's kernel may run an older handoff_magic
            + (", verify=False" if kb.verified else "") + ")\n"
            "return json.loads(json.dumps(r.to_dict(), default=str))",
            {"bundle_dir": kb.bundle_dir, "root": kb.root})


# ---------------------------------------------------------------------------------------------
# kernel-side bodies (run through kernel_rpc: ``a`` is the call's argument)
# ---------------------------------------------------------------------------------------------
_OPEN = """
import os
run_id = a['run_id']
cwd = os.getcwd()
if os.path.basename(cwd) == run_id and os.path.basename(os.path.dirname(cwd)) == a['runs_dir']:
    root = cwd
else:
    root = os.path.join(cwd, a['runs_dir'], run_id)
chunks = os.path.join(root, a['ckpt'], 'chunks')
os.makedirs(chunks, exist_ok=True)
os.chdir(root)  # the agent's relative paths land in the run directory
have = {}
for sub in os.listdir(chunks):
    d = os.path.join(chunks, sub)
    if len(sub) == 2 and os.path.isdir(d):
        for name in os.listdir(d):
            if len(name) in (64, 71):  # sha256 hex, or blake3-<hex>
                have[name] = os.path.getsize(os.path.join(d, name))
return {'root': os.path.abspath(root), 'have': have}
"""

# kernel side: resolve a path of the run directory, refusing anything outside it (also via links)
_INSIDE = """
import os
root = os.path.realpath(a['root'])
def inside(rel, verb):
    path = os.path.realpath(os.path.join(root, rel))
    if not path.startswith(root + os.sep):
        raise ValueError('refusing to %s outside the run directory: %r' % (verb, rel))
    return path
"""

_PUT = _INSIDE + """
import base64
from handoff_magic.chunks import AddressHasher
done = []
for it in a['items']:
    path = inside(it['path'], 'write')
    part = path + '.part'
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(part, 'r+b' if it['offset'] else 'wb') as f:
        f.seek(it['offset'])
        f.write(base64.b64decode(it['data']))
    if it['final']:
        with open(part, 'rb') as f:
            got = f.read()
        h = AddressHasher(it['sha'])
        h.update(got)
        if len(got) != it['size'] or not h.matches():
            os.unlink(part)
            raise ValueError('%s arrived damaged in the kernel (%d bytes, hash %s)'
                             % (it['path'], len(got), h.digest()))
        with open(part, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(part, path)
        done.append(it['path'])
return {'done': done}
"""

_GET = _INSIDE + """
import base64
out = []
for it in a['items']:
    path = inside(it['path'], 'read')
    with open(path, 'rb') as f:
        f.seek(it['offset'])
        out.append(base64.b64encode(f.read(it['length'])).decode('ascii'))
return {'data': out}
"""

def _save_args(root: str, base: str = "") -> dict[str, str]:
    return {"root": root, "ckpt": CKPT_DIR, "run_json": RUN_JSON, "base": base}


_SAVE = """
import hashlib, json, os, handoff_magic
from handoff_magic.state import RunState
root = a['root']
with open(os.path.join(root, a['run_json']), encoding='utf-8') as f:
    run = RunState.from_json(f.read())
ckpt = os.path.join(root, a['ckpt'])
r = handoff_magic.save_state(ckpt, run=run, root=root, base=a.get('base') or None)
with open(os.path.join(ckpt, 'manifest.json'), 'rb') as f:
    raw = f.read()
return {'bytes_new': r.bytes_new, 'bytes_total': r.bytes_total, 'manifest_size': len(raw),
        'manifest_sha': hashlib.sha256(raw).hexdigest()}
"""


# ---------------------------------------------------------------------------------------------
# shared disk
# ---------------------------------------------------------------------------------------------
class SharedDiskTransport(BundleTransport):
    """Kernel and server share ``<root_dir>/handoff-runs/<id>``.

    With ``views`` (sandboxed kernels), a kernel's bundle view ``<views>/<workspace name>``,
    made empty by the sandbox provisioner and shown read-only inside the sandbox, receives hard
    links to the stored chunks: the restore maps the pages the upload wrote (no copy of 1 GB,
    no second GB of page cache), and the blob store's inodes stay unwritable (EROFS) for the
    run. Without a view (unsandboxed kernels, or a view on another file system: then copies
    land in the view), the kernel gets copies of its own in its workspace (an in-OS copy,
    ~0.5 s per GB): there a link would hand the run the blob store's inode to rewrite."""

    name = "shared"

    def __init__(self, workspace: Workspace, views: Path | None = None) -> None:
        super().__init__(workspace)
        self.views = views
        self._roots: dict[str, str] = {}   # run id -> its workspace as its current kernel sees it

    def attach(self, run_id: str, kernel_root: str | None) -> None:
        if kernel_root is None:
            self._roots.pop(run_id, None)
        else:
            self._roots[run_id] = kernel_root

    def _kernel_root(self, run_id: str) -> str:
        return self._roots.get(run_id) or str(self.workspace.run_dir(run_id))

    def _view(self, run_id: str) -> Path | None:
        """The run's current kernel's bundle view, if that kernel has one (its provisioner made it)."""
        if self.views is None:
            return None
        view = bundle_view_dir(self.views, self._kernel_root(run_id))
        return view if view.is_dir() else None

    def send_bundle(self, executor: Executor, run_id: str, manifest: dict[str, Any],
                    blobs: Blobs, *, stop: Stop | None = None) -> KernelBundle:
        shas = Manifest.parse(manifest).shas
        root = self._kernel_root(run_id)
        view = self._view(run_id)
        if view is not None:
            _link_view(view, shas, blobs, stop)
            atomic_write_bytes(view / "manifest.json", json.dumps(manifest).encode("utf-8"))
            # the store checked every chunk's hash on upload, and the kernel cannot write them
            return KernelBundle(bundle_dir=BUNDLE_MOUNT, root=root, verified=True)
        ckpt = self.workspace.ckpt_dir(run_id)

        def copy(sha: str) -> None:
            _check_stop(stop)
            copy_file(blobs.path(sha), ckpt / chunk_relpath(sha))

        with ThreadPoolExecutor(COPIERS, thread_name_prefix="handoff-copy") as pool:
            list(pool.map(copy, shas))
        atomic_write_bytes(ckpt / "manifest.json", json.dumps(manifest).encode("utf-8"))
        return KernelBundle(bundle_dir=f"{root}/{CKPT_DIR}", root=root)

    def fetch_checkpoint(self, executor: Executor, run_id: str, run_state: dict[str, Any],
                         blobs: Blobs, *, max_bytes: int | None = None,
                         base: dict[str, Any] | None = None) -> Checkpoint:
        ckpt = self.workspace.ckpt_dir(run_id)
        view = self._view(run_id)
        based = view is not None and (view / "manifest.json").is_file()
        atomic_write_bytes(self.workspace.run_json(run_id), json.dumps(run_state).encode("utf-8"))
        args = _save_args(self._kernel_root(run_id), BUNDLE_MOUNT if based else "")
        res = executor.execute(kernel_call(_SAVE, args), CALL_TIMEOUT, silent=True, store_history=False)
        check(res, "saving a checkpoint")
        try:
            manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
            manifest = drop_server_files(manifest, base)
            shas = Manifest.parse(manifest, max_bytes=max_bytes).shas
        except (OSError, ValueError, BundleError) as exc:
            raise TransportError(f"checkpoint manifest unreadable: {exc}",
                                 "the run goes on; a crash now would resume from the previous checkpoint") from exc
        new_bytes = 0
        for sha in blobs.missing(shas):
            own = ckpt / chunk_relpath(sha)
            if view is not None and not own.is_file() and (view / chunk_relpath(sha)).is_file():
                own = view / chunk_relpath(sha)   # referenced from the view; gone from the store since
            raw = own.read_bytes()
            blobs.put(sha, raw)  # verifies the hash: nothing is decoded, nothing unpickled
            new_bytes += len(raw)
        return Checkpoint(manifest, new_bytes, _stored_total(manifest))


def _link_view(view: Path, shas: list[str], blobs: Blobs, stop: Stop | None = None) -> None:
    """Make ``view`` hold exactly the chunks ``shas`` (hard links to the stored ones, copies
    where the file system refuses a link); links of an earlier bundle go. The directory itself
    stays: a sandbox has it mounted."""
    want = {chunk_relpath(sha) for sha in shas}
    for sha in shas:
        _check_stop(stop)
        link_or_copy(blobs.path(sha), view / chunk_relpath(sha))
    for old in (view / CHUNKS).glob("*/*"):
        if f"{CHUNKS}/{old.parent.name}/{old.name}" not in want:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# kernel channels (gateways)
# ---------------------------------------------------------------------------------------------
class KernelChannelTransport(BundleTransport):
    """The kernel shares no disk with the server: everything travels over its channels.

    Kernel side, the run lives in ``<kernel cwd>/handoff-runs/<id>`` (the same layout as the
    server's workspace). Files the agent writes come back with every checkpoint and are mirrored
    into the server's workspace, so ``result.ipynb`` and the files sit side by side in Lab.
    """

    name = "kernel"

    def __init__(self, workspace: Workspace, *, piece_bytes: int = PIECE_BYTES,
                 batch_bytes: int = BATCH_BYTES, mirror_files: bool = True,
                 bulk_in_content: bool = True) -> None:
        super().__init__(workspace)
        self.bulk_in_content = bulk_in_content  # args in the request's content, not in the code
        self.piece_bytes = max(1024, int(piece_bytes))
        self.batch_bytes = max(self.piece_bytes, int(batch_bytes))
        self.mirror_files = mirror_files
        self._roots: dict[str, str] = {}   # run id -> kernel-side root of its current kernel

    def _call(self, executor: Executor, body: str, args: dict[str, Any], what: str) -> Any:
        if self.bulk_in_content:
            try:
                res = executor.execute(kernel_call_bulk(body), CALL_TIMEOUT, silent=True, store_history=False,
                                       extra_content={ARGS_KEY: args})
            except TypeError:  # an executor without extra_content: literals in the code still work
                res = None
            if res is not None and (res.error or {}).get("ename") != "KeyError":
                check(res, what)
                return kernel_result(res)
            log.warning("jupyter-handoff: the kernel did not see extra execute_request content; "
                        "sending transfer data inside the code instead (slower)")
            self.bulk_in_content = False
        res = executor.execute(kernel_call(body, args), CALL_TIMEOUT, silent=True, store_history=False)
        check(res, what)
        return kernel_result(res)

    def _open(self, executor: Executor, run_id: str) -> tuple[str, dict[str, int]]:
        got = self._call(executor, _OPEN, {"run_id": run_id, "runs_dir": RUNS_DIR, "ckpt": CKPT_DIR},
                         "preparing the run directory")
        self._roots[run_id] = got["root"]
        return str(got["root"]), {k: int(v) for k, v in got["have"].items()}

    def _root(self, executor: Executor, run_id: str) -> str:
        root = self._roots.get(run_id)
        if root is None:
            root = self._open(executor, run_id)[0]
        return root

    def _put_files(self, executor: Executor, root: str,
                   files: list[tuple[str, str, int, Callable[[], bytes]]], *, stop: Stop | None = None) -> int:
        """Send ``(relpath, sha256, size, read)`` files in pieces; returns bytes sent. ``stop``
        is asked before each file is read (``SendStopped`` once it is true)."""
        batch: list[dict[str, Any]] = []
        batch_size = 0
        sent = 0

        def flush() -> None:
            nonlocal batch, batch_size
            if batch:
                self._call(executor, _PUT, {"root": root, "items": batch}, "receiving bundle chunks")
            batch, batch_size = [], 0

        for rel, sha, size, read in files:
            _check_stop(stop)
            data = read()
            if len(data) != size or not address_matches(sha, data):
                raise TransportError(f"{rel} is damaged on this server (hash mismatch)",
                                     "hand the run off again to re-upload it")
            offset = 0
            while True:
                piece = data[offset:offset + self.piece_bytes]
                if batch and batch_size + len(piece) > self.batch_bytes:
                    flush()
                final = offset + len(piece) >= size
                batch.append({"path": rel, "offset": offset, "final": final, "sha": sha, "size": size,
                              "data": base64.b64encode(piece).decode("ascii")})
                batch_size += len(piece)
                sent += len(piece)
                offset += len(piece)
                if final:
                    break
        flush()
        return sent

    def _get_bytes(self, executor: Executor, root: str, wanted: list[tuple[str, int]]) -> dict[str, bytes]:
        """Read ``(relpath, size)`` files from the kernel in pieces and batches."""
        parts: dict[str, list[bytes]] = {rel: [] for rel, _ in wanted}
        items: list[dict[str, Any]] = []
        for rel, size in wanted:
            offset = 0
            while offset < size or (size == 0 and offset == 0):
                n = min(self.piece_bytes, size - offset)
                items.append({"path": rel, "offset": offset, "length": n})
                offset += max(n, 1)
        batch: list[dict[str, Any]] = []
        batch_size = 0
        for it in items + [None]:
            if batch and (it is None or batch_size + it["length"] > self.batch_bytes):
                got = self._call(executor, _GET, {"root": root, "items": batch}, "sending checkpoint chunks")
                data = got.get("data") if isinstance(got, dict) else None
                if not isinstance(data, list) or len(data) != len(batch):
                    raise TransportError("the kernel answered a checkpoint read with the wrong number of pieces",
                                         "the run goes on; the next checkpoint tries again")
                for req, b64 in zip(batch, data):
                    piece = base64.b64decode(b64)
                    if len(piece) != req["length"]:  # the kernel runs the agent's code: trust no size it sends
                        raise TransportError(f"{req['path']}: the kernel sent {len(piece)} bytes where "
                                             f"{req['length']} were asked",
                                             "the run goes on; the next checkpoint tries again")
                    parts[req["path"]].append(piece)
                batch, batch_size = [], 0
            if it is not None:
                batch.append(it)
                batch_size += it["length"]
        return {rel: b"".join(p) for rel, p in parts.items()}

    def send_bundle(self, executor: Executor, run_id: str, manifest: dict[str, Any],
                    blobs: Blobs, *, stop: Stop | None = None) -> KernelBundle:
        shas = Manifest.parse(manifest).shas
        root, have = self._open(executor, run_id)
        sizes = {sha: int((manifest.get("chunks") or {}).get(sha, {}).get("stored", -1)) for sha in shas}
        todo = [sha for sha in shas if have.get(sha) != sizes[sha]]
        files: list[tuple[str, str, int, Callable[[], bytes]]] = [
            (f"{CKPT_DIR}/{chunk_relpath(sha)}", sha, blobs.path(sha).stat().st_size,
             functools.partial(blobs.read, sha)) for sha in todo]
        raw = json.dumps(manifest).encode("utf-8")
        files.append((f"{CKPT_DIR}/manifest.json", hashlib.sha256(raw).hexdigest(), len(raw), lambda: raw))
        sent = self._put_files(executor, root, files, stop=stop)
        log.info("jupyter-handoff: run %s: sent %d of %d chunk(s), %d bytes, over the kernel's channels",
                 run_id, len(todo), len(shas), sent)
        return KernelBundle(bundle_dir=f"{root}/{CKPT_DIR}", root=root, bytes_sent=sent)

    def fetch_checkpoint(self, executor: Executor, run_id: str, run_state: dict[str, Any],
                         blobs: Blobs, *, max_bytes: int | None = None,
                         base: dict[str, Any] | None = None) -> Checkpoint:
        root = self._root(executor, run_id)
        raw = json.dumps(run_state).encode("utf-8")
        self._put_files(executor, root, [(RUN_JSON, hashlib.sha256(raw).hexdigest(), len(raw),
                                          lambda: raw)])
        saved = self._call(executor, _SAVE, _save_args(root), "saving a checkpoint")
        if not 0 < int(saved.get("manifest_size", 0)) <= MAX_MANIFEST_BYTES:
            raise TransportError(f"the kernel reports a checkpoint manifest of {saved.get('manifest_size')} bytes "
                                 f"(limit {MAX_MANIFEST_BYTES})", "the run goes on; a crash now would resume "
                                 "from the previous checkpoint")
        mraw = self._get_bytes(executor, root, [(f"{CKPT_DIR}/manifest.json", int(saved["manifest_size"]))])
        mbytes = mraw[f"{CKPT_DIR}/manifest.json"]
        if hashlib.sha256(mbytes).hexdigest() != saved["manifest_sha"]:
            raise TransportError("the checkpoint manifest arrived damaged", "the run goes on; the next step retries")
        try:
            manifest = drop_server_files(json.loads(mbytes.decode("utf-8")), base)
            shas = Manifest.parse(manifest, max_bytes=max_bytes).shas
        except (ValueError, BundleError) as exc:
            raise TransportError(f"checkpoint manifest unreadable: {exc}",
                                 "the run goes on; a crash now would resume from the previous checkpoint") from exc
        missing = blobs.missing(shas)
        chunks = manifest.get("chunks") or {}
        got = self._get_bytes(executor, root, [(f"{CKPT_DIR}/{chunk_relpath(s)}", int(chunks[s]["stored"]))
                                               for s in missing])
        new_bytes = 0
        for sha in missing:
            data = got[f"{CKPT_DIR}/{chunk_relpath(sha)}"]
            try:
                blobs.put(sha, data)  # verifies the sha256
            except BlobError as exc:
                raise TransportError(f"checkpoint chunk {sha} arrived damaged from the kernel: {exc}",
                                     "the run goes on; the next checkpoint sends it again") from exc
            new_bytes += len(data)
        mirrored = self._mirror(run_id, manifest, blobs) if self.mirror_files else []
        return Checkpoint(manifest, new_bytes, _stored_total(manifest), mirrored)

    def _mirror(self, run_id: str, manifest: dict[str, Any], blobs: Blobs) -> list[str]:
        """Write the checkpoint's working files into the server's workspace (decompressing
        chunks; nothing is unpickled), so Lab shows them next to result.ipynb."""
        import zstandard
        ws = self.workspace.run_dir(run_id).resolve()
        chunks = manifest.get("chunks") or {}
        written: list[str] = []
        for f in manifest.get("files") or []:
            rel = f.get("path")
            if rel in SERVER_FILES:
                continue  # the server's own (result.ipynb) is never overwritten by a checkpoint's
            if check_relpath(rel) is not None or str(rel).split("/")[0] == PRIVATE_DIR:
                log.warning("jupyter-handoff: run %s: not mirroring unsafe path %r", run_id, rel)
                continue
            dest = (ws / rel).resolve()
            if ws not in dest.parents:
                continue
            want = f.get("sha256")
            if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == want:
                continue
            parts = []
            for sha in f.get("chunks") or []:
                stored = blobs.read(sha)
                meta = chunks.get(sha) or {}
                if meta.get("codec") == "zstd":
                    stored = zstandard.ZstdDecompressor().decompress(
                        stored, max_output_size=int(meta.get("size", 0)) or 0)
                parts.append(stored)
            data = b"".join(parts)
            if hashlib.sha256(data).hexdigest() != want:
                log.warning("jupyter-handoff: run %s: %s does not match its hash; not mirrored", run_id, rel)
                continue
            atomic_write_bytes(dest, data)
            try:
                os.chmod(dest, safe_mode(int(f.get("mode", 0o644))))
            except OSError:
                pass
            written.append(str(rel))
        return written

    def forget(self, run_id: str) -> None:
        """Drop what is remembered about a run's kernel (the run ended)."""
        self._roots.pop(run_id, None)


def make_transport(mode: str, kernel_manager: Any, workspace: Workspace,
                   views: Path | None = None) -> BundleTransport:
    """``c.HandoffApp.transport``: ``auto`` (channels when kernels come from a gateway), ``shared``
    or ``kernel``. ``views``: where sandboxed kernels' bundle views are (the shared disk's)."""
    from .gateway import is_gateway_kernel_manager
    mode = (mode or "auto").lower()
    if mode not in MODES:
        raise ConfigError(f"c.HandoffApp.transport is {mode!r}", f"use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "kernel" if is_gateway_kernel_manager(kernel_manager) else "shared"
    return KernelChannelTransport(workspace) if mode == "kernel" else SharedDiskTransport(workspace, views)
