"""Helpers for the runner tests: a bundle captured in a real kernel, uploaded chunk by chunk.

The bundle is captured once per test module (a real ipykernel started with jupyter_client runs
``handoff_magic.save_state``); each test then hands it off with its own scripted model by
editing only the JSON run state in the manifest, exactly what a client could send.
"""
from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from jupyter_client.manager import start_new_kernel

from handoff_magic.chunks import shard_path

TERMINAL = ("completed", "failed", "cancelled", "pulled")

CAPTURE_CODE = """
import numpy as np, pandas as pd
arr = np.arange(10.0)
big = np.random.default_rng(0).random(200_000)
df = pd.read_csv('sales.csv')
notes = ['clean', 'fit']
from handoff_magic.state import RunState, Message, PlanStep
import handoff_magic
run = RunState(goal='analyse the sales', plan=[PlanStep('sum the sales', 'active')],
               messages=[Message(role='user', text='analyse the sales')])
run.origin.host = 'laptop-1'
run.origin.notebook_path = 'analysis.ipynb'
_rep = handoff_magic.save_state({bundle!r}, run=run)
print('CAPTURED', _rep.bytes_total)
"""


def capture_bundle(workdir: Path, files: dict[str, str] | None = None) -> tuple[Path, dict[str, Any]]:
    """Capture df/arr/notes and sales.csv (plus ``files``) from a real kernel; returns
    (bundle dir, manifest)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sales.csv").write_text("region,amount\nnorth,10\nsouth,32\n")
    for name, text in (files or {}).items():
        (workdir / name).write_text(text)
    bundle = workdir / "bundle"
    km, kc = start_new_kernel(cwd=str(workdir))
    out: list[str] = []
    try:
        reply = kc.execute_interactive(
            CAPTURE_CODE.format(bundle=str(bundle)), timeout=120,
            output_hook=lambda m: out.append(m["content"].get("text", "") or m["content"].get("evalue", "")))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", "".join(out)
    return bundle, json.loads((bundle / "manifest.json").read_text())


def write_script(path: Path, turns: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(turns))
    return path


def scripted_model(folder: Path, turns: list[dict[str, Any]]) -> str:
    """A ``scripted:`` model spec playing ``turns``, written into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    return "scripted:" + str(write_script(folder / "script.json", turns))


def run_python(code: str, text: str = "") -> dict[str, Any]:
    return {"text": text, "tool_calls": [{"name": "run_python", "arguments": {"code": code}}]}


def finish(summary: str = "done") -> dict[str, Any]:
    return {"text": "", "tool_calls": [{"name": "finish", "arguments": {"summary": summary}}]}


def hand_off(srv: Any, bundle: Path, manifest: dict[str, Any], model: str | None = None,
             goal: str | None = None) -> str:
    """PUT every chunk the server lacks (one request per chunk), POST the run; returns its id."""
    m = copy.deepcopy(manifest)
    m["run"]["id"] = uuid.uuid4().hex[:12]
    if model is not None:
        m["run"]["model"] = model
    if goal is not None:
        m["run"]["goal"] = goal
    c = srv.client
    missing = c.post("/handoff/api/blobs/missing", json={"shas": list(m["chunks"])}).json()["missing"]
    for sha in missing:
        r = c.put(f"/handoff/api/blobs/{sha}", content=(shard_path(bundle / "chunks", sha)).read_bytes())
        assert r.status_code in (200, 201, 204), r.text
    r = c.post("/handoff/api/runs", json={"manifest": m, "idempotency_key": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_status(srv: Any, run_id: str, statuses: tuple[str, ...] = TERMINAL,
                timeout: float = 240) -> dict[str, Any]:
    """The run's summary once its status is one of ``statuses``. Woken by the run's own events
    (the server's long-poll), so a loaded machine only makes it wait longer, never miss a state."""
    deadline = time.monotonic() + timeout
    after = 0
    while True:
        summary = srv.client.get(f"/handoff/api/runs/{run_id}").json()
        if summary["status"] in statuses:
            return summary
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"run {run_id} is {summary['status']} after {timeout}s, not {statuses}:\n"
                                 f"{srv.log()[-3000:]}")
        after = wait_events(srv, run_id, after, min(left, 10.0))


def wait_events(srv: Any, run_id: str, after: int, timeout: float) -> int:
    """Block until the run has an event after ``after`` (or ``timeout`` s); the newest seq seen."""
    events = srv.client.get(f"/handoff/api/runs/{run_id}/events",
                            params={"after": after, "timeout": timeout}).json()["events"]
    return int(events[-1]["seq"]) if events else after


def wait_event(srv: Any, run_id: str, match: Callable[[dict[str, Any]], bool], what: str = "matching event",
               timeout: float = 240) -> dict[str, Any]:
    """The run's first event ``match`` accepts, waiting on the events long-poll (woken by each new one)."""
    after, deadline = 0, time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        events = srv.client.get(f"/handoff/api/runs/{run_id}/events",
                                params={"after": after, "timeout": min(left, 10.0)}).json()["events"]
        for e in events:
            if match(e):
                return dict(e)
            after = e["seq"]
    raise AssertionError(f"no {what} in {timeout}s: {all_events(srv, run_id)[-4:]}")


def all_events(srv: Any, run_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        r = srv.client.get(f"/handoff/api/runs/{run_id}/events",
                           params={"after": out[-1]["seq"] if out else 0, "timeout": 0}).json()
        if not r["events"]:
            return out
        out.extend(r["events"])


def tool_results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == "tool_result" and e["data"].get("name") == "run_python"]
