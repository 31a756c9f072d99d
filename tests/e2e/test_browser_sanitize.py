"""A remote run's outputs never run script in the laptop's JupyterLab.

The cloud run displays HTML with ``<script>``, an ``onerror`` image and a ``javascript:`` link,
``application/javascript`` and an SVG with a script, each of which would set ``window.__pwned``.
``%reattach ID`` in a real JupyterLab in Chromium follows the live run and shows its outputs in
the widget: the page variable stays unset and the content shows as text. A matplotlib plot of the
same step shows as a picture in the step log; a "PNG" that is a ``javascript:`` URI does not.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_browser import (
    UI_TIMEOUT,
    expect,
    run_cell,
    wait_cell_done,
    wait_kernel_idle,
    widget_in,
)
from tests.harness.browser_harness import LabProcess, shot
from tests.harness.runner_helpers import (
    capture_bundle,
    finish,
    hand_off,
    run_python,
    wait_status,
)
from tests.harness.server_process import JupyterServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HOSTILE = (
    "from IPython.display import display, HTML\n"
    "display(HTML('<p>SAFE-TEXT-1</p><script>window.__pwned = \"script\"</script>'"
    "             '<img src=\"x\" onerror=\"window.__pwned = \\'onerror\\'\">'"
    "             '<a href=\"javascript:window.__pwned=1\">SAFE-LINK</a>'))\n"
    "display({'application/javascript': 'window.__pwned = \"js\"', 'text/plain': 'SAFE-TEXT-2'}, raw=True)\n"
    "display({'image/svg+xml': '<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"window.__pwned=\\'svg\\'\">'\n"
    "         '<script>window.__pwned = \"svg-script\"</script></svg>'}, raw=True)\n"
    "display({'image/png': 'javascript:window.__pwned=\"png\"', 'text/plain': 'FAKE-PNG'}, raw=True)\n"
    "import io, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
    "from IPython.display import Image\n"
    "fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)\nax.plot([3, 1, 4, 1, 5])\nax.set_title('sales by week')\n"
    "buf = io.BytesIO()\nfig.savefig(buf, format='png')\ndisplay(Image(buf.getvalue()))\n"
)


def test_reattached_remote_outputs_run_no_script_in_lab(
        browser: Any, lab: LabProcess, cloud: JupyterServerProcess, tmp_path: Path) -> None:
    bdir, manifest = capture_bundle(tmp_path / "local")
    script = tmp_path / "hostile.json"
    # the hostile step runs while Lab follows the run (a finished run shows no live outputs)
    script.write_text(json.dumps([run_python("import time\ntime.sleep(20)"), run_python(HOSTILE),
                                  finish("displayed")]))

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    try:
        ex = expect()
        page.goto(lab.lab_url("lab"))
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        ex(page.locator(".jp-NotebookPanel:visible .jp-Cell")).to_have_count(1)
        wait_kernel_idle(page)
        wait_cell_done(run_cell(page, "%load_ext handoff_magic"))
        run_id = hand_off(cloud, bdir, manifest, model=f"scripted:{script}")
        cell = run_cell(page, f"%reattach {run_id}")
        w = widget_in(cell)
        outputs = w.locator(".jh-outputs")
        ex(outputs).to_contain_text("SAFE-TEXT-1")
        ex(outputs).to_contain_text("SAFE-TEXT-2")
        ex(outputs).to_contain_text("image/svg+xml output not shown")
        # the plot is a picture in the step log (decoded by the browser: it has a size); the fake
        # PNG is not an image anywhere in the widget
        plot = w.locator(".jh-log img.jh-img")
        ex(plot).to_have_count(1)
        ex(plot).to_have_attribute("src", re.compile(r"^data:image/png;base64,[A-Za-z0-9+/=]+$"))
        assert plot.evaluate("(img) => img.complete && img.naturalWidth") == 320
        ex(outputs).to_contain_text("FAKE-PNG")
        assert w.locator("img[src^='javascript'], img[src*='pwned']").count() == 0
        assert wait_status(cloud, run_id)["status"] == "completed"
        page.wait_for_timeout(2000)   # give any injected handler (img onerror) time to fire
        assert page.evaluate("() => window.__pwned") is None
        for area in (outputs, w.locator(".jh-log")):
            assert area.locator("script, svg, [onerror], a[href^='javascript']").count() == 0
        plot.scroll_into_view_if_needed()
        shot(page, "sanitised-remote-outputs", w)
    except Exception:
        shot(page, "failure-sanitised-remote-outputs")
        raise
    finally:
        context.close()
