"""The whole journey with a real Jupyter Server subprocess and real local kernels.

handoff → local kernel killed → remote completion → notifications (loopback webhook + aiosmtpd)
→ reattach from a new kernel → diff → pull back (with a local file conflict) → local continue;
--fork keeps a usable local run; a second handoff uploads only what changed (PUTs counted at the
socket level by a loopback proxy); input required → answer → completion; clear errors with the
local run intact for a dead server, a wrong token and a too-large bundle.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from handoff_magic.remote.http import HandoffClient
from handoff_magic.demo import JOURNEY_SCRIPT, Kernel, WebhookReceiver, output_text
from tests.harness.server_process import JupyterServerProcess, Mailbox, free_port
from tests.harness.cutting_proxy import CuttingProxy

pytestmark = pytest.mark.slow


def mail_text(envelope: Any) -> str:
    """Subject and text parts of a received mail, decoded (headers may be RFC 2047 encoded)."""
    from email import message_from_bytes, policy
    mail = message_from_bytes(envelope.content, policy=policy.default)
    parts = [str(mail["Subject"])]
    parts += [p.get_content() for p in mail.walk() if p.get_content_type() == "text/plain"]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def webhook():
    w = WebhookReceiver()
    yield w
    w.close()


@pytest.fixture(scope="module")
def mailbox():
    box = Mailbox()
    port = free_port()
    smtp = Controller(box, hostname="127.0.0.1", port=port)
    smtp.start()
    box.url = f"mailto://127.0.0.1:{port}?from=handoff@example.org&to=ada@example.org"
    yield box
    smtp.stop()


BUNDLE_LIMIT = 40_000_000   # the module server refuses bundles over 40 MB


@pytest.fixture(scope="module")
def cloud(webhook, mailbox):
    """One server for the module; runs use their own (scripted) model preference."""
    srv = JupyterServerProcess(extra_args=[f"--HandoffApp.max_bundle_bytes={BUNDLE_LIMIT}",
                                           f"--HandoffApp.notify_urls={webhook.apprise_url}",
                                           f"--HandoffApp.notify_urls={mailbox.url}"]).start()
    CLOUD_LOG[:] = [srv]
    yield srv
    srv.cleanup()


def script(tmp: Path, turns: list[dict[str, Any]]) -> str:
    path = tmp / "script.json"
    path.write_text(json.dumps(turns))
    return f"scripted:{path}"


def py(code: str) -> dict[str, Any]:
    return {"name": "run_python", "arguments": {"code": code}}


class Laptop:
    """A real local kernel in a working dir, configured for the cloud through the environment."""

    def __init__(self, cwd: Path, cloud: JupyterServerProcess, model: str, url: str | None = None) -> None:
        import os
        env = dict(os.environ)
        env.update({"HANDOFF_SERVER_URL": url or cloud.url, "HANDOFF_TOKEN": cloud.token,
                    "HANDOFF_MODEL": model, "HANDOFF_CACHE_DIR": str(cwd.parent / "cache"),
                    "MPLBACKEND": "Agg"})
        cwd.mkdir(parents=True, exist_ok=True)
        self.kernel = Kernel(cwd, env, log=cwd.parent / f"{cwd.name}-kernel.log")

    def ok(self, code: str, timeout: float = 120) -> str:
        status, outputs = self.kernel.run(code, timeout=timeout)
        text = output_text(outputs)
        assert status == "ok", f"{code!r} failed:\n{text}"
        return text

    def fails(self, code: str, timeout: float = 120) -> str:
        status, outputs = self.kernel.run(code, timeout=timeout)
        text = output_text(outputs)
        assert status == "error", f"{code!r} should have failed, printed:\n{text}"
        return text

    def value(self, expr: str) -> Any:
        out = self.ok(f"import json as _j\nprint('@@' + _j.dumps({expr}))")
        return json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("@@"))[2:])

    def run_state(self) -> dict[str, Any]:
        return self.value("(lambda r: {'id': r.id, 'status': r.status, 'steps': r.state.steps, "
                          "'messages': len(r.state.messages), 'plan': [p.status for p in r.state.plan], "
                          "'remote': getattr(r.remote, 'run_id', None)})"
                          "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")

    def kill(self) -> None:
        self.kernel.kill()


CLOUD_LOG: list[Any] = []   # the module's server, so failures can show its log


def wait_status(client: HandoffClient, run_id: str, statuses: set[str], timeout: float = 120) -> dict:
    after, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.events(run_id, after=after, timeout=5)
        after = page["last_seq"]
        if page["status"] in statuses:
            return client.get_run(run_id)
    log = CLOUD_LOG[0].log()[-4000:] if CLOUD_LOG else ""
    raise AssertionError(f"run {run_id} never reached {statuses}: {client.get_run(run_id)}\n{log}")


@pytest.fixture
def client(cloud):
    with HandoffClient(cloud.url, cloud.token) as c:
        yield c


def test_full_journey_handoff_kill_notify_reattach_diff_pull_continue(cloud, client, webhook, mailbox, tmp_path):
    laptop_dir = tmp_path / "laptop"
    a = Laptop(laptop_dir, cloud, f"scripted:{JOURNEY_SCRIPT}")
    try:
        a.ok("%load_ext handoff_magic")
        a.ok("%agent --max-steps 2 Clean the sales export and fit a model")
        before = a.run_state()
        assert before["status"] == "paused" and before["steps"] == 2
        t0 = time.perf_counter()
        out = a.ok("%handoff")
        prompt_back = time.perf_counter() - t0
        after = a.run_state()
        run_id = after["remote"]
        assert after["status"] == "handed_off" and run_id, out
        assert run_id in out, out
        # the upload bar went away once the upload was done (it must not sit there for the whole run)
        assert a.value("__import__('handoff_magic.local.run', fromlist=['x']).current_run()"
                       ".widget._progress.layout.display") == "none"
    finally:
        a.kill()  # the laptop closes right after the prompt came back
    assert prompt_back < 30

    # a local edit while the run is away: the pull must not overwrite it
    (laptop_dir / "report.md").write_text("my own notes\n")

    done = wait_status(client, run_id, {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["steps"] == 5 and all(p["status"] == "done" for p in done["plan"])
    hook = webhook.wait(lambda i: run_id in json.dumps(i["payload"]), timeout=60)["payload"]
    assert "completed" in hook["message"] and f"/handoff/runs/{run_id}" in hook["message"]
    deadline = time.monotonic() + 30
    while not any(run_id in mail_text(m) for m in mailbox.messages):
        assert time.monotonic() < deadline, \
            f"no mail about the run ({len(mailbox.messages)} mails)\n{cloud.log()[-3000:]}"
        time.sleep(0.2)

    b = Laptop(laptop_dir, cloud, f"scripted:{JOURNEY_SCRIPT}")
    try:
        b.ok("%load_ext handoff_magic")
        listing = b.ok("%reattach")
        assert run_id in listing and "completed" in listing
        view = b.ok(f"%reattach {run_id}")
        assert "completed" in view.lower() and "5/5" in view, view
        assert b.value("len(__import__('handoff_magic.remote.journey', fromlist=['x']).LAST_REATTACH.state.events)") \
            == client.get_run(run_id)["last_seq"], "the widget was rebuilt from the whole event log"

        diff = client.diff(run_id)
        files = {f["path"]: f for f in diff["files"]}
        assert "report.md" in files
        names = {v["name"] for v in diff["variables"]}
        assert {"model", "r2", "mae"} <= names
        shown = b.ok(f"from handoff_magic.remote import review_diff\nprint(review_diff({run_id!r}))")
        assert "report.md" in shown and "r2" in shown

        # Pull back from the reattached view: it becomes the view of the run now living here
        pulled = b.ok("from handoff_magic.remote.journey import LAST_REATTACH\nw = LAST_REATTACH.widget\n"
                      "w.buttons['pull'].click()\nprint(w._message.value)")
        assert f"pulled run {run_id}" in pulled.lower(), pulled   # the report, shown in the widget
        assert "report.md" in pulled and ".remote" in pulled, pulled
        assert "Pulled back into this kernel" in pulled and 'data-level="error"' not in pulled, pulled
        view_after = b.value("(lambda r: {'controller_is_run': w.controller is r, 'status': w.status, "
                             "'header': w._header.value, 'pull': w.buttons['pull'].disabled, "
                             "'reattach': w.buttons['reattach'].disabled, 'run_widget': r.widget is w})"
                             "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")
        assert view_after["controller_is_run"] and view_after["run_widget"], view_after
        assert view_after["status"] == "completed" and "local · run" in view_after["header"], view_after
        assert view_after["pull"] and view_after["reattach"], "Pull back/Reattach are done once pulled"
        assert (laptop_dir / "report.md").read_text() == "my own notes\n"
        assert "Sales model" in (laptop_dir / "report.md.remote").read_text()
        r2 = b.value("r2")
        assert 0.5 < r2 < 1.0
        assert b.value("list(clean.shape)") == [1985, 5]
        state = b.run_state()
        assert state["status"] == "completed" and state["steps"] == 5 and state["plan"] == ["done"] * 5
        assert state["messages"] >= 10, "the remote conversation came back"

        b.ok('%agent continue "Which inputs drive sales most?"')
        final = b.run_state()
        assert final["status"] == "completed" and final["steps"] == 7
        assert b.value("list(drivers.index[:1])") == ["ad_spend"]
    finally:
        b.kill()
    result = cloud.root_dir / "handoff-runs" / run_id / "result.ipynb"
    assert result.is_file()


def test_fork_second_handoff_only_changed_chunks_and_answer(cloud, client, webhook, tmp_path):
    model = script(tmp_path, [
        {"text": "data", "tool_calls": [py("import numpy as np\nbig = np.random.default_rng(0).random(1_250_000)\n"
                                           "small = 1")]},
        {"text": "asking", "tool_calls": [{"name": "ask_user", "arguments": {"question": "Which metric?"}}]},
        {"text": "using it", "tool_calls": [py("metric_used = small + 1")]},
        {"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "used the metric"}}]},
    ])
    proxy = CuttingProxy(cloud.port, cuts=0)
    a = Laptop(tmp_path / "laptop", cloud, model, url=proxy.url)
    try:
        a.ok("%load_ext handoff_magic")
        a.ok("%agent --max-steps 1 make data and ask me")
        a.ok("%handoff --fork")
        first_puts = proxy.puts
        first = a.value("__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()")
        r1 = first["run_id"]
        local = a.run_state()
        assert local["status"] == "paused" and local["remote"] is None, "--fork leaves the local run here"

        a.ok("small = 2")
        a.ok("%handoff --fork")
        second = a.value("__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()")
        second_puts = proxy.puts - first_puts
        assert first_puts >= 3, "10 MB travels in several chunks"
        assert 1 <= second_puts <= 2, f"second handoff sent {second_puts} chunks"
        assert second["timings"]["bytes_sent"] < 0.05 * first["timings"]["bytes_sent"]
        r2 = second["run_id"]
        assert r2 != r1

        # the forked local run goes on here, independently
        a.ok("%agent continue")
        assert a.run_state()["status"] == "waiting_input"
        a.ok('%agent continue "rmse"')   # --max-steps 1 holds for every resume: one step, then paused
        assert a.value("metric_used") == 3
        a.ok("%agent continue")
        assert a.run_state()["status"] == "completed"

        # the remote fork asks too: the notification says so; answer through a RemoteRun
        waiting = wait_status(client, r1, {"waiting_input"})
        assert waiting["question"] == "Which metric?"
        hook = webhook.wait(lambda i: r1 in json.dumps(i["payload"]) and "Which metric?" in json.dumps(i["payload"]),
                            timeout=60)
        assert hook
        a.ok(f"from handoff_magic.remote import reattach\nrr = reattach({r1!r}, display=False)\nrr.answer('mae')\n"
             "rr.wait({'completed', 'failed'}, timeout=90)")
        assert a.value("rr.status") == "completed"
        # `rr` holds a client with the token: a snapshot skips it and carries no token
        a.ok("from handoff_magic import save_state\nrep = save_state('snap-with-rr')\n"
             "print([v.outcome for v in rep.variables if v.name == 'rr'])")
        snap = tmp_path / "laptop" / "snap-with-rr"
        assert all(cloud.token.encode() not in f.read_bytes() for f in snap.rglob("*") if f.is_file())
        assert a.value("[v.outcome for v in rep.variables if v.name == 'rr']") == ["skipped"]
        assert client.get_run(r1)["status"] == "completed"
        events = client.events(r1, after=0, timeout=0)["events"]
        assert any(e["type"] == "answer" and e["data"].get("answer") == "mae" for e in events)

        # pull the other fork back while it waits: it lands as a run of its own, still asking
        wait_status(client, r2, {"waiting_input"})
        a.ok(f"%pull {r2}")
        assert client.get_run(r2)["status"] == "pulled"
        pulled = a.run_state()
        assert pulled["id"] != local["id"] and pulled["status"] == "waiting_input"
        assert a.value(f"__import__('handoff_magic.local.run', fromlist=['x']).RUNS[{local['id']!r}].status") \
            == "completed", "the forked local run was not touched by the pull"
        assert a.value("small") == 2
        a.ok('%agent continue "f1"')
        done_here = a.run_state()
        assert done_here["status"] == "completed" and done_here["steps"] == 4
    finally:
        a.kill()
        proxy.close()


def test_background_run_pauses_at_step_boundary_for_handoff(cloud, client, tmp_path):
    model = script(tmp_path, [
        {"text": "slow", "tool_calls": [py(  # lasts until %handoff asks for the pause
            "import time\nruns = __import__('handoff_magic.local.run', fromlist=['RUNS']).RUNS.values()\n"
            "while not any(r.pause_requested for r in runs):\n    time.sleep(0.05)\ndel runs\na = 1")]},
        {"text": "next", "tool_calls": [py("b = a + 1")]},
        {"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "b is ready"}}]},
    ])
    a = Laptop(tmp_path / "laptop", cloud, model)
    try:
        a.ok("%load_ext handoff_magic")
        a.ok("%agent --background compute b")
        a.ok("%handoff")  # waits for the running step to end, then hands off
        state = a.run_state()
        assert state["status"] == "handed_off" and state["steps"] == 1
        run_id = state["remote"]
        assert wait_status(client, run_id, {"completed", "failed"})["status"] == "completed"
        report = a.ok(f"%pull {run_id}")
        assert a.value("b") == 2 and a.run_state()["status"] == "completed"
        assert "the run had completed" in report and "%agent continue goes on here" not in report
        assert f"Restored run {run_id} from {cloud.url}" in report and ".cache" not in report
        local_id = a.run_state()["id"]
        twice = a.fails(f"%pull {run_id}")
        assert "already pulled back into this kernel" in twice and f"%pull {run_id} --again" in twice
        a.ok(f"%pull {run_id} --again")
        assert a.run_state()["id"] == local_id, "a re-pull refreshes the same local run, no new id"
        bad = a.fails("%pull ../../etc")
        assert "'../../etc' is not a valid run id" in bad and "no jupyter-handoff API" not in bad
    finally:
        a.kill()


def test_errors_are_clear_and_leave_the_local_run_intact(cloud, client, tmp_path):
    model = script(tmp_path, [{"text": "x", "tool_calls": [py("import os\npayload = os.urandom(45_000_000)")]},
                              {"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "ok"}}]}])
    proxy = CuttingProxy(cloud.port, cuts=0)
    a = Laptop(tmp_path / "laptop", cloud, model)
    try:
        a.ok("%load_ext handoff_magic")
        a.ok("%agent --max-steps 1 make a payload")
        before = a.run_state()
        runs_before = {r["id"] for r in client.list_runs()}

        dead = a.fails(f"%handoff --to http://127.0.0.1:{free_port()}")
        assert "cannot reach" in dead and "is the server running" in dead and "HANDOFF_SERVER_URL" in dead
        assert a.run_state() == before

        refused = a.fails("%handoff --token not-the-token")
        assert "refused the token" in refused and "HANDOFF_TOKEN" in refused
        assert a.run_state() == before

        # another URL needs its own token: HANDOFF_TOKEN belongs to HANDOFF_SERVER_URL only
        big = a.fails(f"%handoff --to {proxy.url} --token {cloud.token}")  # 45 MB over the 40 MB limit
        assert "limit" in big and "max_bundle_bytes" in big, big
        assert proxy.puts == 0, "a bundle the server refuses is not uploaded first"
        assert a.run_state() == before
        assert {r["id"] for r in client.list_runs()} == runs_before, "no run was created"

        # and the run is still usable here
        a.ok("%agent continue")
        assert a.run_state()["status"] == "completed"
    finally:
        a.kill()
        proxy.close()
