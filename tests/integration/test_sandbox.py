"""Run kernels are sandboxed (bubblewrap), attacked from inside through a real server.

Agent code in a handed-off run tries what an LLM steered by a prompt injection could: read the
server's secrets from ``/proc/*/environ``, its token from the runtime dir, the SQLite store,
another run's workspace, the config and home dirs, connect to the server's port. Every probe is
refused, while the run itself completes with its workspace, checkpoints, result.ipynb and pull
back working. A memory hog is stopped with a clear event and the run goes on.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handoff_magic.chunks import address_matches, shard_path

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

SECRET = "sandbox-probe-secret-4f1c2e"

PROBES = r'''
import glob, json, os, socket, sqlite3
P = json.loads({paths!r})
probes = {{}}
def probe(name, attempt):
    try:
        got = attempt()
    except Exception as exc:  # refused: the thing is not there or not reachable
        probes[name] = "refused (" + type(exc).__name__ + ")"
    else:
        probes[name] = "LEAKED " + repr(got)[:120] if got else "refused (nothing found)"
def environ_scan():
    hits = []
    for f in glob.glob("/proc/[0-9]*/environ"):
        try:
            if P["secret"].encode() in open(f, "rb").read():
                hits.append(f)
        except OSError:
            pass
    return hits
probe("proc environ scan", environ_scan)
probe("other processes", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and p != "1"))
probe("runtime dir token", lambda: [open(f).read() for f in glob.glob(P["runtime"] + "/jpserver-*.json")])
probe("sqlite store", lambda: sqlite3.connect("file:" + P["sqlite"] + "?mode=ro", uri=True)
      .execute("select count(*) from runs").fetchall())
probe("other run's workspace (read)", lambda: open(P["other_file"]).read())
def plant():
    with open(P["other_ws"] + "/planted.txt", "w") as f:
        f.write("from the attacker")
    return "written"
probe("other run's workspace (write)", plant)
probe("server config", lambda: open(P["config"]).read())
probe("home", lambda: os.listdir(P["home"]))
probe("server port (TCP)", lambda: socket.create_connection(("127.0.0.1", P["port"]), timeout=3))
import sysconfig
probe("plant code in site-packages", lambda: open(sysconfig.get_paths()["purelib"] + "/evil.pth", "w").write("x"))
probe("write under /etc", lambda: open("/etc/evil", "w").write("x"))
for name, outcome in probes.items():
    print(f"{{name:32}} {{outcome}}")
open("made_in_the_sandbox.txt", "w").write("workspace is writable")
sandboxed_probes = probes
'''


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def server_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's home, config and runtime dirs, each holding something to steal."""
    base = tmp_path_factory.mktemp("server-dirs")
    for d in ("home", "config", "runtime"):
        (base / d).mkdir()
    (base / "home" / "diary.txt").write_text("private")
    (base / "config" / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {}}))
    return base


@pytest.fixture(scope="module")
def srv(server_dirs: Path) -> Iterator[JupyterServerProcess]:
    env = {"HANDOFF_SERVER_SECRET_FOR_TEST": SECRET, "HOME": str(server_dirs / "home"),
           "JUPYTER_CONFIG_DIR": str(server_dirs / "config"),
           "JUPYTER_RUNTIME_DIR": str(server_dirs / "runtime")}
    server = JupyterServerProcess(env=env, extra_args=["--HandoffApp.kernel_memory_limit=2G"]).start()
    try:
        yield server
    finally:
        server.cleanup()


def test_every_probe_from_inside_a_run_is_refused_and_the_run_still_works(
        srv: JupyterServerProcess, server_dirs: Path, bundle: tuple[Path, dict[str, Any]],
        tmp_path: Path) -> None:
    bdir, manifest = bundle
    # run A: a workspace with something of its own, waiting for input so it stays put
    other = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / "a", [
        run_python("open('mine.txt', 'w').write('run A only')"),
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "go on?"}}]}]))
    assert wait_status(srv, other, ("waiting_input",))["status"] == "waiting_input"
    base = server_dirs
    runtime = base / "runtime"
    assert list(runtime.glob("jpserver-*.json")), "the server wrote no runtime file to attack"
    other_ws = srv.root_dir / "handoff-runs" / other
    paths = {"secret": SECRET, "runtime": str(runtime), "sqlite": str(srv.data_dir / "handoff.sqlite"),
             "other_ws": str(other_ws), "other_file": str(other_ws / "mine.txt"),
             "config": str(base / "config" / "jupyter_server_config.json"), "home": str(base / "home"),
             "port": srv.port}
    run_id = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / "b", [
        run_python(PROBES.format(paths=json.dumps(paths))),
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "pull me back"}}]}]))
    assert wait_status(srv, run_id, ("waiting_input", "failed"))["status"] == "waiting_input"
    printed = tool_results(all_events(srv, run_id))[0]["outputs"][0]["text"]
    print(printed)
    rows = dict(line.rsplit("  ", 1) for line in printed.strip().splitlines())
    assert len(rows) == 11, printed
    assert all(v.strip().startswith("refused") for v in rows.values()), printed
    assert not (other_ws / "planted.txt").exists()
    # the run itself works: its workspace, a checkpoint, result.ipynb, pull back
    ws = srv.root_dir / "handoff-runs" / run_id
    assert (ws / "made_in_the_sandbox.txt").read_text() == "workspace is writable"
    assert (ws / "result.ipynb").exists()
    assert "checkpoint" in {e["type"] for e in all_events(srv, run_id)}
    # the kernel's checkpoint holds only what changed: the handed-off chunks, which it maps
    # read-only from the server's store, were neither copied into its workspace nor rewritten
    written = {p.name for p in (ws / ".handoff" / "ckpt" / "chunks").glob("*/*")}
    assert written and not written & set(manifest["chunks"]), sorted(written & set(manifest["chunks"]))[:3]
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(r=srv.client.post(
        f"/handoff/api/runs/{run_id}/pull", json={"timeout": 60})))
    th.start()
    th.join(90)
    assert box["r"].status_code == 200, box["r"].text
    assert "sandboxed_probes" in {v["name"] for v in box["r"].json()["manifest"]["variables"]}
    # and run A is untouched: it resumes with its answer
    assert srv.client.post(f"/handoff/api/runs/{other}/answer", json={"answer": "no"}).status_code == 200


SCRIBBLE = r"""
import os
from handoff_magic.chunks import CHUNKS
BUNDLE = "/handoff-bundle"   # the run's read-only view of its stored chunks
attacks = {}
def attack(name, do):
    try:
        do()
    except OSError as exc:
        attacks[name] = attacks.get(name, "") or "refused"
    else:
        attacks[name] = "DONE"
def via_proc(p):
    fd = os.open(p, os.O_RDONLY)
    try:
        open("/proc/self/fd/%d" % fd, "r+b").write(b"scribbled")
    finally:
        os.close(fd)
def steal(p):
    os.link(p, "stolen-chunk")
    open("stolen-chunk", "r+b").write(b"scribbled")
views = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(BUNDLE, CHUNKS)) for n in names]
for p in views:
    attack("write", lambda: open(p, "r+b").write(b"scribbled by the run"))
    attack("chmod", lambda: os.chmod(p, 0o666))
    attack("truncate", lambda: os.truncate(p, 0))
    attack("link into the workspace", lambda: steal(p))
    attack("reopen via /proc/self/fd", lambda: via_proc(p))
    attack("unlink", lambda: os.unlink(p))
attack("new file in the bundle", lambda: open(os.path.join(BUNDLE, "evil"), "w").write("x"))
open("stolen-chunk", "wb").write(b"the workspace is the run's own")
print("bundle", len(views))
for name, outcome in attacks.items():
    print(name, "=", outcome)
"""


def test_a_run_scribbling_over_its_bundle_cannot_damage_the_chunks_other_runs_share(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """A run's kernel maps its bundle's chunks straight from the server's store (hard links, no
    copy), shown read-only: no way of writing them works from inside the run (the stored chunks
    are shared with other runs and later handoffs), while its workspace stays its own."""
    bdir, manifest = bundle
    first = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / "a", [run_python(SCRIBBLE), finish()]))
    assert wait_status(srv, first)["status"] == "completed"
    out = tool_results(all_events(srv, first))[0]["outputs"][0]["text"]
    head, *rows = out.strip().splitlines()
    assert int(head.split()[1]) == len(manifest["chunks"]), out
    outcomes = dict(row.split(" = ") for row in rows)
    assert len(outcomes) == 7 and set(outcomes.values()) == {"refused"}, out
    for sha in manifest["chunks"]:
        stored = shard_path(srv.data_dir / "blobs", sha)
        assert address_matches(sha, stored.read_bytes()), f"stored chunk {sha[:19]} was changed by a run"
    # the run ended: its view of the store went with its kernel (a warm spare's view stays)
    def views_without_kernels() -> set[str]:
        spares = {p.name for p in (srv.root_dir / "handoff-runs").glob(".spare-*")}
        return {p.name for p in (srv.data_dir / "bundle-views").iterdir()} - spares
    deadline = time.monotonic() + 30
    while views_without_kernels() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not views_without_kernels()
    # the next handoff of the same state (its chunks deduplicated) restores intact
    second = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path / "b", [
        run_python("print('rows', len(df))"), finish()]))
    assert wait_status(srv, second)["status"] == "completed"
    assert tool_results(all_events(srv, second))[0]["outputs"][0]["text"].strip() == "rows 2"


def test_a_memory_hog_gets_an_error_event_and_the_run_goes_on(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    run_id = hand_off(srv, bdir, manifest, model=scripted_model(tmp_path, [
        run_python("hog = bytearray(8 * 1024**3)"), run_python("print('still here', len(df))"), finish()]))
    assert wait_status(srv, run_id)["status"] == "completed"
    events = all_events(srv, run_id)
    errors = [e["data"] for e in events if e["type"] == "error"]
    assert any("ran out of memory" in e["error"] and "2.0 GiB" in e["error"]
               and "kernel_memory_limit" in e["hint"] for e in errors), errors
    outs = tool_results(events)
    assert "MemoryError" in json.dumps(outs[0]) and outs[1]["outputs"][0]["text"].strip() == "still here 2"


def test_no_sandbox_is_explicit_and_shown_as_a_warning(tmp_path: Path) -> None:
    with JupyterServerProcess(extra_args=["--HandoffApp.sandbox=none"]) as server:
        page = server.client.get("/handoff/runs")
        assert page.status_code == 200 and "NOT sandboxed" in page.text


def test_without_bubblewrap_auto_refuses_runs_and_says_how_to_fix_it(
        bundle: tuple[Path, dict[str, Any]]) -> None:
    manifest = bundle[1]
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not (Path(p) / "bwrap").exists())
    with JupyterServerProcess(env={"PATH": path}) as server:
        r = server.client.post("/handoff/api/runs", json={"manifest": manifest})
        assert r.status_code == 503, r.text
        assert "bwrap" in r.json()["error"] and "apt-get install bubblewrap" in r.json()["hint"] \
            and "sandbox = 'none'" in r.json()["hint"]
        assert server.client.get("/handoff/api/runs").json()["runs"] == []
