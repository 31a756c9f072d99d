"""The extension inside a JupyterHub single-user server.

A real JupyterHub (configurable-http-proxy from npm, DummyAuthenticator, SimpleLocalProcessSpawner)
on loopback spawns ada's server, with the handoff extension. Ada's laptop kernel authenticates
with a token she minted with one narrow scope (``access:servers!user=ada``), hands a run off to
``<hub>/user/ada``, the run completes there, its links use the hub's public URL and her prefix,
and she pulls it back. A token without that scope, or none, gets nothing.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.harness.cluster_harness import JupyterHub, cleanup_dir, tmpdir
from handoff_magic.demo import Kernel, output_text
from tests.harness.runner_helpers import finish, run_python, write_script

pytestmark = pytest.mark.slow
USER = "ada"


@pytest.fixture(scope="module")
def hub() -> Iterator[JupyterHub]:
    work = tmpdir("handoff-hub-")
    h = JupyterHub(work, user=USER, singleuser_args=[f"--HandoffApp.data_dir={work / 'handoff-data'}"])
    try:
        h.start()
        h.spawn()
        yield h
    finally:
        h.stop()
        cleanup_dir(work)


def test_handoff_to_a_hub_single_user_server_with_a_narrow_token(hub: JupyterHub, tmp_path: Path) -> None:
    token = hub.user_token([f"access:servers!user={USER}"], note="laptop kernel: jupyter-handoff")
    server_url = hub.user_url()
    api = httpx.Client(base_url=f"{server_url}/handoff/api", timeout=30,
                       headers={"Authorization": f"token {token}"})

    # the narrow token opens ada's server and nothing else; no token opens nothing
    assert api.get("/runs").status_code == 200
    assert httpx.get(f"{server_url}/handoff/api/runs", timeout=30).status_code in (302, 401, 403)
    assert httpx.get(f"{hub.url}/hub/api/users", headers={"Authorization": f"token {token}"},
                     timeout=30).status_code == 403
    unscoped = hub.user_token([f"read:users:name!user={USER}"], note="no server access")
    assert httpx.get(f"{server_url}/handoff/api/runs", headers={"Authorization": f"token {unscoped}"},
                     timeout=30).status_code == 403

    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("import pandas as pd\ndf = pd.read_csv('sales.csv')", "Load the export."),
        run_python("total = float(df['amount'].sum())\nprint('total', total)", "Sum it on the hub."),
        finish("Total sales are 42."),
    ]))
    laptop_dir = tmp_path / "laptop"
    laptop_dir.mkdir()
    (laptop_dir / "sales.csv").write_text("region,amount\nnorth,10\nsouth,32\n")
    env = dict(os.environ, HANDOFF_SERVER_URL=server_url, HANDOFF_TOKEN=token, HANDOFF_MODEL=model,
               HANDOFF_CACHE_DIR=str(tmp_path / "cache"), MPLBACKEND="Agg")
    laptop = Kernel(laptop_dir, env, log=tmp_path / "laptop-kernel.log")

    def ok(code: str) -> str:
        status, outputs = laptop.run(code, timeout=120)
        text = output_text(outputs)
        assert status == "ok", f"{code!r} failed:\n{text}"
        return text

    def value(expr: str) -> Any:
        return json.loads(ok(f"import json as _j\nprint(_j.dumps({expr}))").strip().splitlines()[-1])

    try:
        ok("%load_ext handoff_magic")
        ok("%agent --max-steps 1 total the sales")
        out = ok("%handoff")
        run_id = value("__import__('handoff_magic.local.run', fromlist=['x']).current_run().remote.run_id")
        assert run_id in out, out

        deadline = time.monotonic() + 90
        while (run := api.get(f"/runs/{run_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"run still {run['status']}"
            time.sleep(0.3)
        assert run["status"] == "completed", run

        # links point at the hub's public URL under ada's prefix, and work there with her token
        prefix = f"{hub.url}/user/{USER}/"
        for name in ("status_page", "notebook"):
            assert run["links"][name].startswith(prefix), run["links"]
        page = httpx.get(run["links"]["status_page"], headers={"Authorization": f"token {token}"}, timeout=30)
        assert page.status_code == 200 and "Total sales are 42" in page.text
        result = hub.homes / USER / "handoff-runs" / run_id / "result.ipynb"
        assert result.is_file(), "the run's workspace is in ada's home (her server's root_dir)"

        ok(f"%pull {run_id}")
        assert value("total") == 42.0
        assert value("__import__('handoff_magic.local.run', fromlist=['x']).current_run().status") == "completed"
    finally:
        laptop.kill()
        api.close()
