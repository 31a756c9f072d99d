"""Bundle transports with a real kernel whose working directory is NOT the server's workspace.

The kernel is driven through the runner's own ``KernelExecutor``; the bundle is captured in
another real kernel. Over the kernel's channels a 1.6 MB array travels in many small pieces,
is restored, the kernel's new files and variables come back with a checkpoint (only new chunks),
and damage on either side is caught by hash.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from handoff_magic.chunks import shard_path
from jupyter_server_ext.run.executor import KernelExecutor
from jupyter_server_ext.blobs import BlobStore
from jupyter_server_ext.errors import TransportError
from jupyter_server_ext.run.kernel_rpc import kernel_result
from jupyter_server_ext.run.transport import KernelChannelTransport, SendStopped, SharedDiskTransport, make_transport
from jupyter_server_ext.workspace import Workspace
from tests.harness.runner_helpers import capture_bundle


class LoopThread:
    """An event loop in a thread, like the server's, for the kernel manager's async calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("laptop"))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory, bundle: tuple[Path, dict[str, Any]]) -> BlobStore:
    bdir, manifest = bundle
    store = BlobStore(tmp_path_factory.mktemp("blobs"))
    for sha in manifest["chunks"]:
        store.put(sha, (shard_path(bdir / "chunks", sha)).read_bytes())
    return store


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-side")


@pytest.fixture(scope="module")
def executor(kernel_dir: Path) -> Iterator[KernelExecutor]:
    lt = LoopThread()
    # connection_dir: by default a MultiKernelManager writes kernel-<id>.json into the cwd (the repo)
    mkm = AsyncMultiKernelManager(connection_dir=str(kernel_dir.parent))
    kid = lt.run(mkm.start_kernel(kernel_name="python3", cwd=str(kernel_dir)))
    assert Path(mkm.get_kernel(kid).connection_file).parent == kernel_dir.parent
    ex = KernelExecutor(mkm, kid, lt.loop, default_timeout=120)
    try:
        yield ex
    finally:
        ex.close()
        lt.run(mkm.shutdown_all(now=True))
        lt.close()


def workspace_in(root: Path) -> Workspace:
    return Workspace(root)


def run_ok(ex: KernelExecutor, code: str) -> Any:
    res = ex.execute(code, 120, silent=True, store_history=False)
    assert res.status == "ok", res.error
    return res


def test_kernel_channels_round_trip_without_a_shared_disk(
        executor: KernelExecutor, bundle: tuple[Path, dict[str, Any]], blobs: BlobStore,
        kernel_dir: Path, tmp_path: Path) -> None:
    _, manifest = bundle
    server_root = tmp_path / "server-root"
    t = KernelChannelTransport(workspace_in(server_root), piece_bytes=64 * 1024, batch_bytes=256 * 1024)

    kb = t.send_bundle(executor, "run1", manifest, blobs)
    krun = kernel_dir / "handoff-runs" / "run1"
    assert Path(kb.root) == krun.resolve()
    assert kb.bytes_sent > 1_600_000, "the 1.6 MB array travelled (in pieces)"
    report = kernel_result(run_ok(executor, t.restore_code(kb)))
    assert {"df", "arr", "big", "notes"} <= {v["name"] for v in report["variables"]}
    assert (krun / "sales.csv").read_text().startswith("region,amount"), "files land in the kernel's dir"
    assert not (server_root / "handoff-runs" / "run1" / "sales.csv").exists(), "nothing was put on the server's disk"

    # the agent works in the kernel: a new variable and a new file
    run_ok(executor, "total = float(df['amount'].sum())\nopen('report.txt', 'w').write(f'total={total}\\n')")
    run_state = dict(manifest["run"], id="run1")
    ck = t.fetch_checkpoint(executor, "run1", run_state, blobs)
    names = {v["name"] for v in ck.manifest["variables"]}
    assert {"total", "df", "big"} <= names
    assert {"report.txt", "sales.csv"} <= {f["path"] for f in ck.manifest["files"]}
    assert blobs.missing(list(ck.manifest["chunks"])) == [], "every checkpoint chunk is in the BlobStore"
    assert 0 < ck.bytes_new < 200_000 < ck.bytes_total, "only new chunks came back"
    ws = server_root / "handoff-runs" / "run1"
    assert (ws / "report.txt").read_text() == "total=42.0\n", "files are mirrored next to result.ipynb"
    assert "report.txt" in ck.files_mirrored

    again = t.fetch_checkpoint(executor, "run1", run_state, blobs)
    assert again.bytes_new == 0 and again.files_mirrored == []

    # a fresh kernel for the same run (crash recovery) only needs the manifest: chunks are there
    kb2 = t.send_bundle(executor, "run1", ck.manifest, blobs)
    assert kb2.bytes_sent < 100_000


def test_transfer_data_inside_the_code_still_works(
        executor: KernelExecutor, bundle: tuple[Path, dict[str, Any]], blobs: BlobStore, tmp_path: Path) -> None:
    """For kernels or gateways that drop extra execute_request content: slower, same result."""
    _, manifest = bundle
    t = KernelChannelTransport(workspace_in(tmp_path / "srv"), bulk_in_content=False)
    kb = t.send_bundle(executor, "run-literal", manifest, blobs)
    report = kernel_result(run_ok(executor, t.restore_code(kb)))
    assert {"df", "big"} <= {v["name"] for v in report["variables"]}
    assert t.bulk_in_content is False


def test_damaged_chunks_are_caught_on_both_sides(
        executor: KernelExecutor, bundle: tuple[Path, dict[str, Any]], blobs: BlobStore,
        kernel_dir: Path, tmp_path: Path) -> None:
    _, manifest = bundle
    t = KernelChannelTransport(workspace_in(tmp_path / "srv"))
    kb = t.send_bundle(executor, "run2", manifest, blobs)
    run_ok(executor, t.restore_code(kb))
    run_ok(executor, "fresh = list(range(50_000))")

    # the kernel's disk rots a chunk the server has not seen yet: the server refuses it
    fresh_blobs = BlobStore(tmp_path / "other-blobs")
    ckdir = Path(kb.root) / ".handoff" / "ckpt" / "chunks"
    csv_sha = next(f for f in manifest["files"] if f["path"] == "sales.csv")["chunks"][0]
    victim = shard_path(ckdir, csv_sha)   # unchanged, so the checkpoint reuses this chunk
    victim.write_bytes(b"bit rot" + victim.read_bytes()[7:])
    with pytest.raises(TransportError) as err:
        t.fetch_checkpoint(executor, "run2", dict(manifest["run"], id="run2"), fresh_blobs)
    assert victim.name in err.value.message and "damaged" in err.value.message

    # a chunk damaged on the server is refused before anything is sent
    bad = BlobStore(tmp_path / "bad-blobs")
    for sha in manifest["chunks"]:
        bad.put(sha, blobs.read(sha))
    first = next(iter(manifest["chunks"]))
    bad.path(first).write_bytes(b"x" * bad.path(first).stat().st_size)
    with pytest.raises(TransportError, match="damaged on this server"):
        t.send_bundle(executor, "run3", manifest, bad)


def test_shared_disk_transport_copies_and_ingests(
        executor: KernelExecutor, bundle: tuple[Path, dict[str, Any]], blobs: BlobStore,
        kernel_dir: Path) -> None:
    _, manifest = bundle
    # the kernel's cwd is the workspace root here: it shares the disk with the "server"
    t = SharedDiskTransport(workspace_in(kernel_dir))
    kb = t.send_bundle(executor, "run4", manifest, blobs)
    ws = kernel_dir / "handoff-runs" / "run4"
    assert kb.root == str(ws) and kb.bytes_sent == 0
    sha = next(iter(manifest["chunks"]))
    given = shard_path(ws / ".handoff" / "ckpt" / "chunks", sha)
    # the kernel's own copy: writing it (a kernel may write anything in its workspace) cannot
    # reach the stored chunk that other runs share
    assert given.read_bytes() == blobs.path(sha).read_bytes()
    assert given.stat().st_ino != blobs.path(sha).stat().st_ino
    run_ok(executor, t.restore_code(kb))
    run_ok(executor, "shared_total = 7")
    ck = t.fetch_checkpoint(executor, "run4", dict(manifest["run"], id="run4"), blobs)
    assert "shared_total" in {v["name"] for v in ck.manifest["variables"]}
    assert blobs.missing(list(ck.manifest["chunks"])) == []


def test_make_transport_picks_by_kernel_manager_and_trait(tmp_path: Path) -> None:
    mkm = AsyncMultiKernelManager()
    ws = workspace_in(tmp_path)
    assert isinstance(make_transport("auto", mkm, ws), SharedDiskTransport)
    assert isinstance(make_transport("kernel", mkm, ws), KernelChannelTransport)
    assert isinstance(make_transport("", mkm, ws), SharedDiskTransport)
    from jupyter_server.gateway.managers import GatewayMappingKernelManager
    gw = GatewayMappingKernelManager.__new__(GatewayMappingKernelManager)  # no gateway needed to pick
    assert isinstance(make_transport("auto", gw, ws), KernelChannelTransport)
    assert isinstance(make_transport("shared", gw, ws), SharedDiskTransport)
    with pytest.raises(ValueError, match="c.HandoffApp.transport"):
        make_transport("nfs", mkm, ws)


@pytest.mark.parametrize("kind", ["shared", "channels"])
def test_a_bundle_send_that_is_told_to_stop_sends_no_more_chunks(
        kind: str, executor: KernelExecutor, bundle: tuple[Path, dict[str, Any]], blobs: BlobStore,
        kernel_dir: Path, tmp_path: Path) -> None:
    """A run cancelled or pulled while its bundle goes into its kernel: the send stops between
    chunks (a 1 GB bundle's copy went on for seconds after a cancel) and says why."""
    _, manifest = bundle
    run_id = f"run-stop-{kind}"
    t = SharedDiskTransport(workspace_in(kernel_dir)) if kind == "shared" else \
        KernelChannelTransport(workspace_in(tmp_path / "server-root"))
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True
    with pytest.raises(SendStopped) as err:
        t.send_bundle(executor, run_id, manifest, blobs, stop=stop)
    assert asked and "cancelled or pulled" in err.value.message

    def sent() -> list[Path]:   # wherever the (shared) kernel's cwd puts this run's workspace
        return [p for p in kernel_dir.rglob("*") if p.is_file() and run_id in p.parts and "chunks" in p.parts]
    assert sent() == [], "no chunk was sent once told to stop"

    # a stop that stays false changes nothing: every chunk is sent
    t.send_bundle(executor, run_id, manifest, blobs, stop=lambda: False)
    assert len(sent()) == len(manifest["chunks"])
