"""Hostile manifests against a real server: refused before anything is written (4xx, no row, no
file), modes stripped of setuid/setgid/sticky/world-write, and a bad run already in the store
(as an older server committed them) never stops the good runs from resuming."""
from __future__ import annotations

import copy
import json
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from handoff_magic.chunks import shard_path
from tests.harness.runner_helpers import (
    all_events,
    capture_bundle,
    finish,
    hand_off,
    run_python,
    wait_status,
    write_script,
)
from tests.harness.server_process import JupyterServerProcess


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("local"))


def _upload(srv: JupyterServerProcess, bdir: Path, manifest: dict[str, Any]) -> None:
    for sha in srv.client.post("/handoff/api/blobs/missing", json={"shas": list(manifest["chunks"])}).json()["missing"]:
        srv.client.put(f"/handoff/api/blobs/{sha}", content=shard_path(bdir / "chunks", sha).read_bytes())


def _written(srv: JupyterServerProcess) -> set[str]:
    """Every path under the server's root and data dirs except the SQLite files."""
    return {str(p) for base in (srv.root_dir, srv.data_dir) for p in base.rglob("*")
            if "handoff.sqlite" not in p.name}


def _rows(srv: JupyterServerProcess) -> int:
    with sqlite3.connect(srv.data_dir / "handoff.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM runs").fetchone()[0])


def _script(tmp_path: Path, turns: list[dict[str, Any]]) -> str:
    return "scripted:" + str(write_script(tmp_path / f"{uuid.uuid4().hex}.json", turns))


def _outside(srv: JupyterServerProcess) -> tuple[bool, int | None]:
    """Where run id ``../../x`` would land: whether it exists and when it last changed (the shared
    /tmp may hold an ``x`` of someone else's, so the test compares before and after)."""
    target = srv.root_dir.parent.parent / "x"
    return target.exists(), target.stat().st_mtime_ns if target.exists() else None


def test_hostile_ids_and_paths_are_refused_and_modes_are_masked(
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    with JupyterServerProcess() as srv:
        escape = _outside(srv)
        _upload(srv, bdir, manifest)
        before, rows = _written(srv), _rows(srv)
        for bad_id in ("../../x", "a/b", "x" * 300, "", ".."):
            m = copy.deepcopy(manifest)
            m["run"]["id"] = bad_id
            r = srv.client.post("/handoff/api/runs", json={"manifest": m})
            assert r.status_code == 400 and "not a valid run id" in r.json()["error"], (bad_id, r.text)
        m = copy.deepcopy(manifest)
        m["files"][0] = {**m["files"][0], "path": ".handoff/ckpt/manifest.json"}
        r = srv.client.post("/handoff/api/runs", json={"manifest": m})
        assert r.status_code == 400 and ".handoff/" in r.json()["error"], r.text
        assert _rows(srv) == rows and _written(srv) == before  # no row, nothing written
        assert _outside(srv) == escape

        m = copy.deepcopy(manifest)
        m["files"][0]["mode"] = 0o106777  # setuid + setgid + sticky + world-writable
        m["run"]["id"] = uuid.uuid4().hex[:12]
        m["run"]["model"] = _script(tmp_path, [finish()])
        r = srv.client.post("/handoff/api/runs", json={"manifest": m})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        assert wait_status(srv, run_id)["status"] == "completed"
        mode = stat.S_IMODE((srv.root_dir / "handoff-runs" / run_id / m["files"][0]["path"]).stat().st_mode)
        assert mode == 0o775, oct(mode)


def test_a_bad_stored_run_is_failed_and_the_good_runs_still_resume(
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    with JupyterServerProcess() as srv:
        escape = _outside(srv)
        good = hand_off(srv, bdir, manifest, model=_script(tmp_path, [
            {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "go on?"}}]},
            run_python("print('resumed after the answer')"), finish()]))
        assert wait_status(srv, good, ("waiting_input",))["status"] == "waiting_input"
        srv.kill()
        with sqlite3.connect(srv.data_dir / "handoff.sqlite") as db:  # what older servers committed
            for bad in ("../../x", "a/b"):
                db.execute("INSERT INTO runs(id, status, goal, state, created, updated) "
                           "SELECT ?, 'queued', goal, json_set(state, '$.id', ?), created, updated "
                           "FROM runs WHERE id=?", (bad, bad, good))
        srv.start()
        assert srv.client.post(f"/handoff/api/runs/{good}/answer", json={"answer": "yes"}).status_code == 200
        assert wait_status(srv, good)["status"] == "completed"
        with sqlite3.connect(srv.data_dir / "handoff.sqlite") as db:
            for bad in ("../../x", "a/b"):
                status = db.execute("SELECT status FROM runs WHERE id=?", (bad,)).fetchone()[0]
                events = [(t, json.loads(d)) for t, d in db.execute(
                    "SELECT type, data FROM events WHERE run_id=? ORDER BY seq", (bad,))]
                assert status == "failed", (bad, status)
                assert events[0][0] == "error" and "not a valid run id" in events[0][1]["error"], events
        assert _outside(srv) == escape
        assert "resumed after the answer" in json.dumps(all_events(srv, good))
