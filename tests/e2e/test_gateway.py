"""Runs whose kernels live in Jupyter Enterprise Gateway, which shares no directory with the server.

A real Enterprise Gateway (its own venv, auth token, kernels started in its own working dir) and
a real Jupyter Server with the extension and ``--gateway-url``. A laptop kernel runs ``%agent``,
``%handoff``s; the run restores, executes and checkpoints in a gateway kernel, with every byte
going over the kernel's websocket; the laptop pulls the result back. A kernel that dies mid-step
is replaced by a new gateway kernel restored from the last checkpoint.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.harness.cluster_harness import EnterpriseGateway, cleanup_dir, gateway_server, tmpdir
from handoff_magic.demo import Kernel, output_text
from tests.harness.runner_helpers import (all_events, finish, hand_off, run_python, tool_results, wait_status,
                                          write_script)
from tests.harness.server_process import JupyterServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway() -> Iterator[EnterpriseGateway]:
    work = tmpdir("handoff-eg-")
    gw = EnterpriseGateway(work).start()
    try:
        yield gw
    finally:
        gw.stop()
        cleanup_dir(work)


@pytest.fixture(scope="module")
def srv(gateway: EnterpriseGateway) -> Iterator[JupyterServerProcess]:
    server = gateway_server(gateway).start()
    try:
        yield server
    finally:
        server.cleanup()


class Laptop:
    """A real local kernel pointed at the server through the environment."""

    def __init__(self, cwd: Path, srv: JupyterServerProcess, model: str) -> None:
        env = dict(os.environ, HANDOFF_SERVER_URL=srv.url, HANDOFF_TOKEN=srv.token, HANDOFF_MODEL=model,
                   HANDOFF_CACHE_DIR=str(cwd.parent / "cache"), MPLBACKEND="Agg")
        cwd.mkdir(parents=True, exist_ok=True)
        self.kernel = Kernel(cwd, env, log=cwd.parent / "laptop-kernel.log")

    def ok(self, code: str, timeout: float = 120) -> str:
        status, outputs = self.kernel.run(code, timeout=timeout)
        text = output_text(outputs)
        assert status == "ok", f"{code!r} failed:\n{text}"
        return text

    def value(self, expr: str) -> Any:
        return json.loads(self.ok(f"import json as _j\nprint(_j.dumps({expr}))").strip().splitlines()[-1])

    def kill(self) -> None:
        self.kernel.kill()


RUN_STATE = ("(lambda r: {'status': r.status, 'steps': r.state.steps, 'remote': getattr(r.remote, 'run_id', None)})"
             "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")


def test_handoff_runs_in_a_gateway_kernel_and_pulls_back(
        srv: JupyterServerProcess, gateway: EnterpriseGateway, tmp_path: Path) -> None:
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("import numpy as np, pandas as pd\ndf = pd.read_csv('sales.csv')\n"
                   "big = np.random.default_rng(0).random(300_000)", "Load the export."),
        run_python("import os\nwhere = os.getcwd()\ntotal = float(df['amount'].sum()) + float(big[:0].sum())\n"
                   "with open('report.txt', 'w') as f:\n    f.write(f'total={total}\\n')\n"
                   "print('kernel cwd', where)", "Sum it up remotely."),
        finish("Total sales are 42; see report.txt."),
    ]))
    laptop_dir = tmp_path / "laptop"
    laptop_dir.mkdir()
    (laptop_dir / "sales.csv").write_text("region,amount\nnorth,10\nsouth,32\n")
    laptop = Laptop(laptop_dir, srv, model)
    try:
        laptop.ok("%load_ext handoff_magic")
        laptop.ok("%agent --max-steps 1 total the sales")
        out = laptop.ok("%handoff")
        run_id = laptop.value(RUN_STATE)["remote"]
        assert run_id and run_id in out, out

        done = wait_status(srv, run_id, timeout=120)
        assert done["status"] == "completed", (done, srv.log()[-3000:])
        assert done["summary"].startswith("Total sales are 42")

        # it really ran in the gateway's kernel, in a directory the server never wrote
        events = all_events(srv, run_id)
        remote_step = tool_results(events)[-1]["content"]
        kernel_run_dir = (gateway.kernels_dir / "handoff-runs" / run_id).resolve()
        assert f"kernel cwd {kernel_run_dir}" in remote_step, remote_step
        assert str(srv.root_dir) not in remote_step
        assert (kernel_run_dir / "sales.csv").read_text().startswith("region,amount"), \
            "the handed-off file travelled over the kernel's channels"
        assert (kernel_run_dir / "report.txt").read_text() == "total=42.0\n"
        ckpts = [e["data"] for e in events if e["type"] == "checkpoint"]
        assert ckpts and all(c["bytes_new"] < 100_000 for c in ckpts[1:]), "checkpoints only bring back new chunks"
        ws = srv.root_dir / "handoff-runs" / run_id
        assert (ws / "result.ipynb").is_file()
        assert (ws / "report.txt").read_text() == "total=42.0\n", "the server mirrors the kernel's files for Lab"
        deadline = time.monotonic() + 20  # the kernel is shut down right after the final status
        while gateway.kernels() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gateway.kernels() == [], "the run's gateway kernel was shut down"
        assert "did not see extra execute_request content" not in srv.log(), \
            "bulk data rode in the request content through the gateway (the fast path)"

        diff = srv.client.get(f"/handoff/api/runs/{run_id}/diff").json()
        assert "report.txt" in {f["path"] for f in diff["files"]}

        pulled = laptop.ok(f"%pull {run_id}")
        assert laptop.value("total") == 42.0, pulled
        assert laptop.value("where") == str(kernel_run_dir)
        assert laptop.value("len(big)") == 300_000
        assert (laptop_dir / "report.txt").read_text() == "total=42.0\n"
        state = laptop.value(RUN_STATE)
        assert state["status"] == "completed" and state["steps"] == 3, state
    finally:
        laptop.kill()


def test_a_gateway_kernel_that_dies_is_replaced_from_the_checkpoint(
        srv: JupyterServerProcess, gateway: EnterpriseGateway, tmp_path: Path,
        bundle: tuple[Path, dict[str, Any]]) -> None:
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "crash.json", [
        run_python("kept = df['amount'].max()"),
        run_python("import os\nif not os.path.exists('crashed-once'):\n"
                   "    open('crashed-once', 'w').close()\n    os._exit(1)\nafter = kept + 1"),
        finish("recovered"),
    ]))
    run_id = hand_off(srv, bdir, manifest, model=model)
    done = wait_status(srv, run_id, timeout=120)
    assert done["status"] == "completed", (done, srv.log()[-3000:])
    events = all_events(srv, run_id)
    restores = [e["data"]["report"] for e in events if e["type"] == "restore"]
    assert [r["reason"] for r in restores][-1] == "kernel crash", restores
    assert any(e["type"] == "interrupted" for e in events)
    ck = srv.client.get(f"/handoff/api/runs/{run_id}/bundle").json()
    assert {"kept", "after", "df"} <= {v["name"] for v in ck["variables"]}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from tests.harness.runner_helpers import capture_bundle
    return capture_bundle(tmp_path_factory.mktemp("captured"))


def test_a_server_restart_resumes_the_run_in_a_new_gateway_kernel(
        gateway: EnterpriseGateway, tmp_path: Path, bundle: tuple[Path, dict[str, Any]]) -> None:
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "restart.json", [
        run_python("first = df['amount'].sum()"),
        run_python("import os, time\nif not os.path.exists('slept'):\n    open('slept', 'w').close()\n"
                   "    time.sleep(60)\nsecond = first * 2"),
        finish("resumed"),
    ]))
    server = gateway_server(gateway).start()
    try:
        run_id = hand_off(server, bdir, manifest, model=model)
        deadline = time.monotonic() + 60  # wait until the slow step runs in the gateway kernel
        while not (gateway.kernels_dir / "handoff-runs" / run_id / "slept").exists():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        server.kill()            # the server dies; its gateway kernel is orphaned mid-step
        server.restart()
        done = wait_status(server, run_id, timeout=90)
        assert done["status"] == "completed", (done, server.log()[-3000:])
        events = all_events(server, run_id)
        assert "server restart" in [e["data"]["report"]["reason"] for e in events if e["type"] == "restore"]
        ck = server.client.get(f"/handoff/api/runs/{run_id}/bundle").json()
        assert {"first", "second"} <= {v["name"] for v in ck["variables"]}
    finally:
        server.cleanup()
