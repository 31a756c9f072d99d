"""Images in the widget's step log: a real plot shows as an <img>; nothing hostile does."""
from __future__ import annotations

import base64
import io
import re

import pytest

from handoff_magic.local.render import View, render_log_html
from handoff_magic.sanitize import image_data_uri, safe_output
from handoff_magic.state import RunState


def _matplotlib_png() -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.plot([1, 3, 2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _log_for(*outputs: dict) -> str:
    """The step log after one remote run_python step whose outputs are ``outputs``."""
    state = RunState(goal="plot the sales")
    view = View()
    for ev in (state.emit("tool_call", id="c1", name="run_python", arguments={"code": "plot()"}),
               state.emit("tool_result", id="c1", name="run_python", outputs=list(outputs),
                          content="[ok]\ndisplay:\n[image/png 150x100]\n<Figure size 150x100 with 1 Axes>")):
        view.apply(ev)
    return render_log_html(view.entries)


def _display(data: dict) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def test_a_matplotlib_plot_shows_as_an_image_not_a_label() -> None:
    png = _matplotlib_png()
    # nbformat stores long base64 wrapped in lines; the log shows it the same
    wrapped = "\n".join(png[i:i + 76] for i in range(0, len(png), 76))
    log = _log_for(_display({"image/png": wrapped, "text/plain": "<Figure size 150x100 with 1 Axes>"}))
    imgs = re.findall(r'<img class="jh-img" alt="image/png output" src="([^"]*)">', log)
    assert imgs == [f"data:image/png;base64,{png}"]
    assert "[image/png" not in log and "&lt;Figure size" not in log   # the picture, not its labels


@pytest.mark.parametrize("data", [
    # an SVG with script is never an <img> of the log (and is dropped from Outputs, with a note)
    {"image/svg+xml": '<svg xmlns="http://www.w3.org/2000/svg" onload="window.pwned=1"><script>x</script></svg>'},
    # a URI or markup where base64 belongs
    {"image/png": "javascript:window.pwned=1"},
    {"image/png": 'iVBORw0KGgo=" onerror="window.pwned=1'},
    # base64, but not of a PNG (an SVG claiming to be one), nor of the type it names
    {"image/png": base64.b64encode(b"<svg onload='window.pwned=1'/>").decode()},
    {"image/jpeg": base64.b64encode(b"GIF89a" + b"\0" * 20).decode()},
    {"image/webp": base64.b64encode(b"RIFF\0\0\0\0WEBPVP8 ").decode()},
])
def test_hostile_or_fake_images_never_become_img_tags(data: dict) -> None:
    log = _log_for(_display(dict(data, **{"text/plain": "SAFE"})))
    assert "<img" not in log and "<svg" not in log and "javascript:" not in log and "onerror=" not in log
    assert "pwned" not in re.sub(r'<pre class="jh-code">.*?</pre>', "", log)
    kept = safe_output(_display(data))["data"]
    assert set(kept) == {"text/plain"} and "output not shown" in kept["text/plain"]


def test_a_data_uri_holds_only_base64_of_the_checked_bytes() -> None:
    png = _matplotlib_png()
    assert image_data_uri("image/png", png) == f"data:image/png;base64,{png}"
    assert image_data_uri("image/png", [png[:40] + "\n", png[40:]]) == f"data:image/png;base64,{png}"
    gif = base64.b64encode(b"GIF89a" + b"\1" * 30).decode()
    assert image_data_uri("image/gif", gif) == f"data:image/gif;base64,{gif}"
    assert image_data_uri("image/gif", gif, limit=10) is None            # over the size cap
    assert image_data_uri("image/png", 12345) is None


def test_an_image_too_big_for_the_log_is_named_with_its_size() -> None:
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 600_000).decode()
    log = _log_for(_display({"image/png": big, "text/plain": "<Figure>"}))
    assert "<img" not in log and "[image/png image of 600.0 KB: too big for the step log]" in log
