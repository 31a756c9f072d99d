"""Pull back's download, as a user sees it: ``%pull`` in a fresh kernel against a real server.

One run is handed off from a real kernel with a 16 MB array (four 4 MiB chunks) and waits for
input; each test pulls it into a new kernel that already has variables of its own:
- the chunks arrive verified, the array is equal and writable, the progress bar is on bytes;
- a connection cut mid-chunk (a real TCP proxy dropping the socket) is retried: the pull succeeds;
- a server that keeps cutting gets a clear "kept failing" error and the kernel is untouched;
- a chunk corrupted on the server's disk is refused by its hash and the kernel is untouched.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff_magic.chunks import shard_path
from tests.harness.cutting_proxy import CuttingProxy
from tests.harness.kernels import Kernel, kernel_env
from tests.harness.runner_helpers import wait_status
from tests.harness.server_process import JupyterServerProcess

N = 2_000_000            # float64: 16 MB, four chunks (random: zstd does not shrink them)
MINE = "big = 'mine'; note = 'kept'"   # what the pulling kernel holds before the pull


@pytest.fixture(scope="module")
def server() -> Iterator[JupyterServerProcess]:
    srv = JupyterServerProcess().start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def handed_off(server: JupyterServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A run waiting for input whose state holds ``big`` (16 MB) and ``small``; the laptop
    kernel that handed it off is gone."""
    tmp = tmp_path_factory.mktemp("laptop")
    script = tmp / "ask.json"
    script.write_text(json.dumps([{"text": "", "tool_calls": [
        {"name": "ask_user", "arguments": {"question": "pull me back?"}}]}]))
    k = Kernel(tmp, kernel_env(HANDOFF_SERVER_URL=server.url, HANDOFF_TOKEN=server.token))
    try:
        k.ok(f"import numpy as np\nbig = np.random.default_rng(7).random({N})\nsmall = {{'k': 1}}")
        total = k.ok("print(repr(float(big.sum())))")["stdout"].strip()
        k.ok("%load_ext handoff_magic")
        k.ok(f"%agent --model scripted:{script} wait for me")
        k.ok("%handoff")
    finally:
        k.stop()
    run_id = server.client.get("/handoff/api/runs").json()["runs"][0]["id"]
    wait_status(server, run_id, ("waiting_input",))
    manifest = server.client.get(f"/handoff/api/runs/{run_id}/bundle").json()
    manifest = manifest.get("manifest", manifest)
    big = next(g for g in manifest["groups"] if "big" in g["names"])
    chunks = [c for b in big["buffers"] for c in b["chunks"]]
    assert all(manifest["chunks"][c].get("codec") is None for c in chunks), "stored as they are"
    yield {"run_id": run_id, "big_chunks": chunks, "sum": total}


def pulling_kernel(tmp: Path, url: str, token: str) -> Kernel:
    k = Kernel(tmp, kernel_env(HANDOFF_SERVER_URL=url, HANDOFF_TOKEN=token))
    k.ok("%load_ext handoff_magic")
    k.ok(MINE)
    return k


def untouched(k: Kernel) -> None:
    """Nothing of the run reached the namespace: the kernel's own values, no ``small``."""
    out = k.ok("print(repr(big), note, 'small' in dir())")["stdout"]
    assert out.strip() == "'mine' kept False", out


def test_pull_restores_the_array_verified_with_progress_on_bytes(
        server: JupyterServerProcess, handed_off: dict, tmp_path: Path) -> None:
    k = pulling_kernel(tmp_path, server.url, server.token)
    try:
        # what the progress bar of the view showing the pull gets: bytes done of bytes total
        k.ok("from handoff_magic.local.widget import RunWidget\nfrom handoff_magic.remote.journey import pull\n"
             "from handoff_magic.state import RunState\n_seen = []\n"
             "class View(RunWidget):\n    def set_progress(self, label, done, total):\n"
             "        _seen.append((label, done, total))\n        super().set_progress(label, done, total)\n"
             f"pull({handed_off['run_id']!r}, widget=View(RunState(goal='pull')))")
        out = k.ok("print(type(big).__name__, big.dtype, len(big), repr(float(big.sum())), big.flags.writeable, "
                   "small, note)")
        assert out["stdout"].split() == ["ndarray", "float64", str(N), handed_off["sum"], "True", "{'k':", "1}",
                                         "kept"]
        k.ok("big[0] = 42.0")   # the restored memory is the user's to write
        seen = json.loads(k.ok("import json; print(json.dumps(_seen))")["stdout"])
        shown = [p for p in seen if p[0]]   # ("", 0, 0) hides the bar at the end
        done = [d for _, d, _ in shown]
        assert {label for label, _, _ in shown} == {"pull"}
        assert done == sorted(done) and shown[-1][1] == shown[-1][2] >= N * 8, shown[-3:]
    finally:
        k.stop()


def test_a_connection_cut_mid_chunk_is_retried_and_the_pull_succeeds(
        server: JupyterServerProcess, handed_off: dict, tmp_path: Path) -> None:
    proxy = CuttingProxy(server.port, cuts=1, after=1_000_000, request=b"GET /handoff/api/blobs/")
    k = pulling_kernel(tmp_path, proxy.url, server.token)
    try:
        k.ok(f"%pull {handed_off['run_id']}")
        assert proxy.cut_count == 1, "the proxy cut one chunk's download mid-body"
        assert proxy.puts > len(handed_off["big_chunks"]), "the cut chunk was fetched again"
        out = k.ok("print(repr(float(big.sum())), small)")["stdout"]
        assert out.split() == [handed_off["sum"], "{'k':", "1}"]
    finally:
        k.stop()
        proxy.close()


def test_a_server_that_keeps_cutting_fails_the_pull_clearly_and_changes_nothing(
        server: JupyterServerProcess, handed_off: dict, tmp_path: Path) -> None:
    proxy = CuttingProxy(server.port, cuts=10_000, after=200_000, request=b"GET /handoff/api/blobs/")
    k = pulling_kernel(tmp_path, proxy.url, server.token)
    try:
        said = k.run(f"%pull {handed_off['run_id']}", timeout=120)["stderr"]
        assert "kept failing" in said and "Nothing changed in this kernel" in said, said
        untouched(k)
    finally:
        k.stop()
        proxy.close()


def test_a_chunk_corrupted_on_the_server_is_refused_and_changes_nothing(
        server: JupyterServerProcess, handed_off: dict, tmp_path: Path) -> None:
    sha = handed_off["big_chunks"][1]
    blob = shard_path(server.data_dir / "blobs", sha)
    original = blob.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF   # one flipped byte, same size
    spare = blob.with_name(blob.name + ".test")
    spare.write_bytes(damaged)
    os.replace(spare, blob)   # a new file: the run's workspace keeps its hard link to the good bytes
    k = pulling_kernel(tmp_path, server.url, server.token)
    try:
        said = k.run(f"%pull {handed_off['run_id']}")["stderr"]
        assert f"chunk {sha[:19]} arrived corrupted" in said and "Nothing changed in this kernel" in said, said
        untouched(k)
    finally:
        k.stop()
        spare.write_bytes(original)
        os.replace(spare, blob)
