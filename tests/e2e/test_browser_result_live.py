"""An open result.ipynb follows its live run in the cloud's JupyterLab, and opening it starts no kernel.

A run on the cloud is held inside its second step (the kernel waits for a file the test writes
into the run's workspace) while the test opens the run's result-notebook link in Chromium; then
the run goes on. The server rewrites result.ipynb atomically when a step's code starts and after
every step, and
jupyter-collaboration's file watcher loads each rewrite into the shared document, so the open
notebook shows the later steps' cells without a reload and without a "File Changed" dialog.
The page opened by that link starts no kernel, in JupyterLab and in Notebook 7 (the server's
other pages still do).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_browser import UI_TIMEOUT, expect
from tests.harness.browser_harness import cloud_lab_url, shot
from tests.harness.runner_helpers import TERMINAL, capture_bundle, finish, hand_off, run_python, wait_status
from tests.harness.server_process import JupyterServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HELD = ("import time\nfrom pathlib import Path\n"
        "while not Path('go-on').exists():\n    time.sleep(0.05)  # until the test has the notebook open\n"
        "print('STEP-TWO ran after the notebook was opened')")


def _page_option(page: Any, name: str) -> Any:
    return page.evaluate(f"JSON.parse(document.getElementById('jupyter-config-data').textContent)[{name!r}]")


def _result_sessions(cloud: JupyterServerProcess) -> list[dict[str, Any]]:
    return [s for s in cloud.client.get("/api/sessions").json() if s["path"].endswith("result.ipynb")]


def test_open_result_notebook_follows_the_live_run(browser: Any, cloud: JupyterServerProcess,
                                                   tmp_path: Path) -> None:
    bdir, manifest = capture_bundle(tmp_path / "local")
    script = tmp_path / "live.json"
    script.write_text(json.dumps([
        run_python("print('STEP-ONE loaded', len(df), 'rows')", "Loading the sales."),
        run_python(HELD, "Waiting for the reader."),
        run_python("total = int(df['amount'].sum())\nprint('STEP-THREE total', total)", "Totalling."),
        finish("LIVE-SUMMARY: the total is 42."),
    ]))
    run_id = hand_off(cloud, bdir, manifest, model=f"scripted:{script}")
    workspace = cloud.root_dir / "handoff-runs" / run_id
    events_url = f"/handoff/api/runs/{run_id}/events"
    # the run is inside its held step once that step's code went to the kernel (events long-poll)
    deadline, after, held = time.monotonic() + 180, 0, False
    while not held:
        assert time.monotonic() < deadline, f"the run never reached its held step:\n{cloud.log()[-3000:]}"
        for e in cloud.client.get(events_url, params={"after": after, "timeout": 10}).json()["events"]:
            after = e["seq"]
            held = held or (e["type"] == "tool_call" and "go-on" in json.dumps(e["data"]))
            assert not (e["type"] == "status" and e["data"].get("status") in TERMINAL), e

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))   # a native confirm() would land here
    ex = expect()
    try:
        page.goto(cloud_lab_url(cloud, f"lab/tree/handoff-runs/{run_id}/result.ipynb"))
        panel = page.locator(".jp-NotebookPanel:visible")
        outputs = panel.locator(".jp-OutputArea-output")
        ex(outputs.filter(has_text="STEP-ONE loaded 2 rows")).to_have_count(1)
        # the step running now is there too: its words and code, no output yet
        ex(panel.locator(".jp-RenderedMarkdown", has_text="Waiting for the reader.")).to_be_visible()
        held = panel.locator(".jp-CodeCell", has_text="until the test has the notebook open")
        ex(held).to_have_count(1)
        ex(outputs.filter(has_text="STEP-TWO ran")).to_have_count(0)
        # the link opened a report, not a kernel; this page alone is told so
        ex(panel.locator(".jp-KernelName")).to_have_text("No Kernel")
        assert _page_option(page, "notebookStartsKernel") is False
        assert _result_sessions(cloud) == []
        held.scroll_into_view_if_needed()
        shot(page, "12-result-notebook-live-held")

        (workspace / "go-on").write_text("")
        # the later steps appear in the open notebook by themselves: no reload, no dialog
        ex(outputs.filter(has_text="STEP-TWO ran after the notebook was opened")).to_have_count(1)
        ex(outputs.filter(has_text="STEP-THREE total 42")).to_have_count(1)
        ex(panel.locator(".jp-RenderedMarkdown", has_text="LIVE-SUMMARY: the total is 42.")).to_be_visible()
        ex(panel.locator(".jp-RenderedMarkdown").first).to_contain_text("completed")
        assert wait_status(cloud, run_id)["status"] == "completed"
        ex(page.locator(".jp-Dialog")).to_have_count(0)
        assert dialogs == []
        ex(page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty")).to_have_count(0)
        assert _result_sessions(cloud) == []
        panel.locator(".jp-RenderedMarkdown", has_text="LIVE-SUMMARY").scroll_into_view_if_needed()
        shot(page, "13-result-notebook-live-completed")
        # what the reader saw is what the server wrote (the shared document wrote nothing back)
        on_disk = json.loads((workspace / "result.ipynb").read_text())
        assert on_disk["metadata"]["handoff"]["status"] == "completed"

        # the same file in Notebook 7 (its /notebooks/ page) opens without a kernel too
        page.goto(cloud_lab_url(cloud, f"notebooks/handoff-runs/{run_id}/result.ipynb"))
        ex(page.locator(".jp-NotebookPanel .jp-RenderedMarkdown", has_text="LIVE-SUMMARY")).to_be_visible()
        assert _page_option(page, "notebookStartsKernel") is False
        ex(page.locator(".jp-NotebookPanel .jp-KernelName")).to_have_text("No Kernel")
        assert _result_sessions(cloud) == []
        shot(page, "14-result-notebook-notebook7")

        # any other page of the server keeps the operator's setting (kernels start as usual)
        page.goto(cloud_lab_url(cloud, "lab/tree/elsewhere.ipynb"))
        ex(page.locator("#jupyter-config-data")).to_have_count(1)
        assert _page_option(page, "notebookStartsKernel") is True
    except Exception:
        shot(page, "failure-result-notebook-live")
        print("cloud log tail:\n", cloud.log()[-4000:])
        raise
    finally:
        context.close()
