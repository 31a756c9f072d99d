"""Warm spare kernels are sandboxed like a run's and serve exactly one run.

A server with ``c.HandoffApp.warm_kernels = 1`` keeps a spare kernel booted (bubblewrap, on an
empty workspace of its own); a handoff adopts it. Agent code in the adopted kernel attacks like
the probes in test_sandbox.py: it lists and reads the server's data dir, another run's workspace,
the runs folder, and looks for what an earlier run left (files, variables, /tmp). Everything is
refused or absent; each run's kernel is gone with its run and the next run gets another. A
server with warm kernels resumes a waiting run after a SIGKILL, and the sandbox kernel spec stays
out of the kernel spec listing the Lab launcher shows.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.runner_helpers import (
    all_events,
    capture_bundle,
    finish,
    hand_off,
    run_python,
    scripted_model,
    tool_results,
    wait_status,
)
from tests.harness.server_process import JupyterServerProcess

WARM = ["--HandoffApp.warm_kernels=1", "--HandoffApp.kernel_memory_limit=2G"]

ATTACK = r'''
import glob, json, os
P = json.loads({paths!r})
seen = {{}}
def look(name, attempt):
    try:
        got = attempt()
    except Exception as exc:  # refused: not there or not readable
        seen[name] = "refused (" + type(exc).__name__ + ")"
    else:
        seen[name] = "LEAKED " + repr(got)[:200] if got else "refused (nothing found)"
look("server data dir", lambda: os.listdir(P["data"]))
look("sqlite store", lambda: open(P["sqlite"], "rb").read(16))
look("uploaded chunks", lambda: os.listdir(P["data"] + "/blobs"))
look("other run's workspace", lambda: os.listdir(P["other_ws"]))
look("other run's file", lambda: open(P["other_ws"] + "/mine.txt").read())
look("other dirs in the runs folder",
     lambda: [n for n in os.listdir(P["runs"]) if n != os.path.basename(os.getcwd())])
look("earlier run's files here", lambda: [f for f in os.listdir(".") if f.startswith("left-by-")])
look("earlier run's variables", lambda: [n for n in list(globals()) if n.startswith("left_by_")])
look("earlier run's /tmp", lambda: glob.glob("/tmp/left-by-*"))
look("names the spare's warm-up left", lambda: [n for n in ("importlib", "missing", "numpy", "pandas")
                                                if n in globals()])
for name, outcome in seen.items():
    print(f"{{name:32}} {{outcome}}")
open("left-by-" + P["me"] + ".txt", "w").write("a file of run " + P["me"])
open("/tmp/left-by-" + P["me"], "w").write("x")
globals()["left_by_" + P["me"]] = True
'''
PROBES = 10


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def srv() -> Iterator[JupyterServerProcess]:
    server = JupyterServerProcess(extra_args=WARM).start()
    try:
        yield server
    finally:
        server.cleanup()


def _kernels(srv: JupyterServerProcess) -> dict[str, str]:
    return {k["id"]: k["name"] for k in srv.client.get("/api/kernels").json()}


def _wait_kernels(srv: JupyterServerProcess, ok: Any, what: str, timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _kernels(srv)
        if ok(now):
            return now
        time.sleep(0.1)
    raise AssertionError(f"{what}; kernels now: {_kernels(srv)}\n{srv.log()[-3000:]}")


def _attack(srv: JupyterServerProcess, bdir: Path, manifest: dict[str, Any], tmp_path: Path, me: str,
            other_ws: Path) -> tuple[str, dict[str, str]]:
    """Hand off a run whose one step runs ATTACK; its id and what each probe found."""
    paths = {"data": str(srv.data_dir), "sqlite": str(srv.data_dir / "handoff.sqlite"),
             "runs": str(srv.root_dir / "handoff-runs"), "other_ws": str(other_ws), "me": me}
    run_id = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / me, [
        run_python(ATTACK.format(paths=json.dumps(paths))), finish()]))
    assert wait_status(srv, run_id)["status"] == "completed", all_events(srv, run_id)[-3:]
    printed = tool_results(all_events(srv, run_id))[0]["outputs"][0]["text"]
    print(printed)
    return run_id, dict(line.rsplit("  ", 1) for line in printed.strip().splitlines())


def test_each_run_adopts_a_sandboxed_spare_that_sees_nothing_of_other_runs_and_serves_it_alone(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    first = _wait_kernels(srv, lambda k: len(k) == 1, "no spare kernel was booted at start")
    (s1, name), = first.items()
    assert name == "handoff-sandbox", "the spare is not sandboxed like a run kernel"

    # run A takes the spare, leaves a file in its workspace and waits (its kernel stays up)
    run_a = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / "a", [
        run_python("open('mine.txt', 'w').write('run A only')\nimport os\nprint(sorted(os.listdir('.')))"),
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "go on?"}}]}]))
    assert wait_status(srv, run_a, ("waiting_input",))["status"] == "waiting_input"
    listed = tool_results(all_events(srv, run_a))[0]["outputs"][0]["text"]
    assert "'mine.txt'" in listed and "'sales.csv'" in listed, listed  # the bundle is in the adopted dir
    ws_a = srv.root_dir / "handoff-runs" / run_a
    assert (ws_a / "mine.txt").read_text() == "run A only"  # the kernel's writes land in A's workspace
    booted = _wait_kernels(srv, lambda k: len(k) == 2, "no new spare after run A took one")
    (s2,) = set(booted) - {s1}

    # run B (the next spare) attacks: the data dir, A's workspace, the runs folder
    run_b, seen_b = _attack(srv, bdir, manifest, tmp_path, "B", ws_a)
    assert len(seen_b) == PROBES and all(v.startswith("refused") for v in seen_b.values()), seen_b
    after_b = _wait_kernels(srv, lambda k: s2 not in k and len(k) == 2,
                            "run B's kernel (the second spare) outlived its run, or no new spare booted")
    assert s1 in after_b, "run A's kernel went away"
    (s3,) = set(after_b) - {s1}

    # run C (a third spare) finds nothing B left: files, variables, /tmp
    run_c, seen_c = _attack(srv, bdir, manifest, tmp_path, "C", srv.root_dir / "handoff-runs" / run_b)
    assert all(v.startswith("refused") for v in seen_c.values()), seen_c
    _wait_kernels(srv, lambda k: s3 not in k and len(k) == 2, "run C's kernel outlived its run")
    ws_b, ws_c = (srv.root_dir / "handoff-runs" / r for r in (run_b, run_c))
    assert (ws_b / "left-by-B.txt").exists() and (ws_c / "left-by-C.txt").exists()
    assert not (ws_c / "left-by-B.txt").exists() and not (ws_a / "left-by-B.txt").exists()

    # A goes on in its own kernel, which saw none of this, and goes with its run
    assert srv.client.post(f"/handoff/api/runs/{run_a}/answer", json={"answer": "yes"}).status_code == 200
    assert wait_status(srv, run_a)["status"] == "completed"
    _wait_kernels(srv, lambda k: s1 not in k and len(k) == 1, "run A's kernel outlived its run")
    assert len({s1, s2, s3}) == 3
    assert len(list((srv.root_dir / "handoff-runs").glob(".spare-*"))) == 1  # the one booted spare


def test_the_sandbox_kernel_spec_is_not_in_the_launcher_listing_yet_runs_use_it(
        srv: JupyterServerProcess) -> None:
    listing = srv.client.get("/api/kernelspecs")
    assert listing.status_code == 200
    specs = listing.json()["kernelspecs"]
    assert "python3" in specs and "handoff-sandbox" not in specs, sorted(specs)
    kernels = _wait_kernels(srv, lambda k: len(k) >= 1, "no spare kernel")
    assert set(kernels.values()) == {"handoff-sandbox"}


def test_a_server_with_warm_kernels_resumes_a_waiting_run_after_a_crash(
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    with JupyterServerProcess(extra_args=WARM) as server:
        _wait_kernels(server, lambda k: len(k) == 1, "no spare kernel was booted at start")
        run_id = hand_off(server, bdir, manifest, model=scripted_model(tmp_path, [
            run_python("kept = 41\nopen('before.txt', 'w').write('written before the crash')"),
            {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "go on?"}}]},
            run_python("print(open('before.txt').read(), kept + 1, len(df))"), finish()]))
        assert wait_status(server, run_id, ("waiting_input",))["status"] == "waiting_input"
        server.restart()  # SIGKILL: server, run kernel and spare
        assert wait_status(server, run_id, ("waiting_input",))["status"] == "waiting_input"
        r = server.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "yes"})
        assert r.status_code == 200, r.text
        assert wait_status(server, run_id)["status"] == "completed", all_events(server, run_id)[-3:]
        out = tool_results(all_events(server, run_id))[-1]["outputs"][0]["text"]
        assert out.strip() == "written before the crash 42 2", out
        # the killed server's spare workspace is gone; the new server's spare is the only one
        spares = _wait_kernels(server, lambda k: len(k) == 1, "no spare after the restart")
        assert set(spares.values()) == {"handoff-sandbox"}
        assert len(list((server.root_dir / "handoff-runs").glob(".spare-*"))) == 1
