"""The server-side runner through a real Jupyter Server subprocess and real kernels.

A bundle captured in a real kernel is uploaded chunk by chunk, a run created, and the scripted
(or a loopback fake OpenAI) model drives steps in a fresh kernel that uses the restored state.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest

from tests.harness.fake_llm import FakeLLM
from tests.harness.runner_helpers import (TERMINAL, all_events, capture_bundle, finish, hand_off, run_python,
                                          tool_results, wait_events, wait_status, write_script)
from tests.harness.server_process import JupyterServerProcess, Webhook

SERVER_SECRET = "s3cr3t-value-of-a-service-token"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    travelling_script = [run_python("print('rows:', len(df))"), finish("counted")]
    return capture_bundle(tmp_path_factory.mktemp("local"),
                          files={"agent_script.json": json.dumps(travelling_script)})


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook().start()
    yield hook
    hook.stop()


@pytest.fixture(scope="module")
def srv(llm: FakeLLM, webhook: Webhook) -> Iterator[JupyterServerProcess]:
    env = {**llm.env(), "MY_SERVICE_TOKEN": SERVER_SECRET,
           "HANDOFF_MODEL_RETRIES": "1", "HANDOFF_MODEL_BACKOFF": "0.05"}
    server = JupyterServerProcess(extra_args=["--HandoffApp.max_concurrent_runs=2",
                                              f"--HandoffApp.notify_urls={webhook.url}"], env=env).start()
    try:
        yield server
    finally:
        server.cleanup()


def _notified(webhook: Webhook, goal: str, word: str) -> dict[str, Any]:
    def match(msg: dict[str, Any]) -> bool:
        text = f"{msg.get('title', '')} {msg.get('message', '')}"
        return goal in text and word in text
    return webhook.wait_for(match, f"{word!r} for {goal!r}")


def _scripted(tmp_path: Path, turns: list[dict[str, Any]]) -> str:
    return "scripted:" + str(write_script(tmp_path / "script.json", turns))


def _kernels(srv: JupyterServerProcess) -> list[dict[str, Any]]:
    return srv.client.get("/api/kernels").json()


def _wait_no_kernels(srv: JupyterServerProcess, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _kernels(srv) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kernels(srv) == [], "a finished run left its kernel running"


def _wait_event(srv: JupyterServerProcess, run_id: str, pred: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in all_events(srv, run_id):
            if pred(ev):
                return ev
        time.sleep(0.1)
    raise AssertionError(f"no such event in run {run_id}: {all_events(srv, run_id)[-5:]}")


def test_handed_off_run_uses_restored_state_and_writes_the_result_notebook(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [
        {"text": "I will sum, plot and report.", "tool_calls": [{"name": "update_plan", "arguments": {
            "steps": [{"text": "sum the sales", "status": "active"}, {"text": "plot", "status": "pending"}]}}]},
        run_python("total = float(df['amount'].sum())\nprint('total sales', total)\nlen(notes)",
                   "First the total of the restored DataFrame."),
        run_python("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot(arr)\nplt.show()\n"
                   "with open('report.txt', 'w') as f:\n    f.write(f'total={total}\\n')",
                   "Now a plot of the restored array, and a report file."),
        run_python("1/0", "This one fails on purpose."),
        finish("Total sales are 42; plotted arr and wrote report.txt."),
    ])
    run_id = hand_off(srv, bdir, manifest, model=model)
    summary = wait_status(srv, run_id)
    assert summary["status"] == "completed", summary
    assert summary["summary"].startswith("Total sales are 42")

    events = all_events(srv, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types.index("restore") < types.index("assistant")
    restore = next(e for e in events if e["type"] == "restore")["data"]["report"]
    assert {"df", "arr", "notes", "big"} <= {v["name"] for v in restore["variables"]}
    results = tool_results(events)
    assert "total sales 42.0" in results[0]["content"]
    first = results[0]["execution_count"]  # restore and checkpoints run silently: no gaps in the count
    assert [r["execution_count"] for r in results] == [first, first + 1, first + 2]
    assert any("image/png" in (o.get("data") or {}) for o in results[1]["outputs"])
    assert results[2]["is_error"] and "ZeroDivisionError" in results[2]["content"]
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses[-4:] == ["queued", "restoring", "running", "completed"]
    # the final checkpoint is announced before the terminal status, which is the last event: a
    # client that stops following at "completed" has seen everything
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "completed", events[-3:]
    assert events[-2]["type"] == "checkpoint", events[-3:]

    # checkpoints after every step are incremental: the 1.6 MB array is never sent again
    ckpts = [e["data"] for e in events if e["type"] == "checkpoint"]
    assert len(ckpts) >= 4
    assert all(c["bytes_new"] < 200_000 < c["bytes_total"] for c in ckpts)

    ws = srv.root_dir / "handoff-runs" / run_id
    assert (ws / "sales.csv").read_text().startswith("region,amount")
    assert (ws / "report.txt").read_text() == "total=42.0\n"

    nb = nbformat.read(ws / "result.ipynb", as_version=4)
    nbformat.validate(nb)
    # written before the end was announced: the notebook a "completed" notification links to is final
    assert nb.metadata["handoff"]["status"] == "completed"
    assert nb.metadata["handoff"]["last_seq"] == events[-1]["seq"]
    header = nb.cells[0].source
    assert "analyse the sales" in header and "laptop-1" in header and "analysis.ipynb" in header
    assert "☑" in header or "▶" in header or "☐" in header
    assert "Restore report" in nb.cells[1].source and "| df |" in nb.cells[1].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [first, first + 1, first + 2]
    assert code[0].outputs[0]["text"] == "total sales 42.0\n"
    assert any("image/png" in o.get("data", {}) for o in code[1].outputs)
    assert code[2].outputs[-1]["output_type"] == "error" and code[2].outputs[-1]["ename"] == "ZeroDivisionError"
    assert any(c.cell_type == "markdown" and "Now a plot" in c.source for c in nb.cells)
    assert any(c.cell_type == "markdown" and c.source.startswith("## Summary\n\nTotal sales are 42")
               for c in nb.cells)

    # it opens in JupyterLab on that server, and the contents API reads it as a notebook
    assert srv.client.get(f"/lab/tree/handoff-runs/{run_id}/result.ipynb").status_code == 200
    model_json = srv.client.get(f"/api/contents/handoff-runs/{run_id}/result.ipynb").json()
    assert model_json["type"] == "notebook"

    # the latest checkpoint holds what the agent made; the diff shows it
    ck = srv.client.get(f"/handoff/api/runs/{run_id}/bundle").json()
    assert "total" in {v["name"] for v in ck["variables"]}
    diff = srv.client.get(f"/handoff/api/runs/{run_id}/diff").json()
    report = next(f for f in diff["files"] if f["path"] == "report.txt")
    assert report["change"] == "added" and "+total=42.0" in report["unified_diff"]
    assert {"name": "total", "change": "added"}.items() <= next(
        v for v in diff["variables"] if v["name"] == "total").items()
    _wait_no_kernels(srv)


def test_model_key_comes_from_the_server_and_never_reaches_the_kernel(
        srv: JupyterServerProcess, llm: FakeLLM, bundle: tuple[Path, dict[str, Any]]) -> None:
    bdir, manifest = bundle
    llm.reply("Checking the environment.", tool_calls=[("run_python", {
        "code": "import os, json\nprint(json.dumps(dict(os.environ)))"})])
    llm.reply(tool_calls=[("finish", {"summary": "checked"})])
    n_before = len(llm.requests)
    run_id = hand_off(srv, bdir, manifest, model="openai:fake-model")
    summary = wait_status(srv, run_id)
    assert summary["status"] == "completed", (summary, all_events(srv, run_id)[-4:])

    requests = llm.requests[n_before:]
    assert len(requests) == 2
    assert all(r.headers.get("authorization") == f"Bearer {llm.api_key}" for r in requests)
    out = tool_results(all_events(srv, run_id))[0]["outputs"][0]["text"]
    kernel_env = json.loads(out)
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MY_SERVICE_TOKEN", "JUPYTER_TOKEN"):
        assert name not in kernel_env
    values = set(kernel_env.values())
    assert llm.api_key not in values and SERVER_SECRET not in values and srv.token not in values
    assert srv.token not in out and llm.api_key not in out
    assert kernel_env.get("OPENAI_BASE_URL") == llm.openai_base_url  # harmless settings still pass


def test_three_runs_with_concurrency_two_the_third_queues(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("import time\ntime.sleep(2)\nx = 1"), finish()])
    ids = [hand_off(srv, bdir, manifest, model=model, goal=f"run {i}") for i in range(3)]
    seen = dict.fromkeys(ids, 0)
    deadline = time.monotonic() + 400
    while not all(srv.client.get(f"/handoff/api/runs/{i}").json()["status"] in TERMINAL for i in ids):
        assert time.monotonic() < deadline, {i: all_events(srv, i)[-3:] for i in ids}
        for i in ids:  # woken by the runs' events; the result notebook is valid whenever anyone reads it
            seen[i] = wait_events(srv, i, seen[i], 1.0)
            path = srv.root_dir / "handoff-runs" / i / "result.ipynb"
            if path.exists():
                nbformat.validate(nbformat.read(path, as_version=4))
    final = {i: srv.client.get(f"/handoff/api/runs/{i}").json()["status"] for i in ids}
    assert set(final.values()) == {"completed"}, (final, {i: all_events(srv, i)[-3:] for i in ids},
                                                  srv.log()[-3000:])

    # from the runs' own status events: never more than two active, and one waited queued while two ran
    def t(run_id: str, status: str) -> float:
        return next(e["time"] for e in all_events(srv, run_id)
                    if e["type"] == "status" and e["data"]["status"] == status)
    spans = {i: (t(i, "restoring"), t(i, "completed")) for i in ids}
    created = {i: all_events(srv, i)[0]["time"] for i in ids}
    active_at = {i: [j for j, (s, e) in spans.items() if s <= spans[i][0] < e] for i in ids}   # at each start
    assert all(len(a) <= 2 for a in active_at.values()), spans

    def queued_while_two_ran(k: str) -> bool:
        a, b = (spans[i] for i in ids if i != k)
        return max(created[k], a[0], b[0]) < min(spans[k][0], a[1], b[1])
    assert any(queued_while_two_ran(k) for k in ids), (spans, created)
    # the run that waited started restoring only after another one had completed
    last = max(ids, key=lambda i: spans[i][0])
    assert spans[last][0] >= min(spans[i][1] for i in ids if i != last)


def test_ask_user_waits_for_an_answer_then_continues(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "Which region first?"}}]},
        run_python("region = 'north'\nprint(df[df.region == region].amount.sum())"),
        finish("north done"),
    ])
    run_id = hand_off(srv, bdir, manifest, model=model)
    summary = wait_status(srv, run_id, ("waiting_input",) + ("completed", "failed"))
    assert summary["status"] == "waiting_input" and summary["question"] == "Which region first?"
    time.sleep(0.5)
    assert srv.client.get(f"/handoff/api/runs/{run_id}").json()["status"] == "waiting_input"
    r = srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "north"})
    assert r.status_code == 200, r.text
    assert wait_status(srv, run_id)["status"] == "completed"
    events = all_events(srv, run_id)
    assert any(e["type"] == "answer" and e["data"]["answer"] == "north" for e in events)
    assert tool_results(events)[0]["outputs"][0]["text"] == "10\n"


def test_cancel_interrupts_the_kernel_and_ends_cancelled(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("import time\nfor i in range(600):\n    time.sleep(0.1)"),
                                 finish()])
    run_id = hand_off(srv, bdir, manifest, model=model)
    _wait_event(srv, run_id, lambda e: e["type"] == "tool_call")
    time.sleep(0.5)
    t0 = time.monotonic()
    r = srv.client.post(f"/handoff/api/runs/{run_id}/cancel")
    assert r.status_code == 200, r.text
    assert wait_status(srv, run_id, timeout=30)["status"] == "cancelled"
    assert time.monotonic() - t0 < 15
    # result.ipynb (written off the server's event loop) already shows the end when it is visible
    nb = nbformat.read(srv.root_dir / "handoff-runs" / run_id / "result.ipynb", as_version=4)
    assert nb.metadata["handoff"]["status"] == "cancelled"
    result = tool_results(all_events(srv, run_id))[0]
    assert result["is_error"] and "KeyboardInterrupt" in result["content"]
    _wait_no_kernels(srv)
    assert srv.client.post(f"/handoff/api/runs/{run_id}/cancel").status_code == 409


def test_a_run_cancelled_or_pulled_while_it_is_restored_ends_so_at_once(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """Cancel or pull right after the handoff, while the server is still giving the run its kernel:
    the run ends cancelled / pulled at once (never failed: a cancel that interrupts the restore is
    not a restore failure), no step runs, no kernel is left, and a pull returns the handed-off state."""
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("made_remotely = 1"), finish()])
    cancelled = hand_off(srv, bdir, manifest, model=model)
    assert srv.client.post(f"/handoff/api/runs/{cancelled}/cancel").status_code == 200
    pulled = hand_off(srv, bdir, manifest, model=model)
    r = srv.client.post(f"/handoff/api/runs/{pulled}/pull", json={"timeout": 60})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "pulled"
    assert {v["name"] for v in body["manifest"]["variables"]} == {v["name"] for v in manifest["variables"]}
    for run_id, end in ((cancelled, "cancelled"), (pulled, "pulled")):
        assert wait_status(srv, run_id, timeout=60)["status"] == end
        events = all_events(srv, run_id)
        statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
        assert statuses[-1] == end and "failed" not in statuses, statuses
        assert not tool_results(events), "no step ran after the cancel / pull"
        # its kernel was still booting (no warm spare here): the bundle was never copied into it
        # and restored there for nothing
        assert "restore" not in [e["type"] for e in events]
    _wait_no_kernels(srv)


def test_pull_pauses_at_the_step_boundary_and_returns_the_checkpoint(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("import time\ntime.sleep(1.5)\nmade_remotely = 7"),
                                 run_python("never_run = 1"), finish()])
    run_id = hand_off(srv, bdir, manifest, model=model)
    _wait_event(srv, run_id, lambda e: e["type"] == "tool_call")
    box: dict[str, Any] = {}
    th = threading.Thread(target=lambda: box.update(r=srv.client.post(
        f"/handoff/api/runs/{run_id}/pull", json={"timeout": 60})))
    th.start()
    th.join(90)
    r = box["r"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "pulled"
    names = {v["name"] for v in body["manifest"]["variables"]}
    assert "made_remotely" in names and "never_run" not in names and "df" in names
    missing = srv.client.post("/handoff/api/blobs/missing", json={"shas": list(body["manifest"]["chunks"])})
    assert missing.json()["missing"] == []  # every chunk of the checkpoint is downloadable
    types = [e["type"] for e in all_events(srv, run_id)]
    assert types[-1] == "status" and "pull" in types
    _wait_no_kernels(srv)



def test_model_faults_pause_for_input_with_a_message_and_notify(
        srv: JupyterServerProcess, llm: FakeLLM, webhook: Webhook, bundle: tuple[Path, dict[str, Any]]) -> None:
    bdir, manifest = bundle
    llm.fault_500()
    llm.fault_500()  # the first call and its one retry both fail
    run_id = hand_off(srv, bdir, manifest, model="openai:fake-model", goal="flaky model goal")
    summary = wait_status(srv, run_id, ("waiting_input", "completed", "failed"))
    assert summary["status"] == "waiting_input"
    assert "HTTP 500" in summary["question"] and "retry" in summary["question"]
    _notified(webhook, "flaky model goal", "input")
    llm.reply(tool_calls=[("finish", {"summary": "worked on the second try"})])
    assert srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "retry"}).status_code == 200
    summary = wait_status(srv, run_id)
    assert summary["status"] == "completed" and summary["summary"] == "worked on the second try"
    _notified(webhook, "flaky model goal", "complete")


def test_a_relative_scripted_model_travels_as_a_working_file(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]]) -> None:
    bdir, manifest = bundle
    run_id = hand_off(srv, bdir, manifest, model="scripted:agent_script.json")
    summary = wait_status(srv, run_id)
    assert summary["status"] == "completed" and summary["summary"] == "counted", summary
    assert "rows: 2" in tool_results(all_events(srv, run_id))[0]["content"]


def test_a_queued_run_can_be_cancelled_before_it_starts(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("import time\ntime.sleep(3)"), finish()])
    busy = [hand_off(srv, bdir, manifest, model=model) for _ in range(2)]
    queued = hand_off(srv, bdir, manifest, model=model)
    assert srv.client.get(f"/handoff/api/runs/{queued}").json()["status"] == "queued"
    assert srv.client.post(f"/handoff/api/runs/{queued}/cancel").status_code == 200
    assert wait_status(srv, queued, timeout=20)["status"] == "cancelled"
    assert [e["data"]["status"] for e in all_events(srv, queued) if e["type"] == "status"] == ["queued", "cancelled"]
    assert not (srv.root_dir / "handoff-runs" / queued / "result.ipynb").exists()  # it never ran
    assert all(wait_status(srv, i)["status"] == "completed" for i in busy)


def _blob_bytes(srv: JupyterServerProcess) -> int:
    return sum(f.stat().st_size for f in (srv.data_dir / "blobs").rglob("*") if f.is_file())


def test_gc_frees_old_checkpoints_but_keeps_handoff_and_latest_and_no_server_files_travel(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from jupyter_server_ext.runner import main as runner_main
    bdir, manifest = bundle
    step = "import numpy as np\nx = np.random.default_rng().random(100_000)  # 800 kB, new every step"
    model = _scripted(tmp_path, [run_python(step)] * 5 + [finish("made x five times")])
    run_id = hand_off(srv, bdir, manifest, model=model)
    assert wait_status(srv, run_id)["status"] == "completed"
    ws = srv.root_dir / "handoff-runs" / run_id
    assert (ws / "result.ipynb").exists()

    latest = srv.client.get(f"/handoff/api/runs/{run_id}/bundle").json()
    assert "result.ipynb" not in {f["path"] for f in latest["files"]}  # the server's report stays here
    diff = srv.client.get(f"/handoff/api/runs/{run_id}/diff").json()
    assert "result.ipynb" not in {f["path"] for f in diff["files"]}
    deadline = time.monotonic() + 20  # removed right after the kernel is shut down
    while (ws / ".handoff" / "ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (ws / ".handoff" / "ckpt").exists()  # a finished run's checkpoint links are gone

    before = _blob_bytes(srv)
    assert runner_main(["gc", "--data-dir", str(srv.data_dir), "--min-age", "0"]) == 0
    freed = before - _blob_bytes(srv)
    assert freed >= 3 * 700_000, f"gc freed only {freed} bytes of the four superseded x arrays"
    for m in (latest, manifest):  # the latest checkpoint and the handoff bundle stay whole
        missing = srv.client.post("/handoff/api/blobs/missing", json={"shas": list(m["chunks"])}).json()
        assert missing["missing"] == []
    assert srv.client.get(f"/handoff/api/runs/{run_id}/diff").status_code == 200


def test_a_browser_can_attach_to_a_busy_run_kernel_and_open_the_result_notebook(
        srv: JupyterServerProcess, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """JupyterLab's kernel list lets a user attach to the run's kernel. While an agent step
    runs, the kernel cannot answer the websocket handshake's kernel_info, and a client that
    gave up made the server log a 500 ('NoneType' object has no attribute 'kernel_ws_protocol')."""
    import asyncio
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect
    bdir, manifest = bundle
    # busy until the test has attached (the file appears in the run's workspace, the kernel's cwd)
    model = _scripted(tmp_path, [run_python("import os, time\nBUSY = 1\nwhile not os.path.exists('attached'):\n"
                                            "    time.sleep(0.05)"), finish("slept")])
    run_id = hand_off(srv, bdir, manifest, model=model)
    _wait_event(srv, run_id, lambda e: e["type"] == "tool_call")
    time.sleep(0.5)
    ours = {k["id"] for k in _kernels(srv)}
    assert ours

    async def attach(kid: str, timeout: float = 3) -> str:
        url = srv.url.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels?session_id=lab-{kid[:8]}"
        req = HTTPRequest(url, headers={"Authorization": f"token {srv.token}"}, request_timeout=timeout)
        ws = await websocket_connect(req)
        ws.close()
        return "attached"

    for kid in ours:  # the handshake completes at once although the kernel is busy
        assert asyncio.run(attach(kid)) == "attached"
    (srv.root_dir / "handoff-runs" / run_id / "attached").touch()
    # and the result notebook opens as Lab opens it: a session of its own with a fresh kernel
    path = f"handoff-runs/{run_id}/result.ipynb"
    r = srv.client.post("/api/sessions", json={"path": path, "name": "result.ipynb", "type": "notebook",
                                               "kernel": {"name": "python3"}})
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["kernel"]["id"] not in ours
    # a kernel just started answers once it is up: that may take a while on a loaded machine
    assert asyncio.run(attach(session["kernel"]["id"], timeout=60)) == "attached"
    assert wait_status(srv, run_id)["status"] == "completed"
    srv.client.delete(f"/api/sessions/{session['id']}")
    assert "kernel_ws_protocol" not in srv.log() and "Uncaught exception GET /api/kernels" not in srv.log()
    _wait_no_kernels(srv)


def _ws_run(srv: JupyterServerProcess, kid: str, code: str, timeout: float = 30) -> str:
    """Execute ``code`` in a server kernel over its websocket (as a browser does); its stdout."""
    import asyncio
    import uuid as _uuid
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def go() -> str:
        url = srv.url.replace("http", "ws", 1) + f"/api/kernels/{kid}/channels?session_id=test"
        ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {srv.token}"}))
        msg_id = _uuid.uuid4().hex
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": "test",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        out = []
        while True:
            raw = await asyncio.wait_for(ws.read_message(), timeout)
            assert raw is not None, "the kernel websocket closed"
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                ws.close()
                return "".join(out)
    return asyncio.run(go())


def test_server_model_overrides_the_runs_own_and_keep_kernel_keeps_the_finished_kernel(
        llm: FakeLLM, bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    bdir, manifest = bundle
    env = {**llm.env(), "HANDOFF_MODEL_RETRIES": "1", "HANDOFF_MODEL_BACKOFF": "0.05"}
    with JupyterServerProcess(extra_args=["--HandoffApp.model=openai:fake-model",
                                          "--HandoffApp.keep_kernel=True"], env=env) as server:
        llm.reply("Using the server's model.", tool_calls=[("run_python", {"code": "made_remotely = len(df) * 21"})])
        llm.reply(tool_calls=[("finish", {"summary": "the server model did it"})])
        n_before = len(llm.requests)
        own = _scripted(tmp_path, [finish("the run's own scripted model did it")])  # must NOT be used
        run_id = hand_off(server, bdir, manifest, model=own)
        summary = wait_status(server, run_id)
        assert summary["status"] == "completed", (summary, all_events(server, run_id)[-4:])
        assert summary["summary"] == "the server model did it"
        requests = llm.requests[n_before:]
        assert len(requests) == 2 and all(r.headers.get("authorization") == f"Bearer {llm.api_key}"
                                          for r in requests)
        nb = nbformat.read(server.root_dir / "handoff-runs" / run_id / "result.ipynb", as_version=4)
        assert "| Model | openai:fake-model |" in nb.cells[0].source

        # keep_kernel: the finished run's kernel stays, with the agent's variables in it
        time.sleep(1.5)  # past the run's cleanup
        kernels = _kernels(server)
        assert len(kernels) == 1, kernels
        assert _ws_run(server, kernels[0]["id"], "print(made_remotely)").strip() == "42"


def test_a_warm_kernel_takes_the_handoff_and_a_new_one_is_booted(
        bundle: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """c.HandoffApp.warm_kernels=1: a spare kernel booted ahead of time takes the next run (in
    the run's own directory, with the restored state), and another spare is booted for the next."""
    bdir, manifest = bundle
    model = _scripted(tmp_path, [run_python("import os\nprint(os.getcwd(), len(df))"), finish()])
    # a spare kernel cannot be sandboxed in a workspace that does not exist yet: warm kernels
    # are for unsandboxed servers (c.HandoffApp.sandbox = "none")
    with JupyterServerProcess(extra_args=["--HandoffApp.warm_kernels=1",
                                          "--HandoffApp.sandbox=none"]) as server:
        deadline = time.monotonic() + 60
        while not _kernels(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        spare = {k["id"] for k in _kernels(server)}
        assert len(spare) == 1, "no spare kernel was booted"
        for _ in range(2):
            run_id = hand_off(server, bdir, manifest, model=model)
            assert wait_status(server, run_id)["status"] == "completed"
            out = tool_results(all_events(server, run_id))[0]["outputs"][0]["text"]
            assert out.strip() == f"{server.root_dir / 'handoff-runs' / run_id} 2", out
            deadline = time.monotonic() + 30  # the run's (formerly spare) kernel is shut down
            while spare & {k["id"] for k in _kernels(server)} and time.monotonic() < deadline:
                time.sleep(0.1)
            now = {k["id"] for k in _kernels(server)}
            assert not spare & now, "the spare kernel was not the one the run used"
            assert len(now) == 1, now  # the next spare
            spare = now
