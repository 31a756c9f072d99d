"""Runs survive what really kills them: SIGKILL of the server mid-step, a kernel that calls
os._exit(1). Plus blob garbage collection that never touches a referenced chunk."""
from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest

from handoff_magic.chunks import shard_path
from tests.harness.runner_helpers import (all_events, capture_bundle, finish, hand_off, run_python,
                                          tool_results, wait_event, wait_status, write_script)
from tests.harness.server_process import JupyterServerProcess


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("local"))


def _check_log(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate in {seqs}"


def _wait_tool_call(srv: JupyterServerProcess, run_id: str, needle: str) -> None:
    wait_event(srv, run_id, lambda e: e["type"] == "tool_call" and needle in str(e["data"].get("arguments")),
               f"start of the step with {needle!r}")


def test_sigkill_mid_step_resumes_from_the_checkpoint_and_redoes_the_step(
        handoff_server_factory: Callable[..., JupyterServerProcess],
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("a = float(arr.sum())"),
        run_python("import time\nSLOW_STEP = 1\ntime.sleep(2.5)\nb = a * 2"),
        run_python("print('b is', b)"),
        finish("b computed"),
    ]))
    srv = handoff_server_factory()
    run_id = hand_off(srv, bdir, manifest, model=model)
    _wait_tool_call(srv, run_id, "SLOW_STEP")
    time.sleep(0.8)
    before = all_events(srv, run_id)
    srv.kill()  # SIGKILL the server and its kernels mid-step

    srv.restart()
    assert wait_status(srv, run_id, timeout=120)["status"] == "completed"
    events = all_events(srv, run_id)
    _check_log(events)
    assert events[:len(before)] == before  # nothing committed before the crash was lost or changed
    interrupted = [e for e in events if e["type"] == "interrupted"]
    assert len(interrupted) == 1 and "step 2" in interrupted[0]["data"]["reason"]
    slow = [e for e in events if e["type"] == "tool_call" and "SLOW_STEP" in str(e["data"]["arguments"])]
    assert len(slow) == 2  # cut off once, redone once
    assert [e["data"]["report"]["source"] for e in events if e["type"] == "restore"] == ["handoff", "checkpoint"]
    assert "b is 90.0" in tool_results(events)[-1]["content"]
    nb = nbformat.read(srv.root_dir / "handoff-runs" / run_id / "result.ipynb", as_version=4)
    nbformat.validate(nb)
    assert any("Step interrupted" in c.source for c in nb.cells if c.cell_type == "markdown")


def test_graceful_restart_mid_step_resumes_the_run(
        handoff_server_factory: Callable[..., JupyterServerProcess],
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    mark = "slept-once"  # in the workspace, the one place the sandboxed kernel can write
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python(f"import os, time\nSLOW_STEP = 1\nfirst = not os.path.exists({mark!r})\n"
                   f"open({mark!r}, 'w').close()\ntime.sleep(20 if first else 0.1)\nc = 3"),
        run_python("print('c is', c)"),
        finish(),
    ]))
    srv = handoff_server_factory()
    run_id = hand_off(srv, bdir, manifest, model=model)
    _wait_tool_call(srv, run_id, "SLOW_STEP")
    t0 = time.monotonic()
    srv.stop()  # SIGTERM: the extension stops without waiting for the 20 s step
    assert time.monotonic() - t0 < 15
    srv.restart()
    assert srv.client.get(f"/handoff/api/runs/{run_id}").json()["status"] != "failed"
    assert wait_status(srv, run_id, timeout=120)["status"] == "completed"
    events = all_events(srv, run_id)
    _check_log(events)
    assert any(e["type"] == "interrupted" for e in events)
    assert "c is 3" in tool_results(events)[-1]["content"]


def test_a_run_waiting_for_input_survives_a_server_kill(
        handoff_server_factory: Callable[..., JupyterServerProcess],
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("k = len(df)"),
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "Scale by?"}}]},
        run_python("print('scaled', k * 10)"),
        finish(),
    ]))
    srv = handoff_server_factory()
    run_id = hand_off(srv, bdir, manifest, model=model)
    wait_event(srv, run_id, lambda e: e["type"] == "status" and e["data"]["status"] == "waiting_input")
    srv.kill()  # the instant waiting_input is announced (this used to beat the question's checkpoint)
    srv.restart()
    summary = srv.client.get(f"/handoff/api/runs/{run_id}").json()
    assert summary["status"] == "waiting_input" and summary["question"] == "Scale by?"
    assert srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "10"}).status_code == 200
    assert wait_status(srv, run_id, timeout=120)["status"] == "completed"
    events = all_events(srv, run_id)
    _check_log(events)
    assert not any(e["type"] == "interrupted" for e in events)  # nothing was cut off
    assert [e["data"]["question"] for e in events if e["type"] == "question"] == ["Scale by?"]  # asked once
    assert [e["data"]["answer"] for e in events if e["type"] == "answer"] == ["10"]
    assert "scaled 20" in tool_results(events)[-1]["content"]  # k came back from the checkpoint


def test_a_kill_while_the_question_step_is_saved_redoes_it_and_refuses_early_answers(
        handoff_server_factory: Callable[..., JupyterServerProcess],
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    # the switch lives in the run's workspace: the sandboxed kernel sees nothing else of ours
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("import os, time\nclass Slow:\n    def __reduce__(self):\n"
                   "        time.sleep(4 if os.path.exists('slow-checkpoints') else 0)\n        return (Slow, ())\n"
                   "s = Slow()\nk = 7"),
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "Scale by?"}}]},
        run_python("print('scaled', k * 10)"),
        finish(),
    ]))
    srv = handoff_server_factory()
    run_id = hand_off(srv, bdir, manifest, model=model)
    slow = srv.root_dir / "handoff-runs" / run_id / "slow-checkpoints"
    wait_event(srv, run_id, lambda e: e["type"] == "checkpoint")  # step 1 saved (fast)
    slow.touch()  # from now on a checkpoint takes 4 s
    wait_event(srv, run_id, lambda e: e["type"] == "tool_call" and e["data"]["name"] == "ask_user")
    time.sleep(1)  # inside the question step's checkpoint
    before = all_events(srv, run_id)
    assert not any(e["type"] == "question" for e in before), "the question was announced before its checkpoint"
    srv.kill()
    slow.unlink()
    srv.restart()
    r = srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "too early"})
    if r.status_code != 200:  # redoing the step: refused, with a hint, and not kept
        assert r.status_code == 409 and r.json()["hint"], r.text
    assert wait_status(srv, run_id, ("waiting_input", "completed", "failed"))["status"] == "waiting_input"
    assert srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "10"}).status_code == 200
    assert wait_status(srv, run_id, timeout=120)["status"] == "completed"
    events = all_events(srv, run_id)
    _check_log(events)
    assert events[:len(before)] == before
    assert [e["data"]["question"] for e in events if e["type"] == "question"] == ["Scale by?"]
    assert [e["data"]["answer"] for e in events if e["type"] == "answer"] == ["10"]
    assert "scaled 70" in tool_results(events)[-1]["content"]


@pytest.fixture(scope="module")
def shared_srv() -> Any:
    """One server for the kernel-crash tests: they kill kernels, never the server."""
    srv = JupyterServerProcess().start()
    yield srv
    srv.cleanup()


def test_kernel_crash_is_recovered_once_and_the_agent_is_told(
        shared_srv: JupyterServerProcess,
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    marker = f"crashed-{uuid.uuid4().hex}"  # in the workspace: the sandboxed kernel sees nothing else
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("a = 20"),
        run_python(f"import os, pathlib\np = pathlib.Path({marker!r})\n"
                   "if not p.exists():\n    p.touch()\n    os._exit(1)\nb = a + 1"),
        run_python("print('b =', b)"),
        finish(),
    ]))
    srv = shared_srv
    run_id = hand_off(srv, bdir, manifest, model=model)
    summary = wait_status(srv, run_id, timeout=120)
    assert summary["status"] == "completed", summary
    events = all_events(srv, run_id)
    _check_log(events)
    died = [r for r in tool_results(events) if "kernel died" in r["content"]]
    assert len(died) == 1
    assert any(e["type"] == "interrupted" and "kernel died" in e["data"]["reason"] for e in events)
    assert "b = 21" in tool_results(events)[-1]["content"]  # a was restored from the checkpoint
    assert (srv.root_dir / "handoff-runs" / run_id / marker).exists()


def _kernel_pid(workspace: Path) -> int:
    """The pid (seen from here) of the ipykernel whose cwd is ``workspace``: inside its sandbox
    the kernel is PID 1 and cannot tell us."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ipykernel" in (proc / "cmdline").read_bytes() \
                    and os.readlink(proc / "cwd") == str(workspace) \
                    and "python" in os.path.basename(os.readlink(proc / "exe")):  # not bwrap
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no kernel runs in {workspace}")


def test_a_kernel_sigkilled_mid_step_recovers_from_the_checkpoint_within_seconds(
        shared_srv: JupyterServerProcess,
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """An OOM kill or segfault looks like this from outside: SIGKILL of the kernel process while
    a step runs. The run must notice in seconds (not after the execution timeout) and redo the
    step in a kernel restored from the last checkpoint."""
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("a = 20"),
        run_python("import os, pathlib, time\np = pathlib.Path('sleeping')\n"
                   "if not p.exists():\n    p.touch()\n    time.sleep(600)\nb = a + 1"),
        run_python("print('b =', b)"),
        finish(),
    ]))
    run_id = hand_off(shared_srv, bdir, manifest, model=model)
    ws = shared_srv.root_dir / "handoff-runs" / run_id
    deadline = time.monotonic() + 120
    while not (ws / "sleeping").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_at = time.time()
    os.kill(_kernel_pid(ws), signal.SIGKILL)

    assert wait_status(shared_srv, run_id, timeout=120)["status"] == "completed"
    events = all_events(shared_srv, run_id)
    _check_log(events)
    died = [e for e in events if e["type"] == "interrupted" and "kernel died" in e["data"]["reason"]]
    assert len(died) == 1 and "SIGKILL" in died[0]["data"]["reason"], died
    restored = [e for e in events if e["type"] == "restore" and e["data"]["report"]["source"] == "checkpoint"]
    assert len(restored) == 1
    assert died[0]["time"] - killed_at < 10, "the death was noticed late"
    assert restored[0]["time"] - killed_at < 10, "recovery from the checkpoint started late"
    assert "b = 21" in tool_results(events)[-1]["content"]  # a came back from the checkpoint


def test_second_crash_in_the_same_step_fails_the_run_with_the_reason(
        shared_srv: JupyterServerProcess,
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = "scripted:" + str(write_script(tmp_path / "script.json", [
        run_python("import os\nos._exit(1)"), finish()]))
    srv = shared_srv
    run_id = hand_off(srv, bdir, manifest, model=model)
    summary = wait_status(srv, run_id, timeout=120)
    assert summary["status"] == "failed"
    assert "kernel died 2 times" in summary["error"]
    events = all_events(srv, run_id)
    _check_log(events)
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "failed"
    deadline = time.monotonic() + 20
    while srv.client.get("/api/kernels").json() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.client.get("/api/kernels").json() == []


def test_gc_deletes_only_unreferenced_old_chunks(tmp_path: Path, bundle: tuple[Path, dict[str, Any]]) -> None:
    from handoff_magic.state import RunState
    from jupyter_server_ext.blobs import BlobStore
    from jupyter_server_ext.run.checkpoints import gc_blobs, main
    from jupyter_server_ext.store import RunStore

    bdir, manifest = bundle
    store = RunStore(tmp_path / "handoff.sqlite")
    blobs = BlobStore(tmp_path / "blobs")
    for sha in manifest["chunks"]:
        blobs.put(sha, (shard_path(bdir / "chunks", sha)).read_bytes())
    store.create_run(RunState(goal="g"), manifest, None)
    import hashlib
    orphan_old, orphan_new = b"old orphan chunk", b"fresh upload, run not created yet"
    sha_old, sha_new = hashlib.sha256(orphan_old).hexdigest(), hashlib.sha256(orphan_new).hexdigest()
    blobs.put(sha_old, orphan_old)
    blobs.put(sha_new, orphan_new)
    past = time.time() - 7200
    for p in [blobs.path(s) for s in manifest["chunks"]] + [blobs.path(sha_old)]:
        os.utime(p, (past, past))

    result = gc_blobs(store, blobs, min_age=3600)
    assert result["deleted"] == 1 and result["bytes_freed"] == len(orphan_old)
    assert not blobs.has(sha_old) and blobs.has(sha_new)
    assert all(blobs.has(s) for s in manifest["chunks"])  # referenced: never deleted, however old
    store.close()
    assert main(["gc", "--data-dir", str(tmp_path), "--min-age", "0"]) == 0
    assert not blobs.has(sha_new) and all(blobs.has(s) for s in manifest["chunks"])


async def test_scheduled_gc_removes_old_orphans(tmp_path: Path) -> None:
    import asyncio
    import hashlib
    from jupyter_server_ext.blobs import BlobStore
    from jupyter_server_ext.run.manager import RunManager
    from jupyter_server_ext.settings import HandoffSettings
    from jupyter_server_ext.store import RunStore
    from jupyter_server_ext.workspace import Workspace

    store = RunStore(tmp_path / "handoff.sqlite")
    blobs = BlobStore(tmp_path / "blobs")
    data = b"an upload nobody will ever reference"
    sha = hashlib.sha256(data).hexdigest()
    blobs.put(sha, data)
    past = time.time() - 7200
    os.utime(blobs.path(sha), (past, past))
    settings = HandoffSettings(gc_interval=0.2, max_concurrent_runs=1, transport="shared")
    rm = RunManager(settings, store, blobs, None, Workspace(tmp_path / "root"))
    await rm.start()
    try:
        for _ in range(50):
            if not blobs.has(sha):
                break
            await asyncio.sleep(0.1)
        assert not blobs.has(sha)
    finally:
        await rm.stop()
        store.close()
