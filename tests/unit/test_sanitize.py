"""A remote run's outputs, as the laptop's widget shows them: no script survives."""
from __future__ import annotations

from handoff_magic.sanitize import safe_output

HOSTILE_HTML = ('<b>ok</b><script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
                '<a href="javascript:window.pwned=1">link</a><svg><script>window.pwned=1</script></svg>'
                '<iframe src="https://evil.example"></iframe>')


def test_html_keeps_its_text_and_loses_every_way_to_run_script() -> None:
    out = safe_output({"output_type": "display_data", "data": {"text/html": HOSTILE_HTML}, "metadata": {}})
    html = out["data"]["text/html"]
    assert "<b>ok</b>" in html and "link" in html
    for bad in ("<script", "onerror", "javascript:", "<svg", "<iframe", "pwned"):
        assert bad not in html, (bad, html)


def test_javascript_svg_and_markdown_are_dropped_with_a_note() -> None:
    out = safe_output({"output_type": "execute_result", "execution_count": 3, "metadata": {"x": 1},
                       "data": {"application/javascript": "window.pwned=1",
                                "image/svg+xml": "<svg onload='window.pwned=1'/>",
                                "text/markdown": "<img src=x onerror=alert(1)>"}})
    assert set(out["data"]) == {"text/plain"} and out["execution_count"] == 3 and out["metadata"] == {}
    note = out["data"]["text/plain"]
    assert "application/javascript" in note and "image/svg+xml" in note and "not shown" in note


def test_text_images_streams_and_errors_pass_unchanged() -> None:
    png = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"},
           "metadata": {}}
    assert safe_output(png)["data"] == png["data"]
    stream = {"output_type": "stream", "name": "stdout", "text": "<script>x</script>"}
    assert safe_output(stream) == stream  # shown as text, never parsed as HTML
