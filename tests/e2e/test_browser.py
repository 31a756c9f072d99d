"""The journey as a user sees it: JupyterLab and the cloud's pages in a real Chromium.

Local JupyterLab (kernels configured for the cloud through the environment) → new notebook →
``%agent --background`` with a scripted model → the status widget shows the plan and steps →
**Hand off** mid-task → remote status → kernel shut down, a new one started → ``%reattach ID``
→ completed → **Review diff** → **Open notebook** (result.ipynb in the cloud's JupyterLab, with
the agent's steps and outputs) → **Pull back** → the variables print in the local kernel.
The widget is photographed in the light and the dark theme; the status page is checked at a
phone-sized viewport with a run waiting for an answer. Screenshots go to tests/artifacts/.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.browser_harness import DARK, LIGHT, LabProcess, cloud_lab_url, shot
from tests.harness.server_process import JupyterServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.browser]

UI_TIMEOUT = 90_000   # ms; a loaded 2-core machine starts kernels slowly

PLAN = ["Load the sales", "Drop the small sales (slow step)", "Total them and write report.md", "Summarise"]


def _plan(active: int) -> dict[str, Any]:
    steps = [{"text": t, "status": "done" if i < active else "active" if i == active else "pending"}
             for i, t in enumerate(PLAN)]
    return {"name": "update_plan", "arguments": {"steps": steps}}


def _py(code: str) -> dict[str, Any]:
    return {"name": "run_python", "arguments": {"code": code}}


# the slow step lasts until the test clicks Hand off (an event, not a guess at how slow the machine is)
WAIT_FOR_HANDOFF = ("runs = __import__('handoff_magic.local.run', fromlist=['RUNS']).RUNS.values()\n"
                    "while not any(r.pause_requested for r in runs):\n"
                    "    time.sleep(0.05)  # until Hand off is clicked\n"
                    "del runs\n")

JOURNEY = [
    {"text": "I'll load the sales first.",
     "tool_calls": [_plan(0), _py("import time\nsales = [120.5, 98.0, 143.25, 87.0, 110.0]\n"
                                  "print(f'loaded {len(sales)} sales')")]},
    {"text": "Dropping the small sales; this takes a moment.",
     "tool_calls": [_plan(1), _py(WAIT_FOR_HANDOFF + "clean = [s for s in sales if s > 90]\n"
                                  "print(f'kept {len(clean)} of {len(sales)}')")]},
    {"text": "Totalling and writing the report.",
     "tool_calls": [_plan(2), _py("from pathlib import Path\ntime.sleep(1)\ntotal = round(sum(clean), 2)\n"
                                  "Path('report.md').write_text(f'# Sales\\n\\nTotal of clean sales: {total}\\n')\n"
                                  "print('total', total)")]},
    {"text": "Done.",
     "tool_calls": [_plan(4), {"name": "finish",
                                "arguments": {"summary": "Total of the clean sales is 471.75; report.md written."}}]},
]


# -- JupyterLab helpers ----------------------------------------------------------------------
def expect() -> Any:
    from playwright.sync_api import expect as _expect
    _expect.set_options(timeout=UI_TIMEOUT)
    return _expect


def wait_kernel_idle(page: Any) -> None:
    expect()(page.locator(".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator")).to_have_attribute(
        "data-status", "idle")


def run_cell(page: Any, code: str) -> Any:
    """Type ``code`` into the notebook's last cell, run it (Shift+Enter); returns that cell."""
    cells = page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell")
    n = cells.count()
    cell = cells.nth(n - 1)
    editor = cell.locator(".cm-content")
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(code)          # no auto-closed brackets, no auto-indent
    expect()(editor).to_contain_text(code.splitlines()[0])
    page.keyboard.press("Shift+Enter")
    expect()(cells).to_have_count(n + 1)      # run-and-advance appended a fresh cell
    _ensure_sent(page, cell)
    return cell


def _ensure_sent(page: Any, cell: Any) -> None:
    """Right after a kernel (re)start JupyterLab may drop an execute request while its kernel
    connection settles: the prompt stays ``[ ]`` (never queued, never run). Run it again then."""
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(5):
        try:
            expect()(prompt).not_to_have_text("[ ]:", timeout=5_000)
            return
        except AssertionError:
            cell.locator(".jp-InputPrompt").click()      # select the cell (command mode)
            page.keyboard.press("Control+Enter")       # run it in place
    expect()(prompt).not_to_have_text("[ ]:")


def wait_cell_done(cell: Any) -> None:
    """The cell's prompt shows an execution count (not ``[*]``) once the kernel finished it."""
    expect()(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"))


def widget_in(cell: Any) -> Any:
    w = cell.locator(".jh-run")
    expect()(w).to_be_visible()
    return w


def badge(widget: Any) -> Any:
    return widget.locator(".jh-badge")


def menu(page: Any, *path: str) -> None:
    """Click through JupyterLab's menu bar, e.g. menu(page, "Kernel", "Shut Down Kernel")."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(path[0])}$")).click()
    for item in path[1:]:
        entry = page.locator(".lm-Menu:visible .lm-Menu-item", has=page.locator(
            ".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))).last
        entry.hover()
        entry.click()


def set_theme(page: Any, theme: str) -> None:
    menu(page, "Settings", "Theme", theme)
    light = "true" if theme == LIGHT else "false"
    expect()(page.locator("body")).to_have_attribute("data-jp-theme-light", light)


def assert_legible(widget: Any) -> None:
    """Every text in the widget is visible and contrasts with its background (WCAG-ish 3:1)."""
    worst = widget.evaluate("""(root) => {
      const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
      const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
        return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
      const bgOf = el => { for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor); if (c.length === 3 || (c[3] || 0) > 0.5) return c; }
        return rgb(getComputedStyle(document.body).backgroundColor); };
      let worst = {ratio: 99, text: ''};
      for (const el of root.querySelectorAll('*')) {
        const own = [...el.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim())
                                      .map(n => n.textContent.trim()).join(' ');
        if (!own || el.getClientRects().length === 0) continue;
        const st = getComputedStyle(el);
        if (st.visibility === 'hidden' || Number(st.opacity) < 0.3) continue;
        const f = lum(rgb(st.color)), b = lum(bgOf(el));
        const ratio = (Math.max(f, b) + 0.05) / (Math.min(f, b) + 0.05);
        const disabled = el.closest('button:disabled');
        if (!disabled && ratio < worst.ratio) worst = {ratio, text: own.slice(0, 60), color: st.color};
      }
      return worst; }""")
    assert worst["ratio"] >= 3.0, f"low contrast text in the widget: {worst}"


def assert_compact(widget: Any) -> None:
    """No horizontal overflow and the buttons sit on few rows, aligned at one height."""
    box = widget.bounding_box()
    assert box is not None
    overflow = widget.evaluate("(el) => el.scrollWidth - el.clientWidth")
    assert overflow <= 1, f"the widget overflows sideways by {overflow}px"
    tops = widget.locator(".jh-btn:visible").evaluate_all(
        "(bs) => bs.map(b => Math.round(b.getBoundingClientRect().top))")
    heights = widget.locator(".jh-btn:visible").evaluate_all(
        "(bs) => bs.map(b => Math.round(b.getBoundingClientRect().height))")
    assert len(set(tops)) <= 2 and len(set(heights)) == 1, (tops, heights)


# -- the journey -------------------------------------------------------------------------------
def test_journey_in_jupyterlab(browser: Any, lab: LabProcess, cloud: JupyterServerProcess) -> None:
    script = lab.root_dir / "journey.json"
    script.write_text(json.dumps(JOURNEY))
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    try:
        _journey(page, context, lab, cloud, script)
    except Exception:
        shot(page, "failure-journey")
        runs = cloud.client.get("/handoff/api/runs").json()
        print("cloud runs:", json.dumps(runs, indent=1)[:4000])
        print("cloud log tail:\n", cloud.log()[-4000:])
        print("lab log tail:\n", lab.log()[-4000:])
        raise
    finally:
        context.close()


def _journey(page: Any, context: Any, lab: LabProcess, cloud: JupyterServerProcess, script: Path) -> None:
    ex = expect()
    # the user is logged in to their cloud server in this browser (as after opening its link once)
    page.goto(cloud_lab_url(cloud, "handoff/runs"))
    ex(page.locator("h1, p").first).to_be_visible()

    page.goto(lab.lab_url("lab"))
    page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
    ex(page.locator(".jp-NotebookPanel:visible .jp-Cell")).to_have_count(1)
    wait_kernel_idle(page)

    cell = run_cell(page, "%load_ext handoff_magic")
    wait_cell_done(cell)
    ex(cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")).to_have_count(0)

    # 1. a background agent run: the widget shows the plan and the steps as they happen
    agent_cell = run_cell(page, f"%agent --background --model scripted:{script} total the clean sales")
    w = widget_in(agent_cell)
    ex(w.locator(".jh-plan li")).to_have_count(len(PLAN))
    ex(w.locator(".jh-log")).to_contain_text("until Hand off is clicked")   # the slow second step runs
    ex(badge(w)).to_have_attribute("data-status", "running")
    ex(w.locator(".jh-plan li").nth(0)).to_have_attribute("data-status", "done")
    shot(page, "01-local-run-light")
    shot(page, "01-widget-running-light", w)

    # 2. hand off mid-task (within the slow step): the run pauses at the step boundary and
    # continues on the cloud
    w.locator(".jh-btn-handoff").click()
    assert_legible(w)
    assert_compact(w)
    ex(w.locator(".jh-meta")).to_contain_text("remote", timeout=120_000)
    remote_id = re.search(r"remote · .* · run (\w+)", w.locator(".jh-meta").inner_text()).group(1)
    ex(w.locator(".jh-btn-handoff")).to_be_disabled()
    ex(w.locator(".jh-btn-reattach")).to_be_enabled()
    # the remote run's own events arrive; the steps already shown are not shown twice
    ex(badge(w)).to_have_attribute("data-status", re.compile("restoring|running|completed"))
    ex(w.locator(".jh-words", has_text="I'll load the sales first.")).to_have_count(1)
    ex(w.locator(".widget-hprogress:visible")).to_have_count(0)   # the upload bar went with the upload
    shot(page, "02-handed-off-light")
    shot(page, "02-widget-remote-light", w)
    assert_legible(w)

    # the widget in the dark theme, remote mode
    set_theme(page, DARK)
    w.scroll_into_view_if_needed()
    shot(page, "03-handed-off-dark")
    shot(page, "03-widget-remote-dark", w)
    assert_legible(w)
    set_theme(page, LIGHT)

    # the handed-off view follows the run to its end: the local steps stay, the remote ones are
    # numbered on from them, and the header counts every step (the server's count)
    ex(badge(w)).to_have_attribute("data-status", "completed", timeout=180_000)
    ex(w.locator(".jh-step-n")).to_have_text(["#1", "#2", "#3", "#4"])
    ex(w.locator(".jh-words", has_text="I'll load the sales first.")).to_have_count(1)
    ex(w.locator(".jh-words", has_text="Totalling and writing the report.")).to_have_count(1)
    ex(w.locator(".jh-meta")).to_contain_text(re.compile(r"\b4 steps\b"))
    w.scroll_into_view_if_needed()
    shot(page, "03b-widget-after-handoff-completed-light", w)

    # 3. the laptop's kernel goes away; a new one reattaches by id
    menu(page, "Kernel", "Shut Down Kernel")
    ex(page.locator(".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator")).not_to_have_attribute(
        "data-status", "idle")
    ex(page.locator(".jp-NotebookPanel:visible .jp-KernelName")).to_have_text("No Kernel")
    page.locator(".jp-NotebookPanel:visible .jp-KernelName").click()   # "Select Kernel" dialog
    dialog = page.locator(".jp-Dialog")
    ex(dialog).to_contain_text("Select Kernel")
    dialog.locator("button.jp-mod-accept").click()
    wait_kernel_idle(page)
    page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").last.scroll_into_view_if_needed()
    cell = run_cell(page, f"%load_ext handoff_magic\n%reattach {remote_id}")
    w2 = widget_in(cell)
    ex(badge(w2)).to_have_attribute("data-status", "completed", timeout=180_000)
    ex(w2.locator(".jh-plan li[data-status='done']")).to_have_count(len(PLAN))
    ex(w2).to_contain_text("471.75")
    shot(page, "04-reattached-completed-light")
    shot(page, "04-widget-completed-light", w2)
    assert_legible(w2)
    assert_compact(w2)
    set_theme(page, DARK)
    w2.scroll_into_view_if_needed()
    shot(page, "04-widget-completed-dark", w2)
    assert_legible(w2)
    set_theme(page, LIGHT)

    # 4. review the diff: report.md and the new variables
    w2.locator(".jh-btn-diff").click()
    diff = cell.locator(".jp-OutputArea-output[data-mime-type='text/html']", has_text="report.md").last
    ex(diff).to_be_visible()
    ex(diff).to_contain_text("total")
    diff.scroll_into_view_if_needed()
    shot(page, "05-diff-light")
    shot(page, "05-diff-output-light", diff)

    # 5. open the result notebook in the cloud's JupyterLab
    w2.locator(".jh-btn-notebook").click()
    link = cell.locator("a[href*='result.ipynb']")
    ex(link).to_be_visible()
    with context.expect_page() as new_page_info:
        link.first.click()
    nb = new_page_info.value
    nb.set_default_timeout(UI_TIMEOUT)
    nb_panel = nb.locator(".jp-NotebookPanel:visible")
    ex(nb_panel).to_contain_text("Total of clean sales")
    ex(nb_panel).to_contain_text("kept 4 of 5")
    ex(nb_panel).to_contain_text("total 471.75")
    ex(nb_panel.locator(".jp-RenderedMarkdown", has_text="Files written")).not_to_contain_text(".jupyter_ystore.db")
    ex(nb_panel.locator(".jp-RenderedMarkdown", has_text="Dropping the small sales")).to_be_visible()
    ex(nb_panel.locator(".jp-RenderedMarkdown", has_text="Summary")).to_have_count(1)
    ex(nb.locator(".lm-TabBar-tab.jp-mod-current")).to_contain_text("result.ipynb")
    # the link opens the record of the run: no kernel starts for it, and it is unchanged (no
    # unsaved mark, which would also make autosave clash with the runner's rewrites)
    ex(nb.locator(".jp-NotebookPanel:visible .jp-KernelName")).to_have_text("No Kernel")
    assert not [s for s in cloud.client.get("/api/sessions").json() if s["path"].endswith("result.ipynb")]
    ex(nb.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty")).to_have_count(0, timeout=5_000)
    shot(nb, "06-result-notebook-cloud-light")
    nb.close()

    # 6. pull back: the run's variables arrive in this (new) kernel
    w2.locator(".jh-btn-pull").click()
    ex(cell.locator(".jp-OutputArea-output", has_text=f"Pulled run {remote_id}").last).to_be_visible(timeout=120_000)
    # the reattached view now shows the run as pulled back into this kernel, with local buttons
    ex(w2.locator(".jh-meta")).to_contain_text("local · run")
    ex(w2.locator(".jh-msg")).to_contain_text("Pulled back into this kernel")
    ex(w2.locator(".jh-btn-pull")).to_be_disabled()
    ex(w2.locator(".jh-btn-reattach")).to_be_disabled()
    ex(w2.locator(".widget-hprogress:visible")).to_have_count(0)
    ex(cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")).to_have_count(0)
    shot(page, "07-pulled-back-light")
    cell = run_cell(page, "print(total, len(clean), open('report.md').read().splitlines()[-1])")
    wait_cell_done(cell)
    ex(cell.locator(".jp-OutputArea-output")).to_contain_text("471.75 4 Total of clean sales: 471.75")
    shot(page, "08-variables-local-light")


# -- the status page on a phone ---------------------------------------------------------------
def _waiting_run(cloud: JupyterServerProcess) -> str:
    """A run on the cloud that asks a question (hand-built bundle, scripted model)."""
    import hashlib

    from handoff_magic.state import RunState

    script = cloud.data_dir.parent / "ask.json"
    script.write_text(json.dumps([
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {
            "question": "Which region should the forecast focus on: north or south?"}}]},
        {"text": "Using your answer.", "tool_calls": [_py("print('focus chosen')")]},
        {"text": "", "tool_calls": [{"name": "finish",
                                     "arguments": {"summary": "Forecast done for the chosen region."}}]},
    ]))
    data = b"region,amount\nnorth,10\nsouth,32\n"
    h = hashlib.sha256(data).hexdigest()
    r = cloud.client.put(f"/handoff/api/blobs/{h}", content=data)
    assert r.status_code in (200, 201), r.text
    state = RunState(goal="forecast next quarter's sales for one region", model=f"scripted:{script}")
    manifest = {"schema_version": 1, "kind": "handoff-bundle", "created": time.time(),
                "chunks": {h: {"size": len(data), "stored": len(data), "codec": None}},
                "variables": [], "groups": [], "replays": [], "imports": [],
                "history": {"In": [""], "Out": {}},
                "files": [{"path": "sales.csv", "mode": 0o644, "size": len(data), "sha256": h, "chunks": [h]}],
                "run": state.to_dict()}
    r = cloud.client.post("/handoff/api/runs", json={"manifest": manifest, "idempotency_key": "phone-1"})
    assert r.status_code in (200, 201), r.text
    rid = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if cloud.client.get(f"/handoff/api/runs/{rid}").json()["status"] == "waiting_input":
            return rid
        time.sleep(0.2)
    raise AssertionError(f"run {rid} never asked its question:\n{cloud.log()[-3000:]}")


def test_status_page_on_a_phone(browser: Any, cloud: JupyterServerProcess) -> None:
    rid = _waiting_run(cloud)
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                  is_mobile=True, has_touch=True)
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    ex = expect()
    try:
        page.goto(cloud_lab_url(cloud, f"handoff/runs/{rid}"))
        ex(page.locator("#status")).to_have_text("waiting for input")
        ex(page.locator("#question")).to_contain_text("north or south")
        shot(page, "09-status-page-phone-waiting")
        page.emulate_media(color_scheme="dark")     # the page follows the phone's dark mode
        ex(page.locator("body")).to_have_css("background-color", "rgb(13, 17, 23)")
        shot(page, "09-status-page-phone-waiting-dark")
        page.emulate_media(color_scheme="light")
        # readable on a phone: nothing wider than the screen, body text at least 14px
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        size = float(page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)"))
        assert size >= 14, size
        button = page.get_by_role("button", name="Send answer")
        assert button.bounding_box()["height"] >= 40   # a thumb-sized target

        page.locator("#answer").fill("north")
        button.click()
        ex(page.locator(".flash")).to_have_text("Answer sent")
        shot(page, "09-status-page-phone-answer-sent")
        # the page refreshes itself while the run is live: the user just watches it finish
        ex(page.locator("#status")).to_have_text("completed", timeout=120_000)
        ex(page.locator("body")).to_contain_text("north")
        ex(page.locator("body")).to_contain_text("Forecast done for the chosen region.")
        shot(page, "10-status-page-phone-completed", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    except Exception:
        shot(page, "failure-phone")
        raise
    finally:
        context.close()


def test_missing_chromium_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without chromium the browser tests FAIL (never skip) and say how to install it."""
    from tests.harness import browser_harness
    monkeypatch.setattr(browser_harness, "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(pytest.fail.Exception, match="scripts/install-system-deps.sh"):
        browser_harness.require_chromium()


# -- Notebook 7 -----------------------------------------------------------------------------------
class NotebookProcess(LabProcess):
    """``python -m notebook`` (Notebook 7) with the same settings as the local JupyterLab."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[2] = "notebook"
        return cmd


def test_widget_renders_in_notebook_7(browser: Any, tmp_path: Path) -> None:
    """The same widget in Notebook 7's single-document UI: plan, status badge and one row of buttons."""
    import nbformat
    srv = NotebookProcess(startup_timeout=120, env={"HANDOFF_CACHE_DIR": str(tmp_path / "cache")})
    (srv.root_dir / "nb7.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})))
    srv.start()
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    ex = expect()
    try:
        page.goto(srv.lab_url("notebooks/nb7.ipynb"))
        ex(page.locator(".jp-NotebookPanel:visible .jp-Cell")).to_have_count(1)
        wait_kernel_idle(page)  # run before the kernel is connected and Notebook 7 asks "Select Kernel"
        cell = run_cell(page, "%load_ext handoff_magic\n%agent --model scripted:default summarise the sales")
        w = widget_in(cell)
        ex(badge(w)).to_have_attribute("data-status", "completed", timeout=120_000)
        ex(w.locator(".jh-plan li[data-status='done']")).to_have_count(4)
        ex(w.locator(".jh-meta")).to_contain_text("local · run")
        assert_legible(w)
        assert_compact(w)
        shot(page, "11-notebook7-light")
        shot(page, "11-notebook7-widget-light", w)
    except Exception:
        shot(page, "failure-notebook7")
        print("notebook log tail:\n", srv.log()[-4000:])
        raise
    finally:
        context.close()
        srv.cleanup()
