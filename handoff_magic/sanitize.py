"""What a remote run produced, made safe to show on the laptop: text, images, sanitised HTML.

A remote run's outputs are written by code an LLM chose, so in the laptop's JupyterLab (whose
origin holds the Lab token) they must not run script. Outputs shown in the widget keep only
``text/plain``, PNG/JPEG/GIF images that really are base64 of such a file (at most
``MAX_IMAGE_BYTES``) and ``text/html`` cleaned by nh3 (the ammonia sanitiser: no ``<script>``,
no event handlers, no ``javascript:`` URLs, no SVG, no forms or iframes); JavaScript, SVG,
Markdown (which may carry raw HTML), widget views and any other MIME type are dropped, and a
note says so when nothing else remains.

The views this package builds itself from what a run reports (the diff, the pull report) escape
every remote value and then go through the same nh3 pass (``sanitize_view``), which also keeps
their inline layout styles, so no escaping slip in a renderer can put live markup on the page.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

import nh3

# the file signature each raster type must start with: a "PNG" that is not one is not shown
IMAGE_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}
MAX_IMAGE_BYTES = 4 * 1024 * 1024   # decoded; a bigger image is left to result.ipynb


def sanitize_html(html: str) -> str:
    """HTML with everything that can run script removed (tags, attributes, URL schemes)."""
    return nh3.clean(str(html))  # ammonia's allowlist: no script, on*, javascript:, svg, iframe


# the layout the package's own views use; any other CSS property (url(), position...) is removed
_VIEW_STYLES = frozenset({"background", "border-bottom", "border-collapse", "color", "font-family", "font-size",
                          "margin", "max-height", "overflow", "padding", "table-layout", "text-align",
                          "vertical-align", "white-space"})
_VIEW_ATTRIBUTES = {tag: {*attrs, "style"} for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()} | {"*": {"style"}}


def sanitize_view(html: str) -> str:
    """A view built here from a run's data (diff, pull report), cleaned like a remote output but
    keeping its inline layout styles."""
    return nh3.clean(str(html), attributes=_VIEW_ATTRIBUTES, filter_style_properties=set(_VIEW_STYLES),
                     allowed_classes={"div": {"handoff-diff"}})


def image_bytes(mime: str, value: Any, limit: int = MAX_IMAGE_BYTES) -> bytes | None:
    """The decoded image if ``value`` is base64 (and nothing else) of a ``mime`` file no larger
    than ``limit`` bytes, else None. nbformat may wrap the base64 in lines; whitespace goes."""
    magic = IMAGE_MAGIC.get(mime)
    if magic is None or not isinstance(value, (str, list)):
        return None
    text = "".join(join_text(value).split())
    if len(text) > (limit + 2) // 3 * 4:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):   # not base64, or not ASCII
        return None
    return raw if raw.startswith(magic) and len(raw) <= limit else None


def image_data_uri(mime: str, value: Any, limit: int = MAX_IMAGE_BYTES) -> str | None:
    """A ``data:`` URI for an image output, re-encoded from its checked bytes (so the URI holds
    only base64 characters whatever the output carried), or None if it is not a safe image."""
    raw = image_bytes(mime, value, limit)
    return None if raw is None else f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def join_text(value: Any) -> str:
    """An nbformat multiline string (a str or a list of lines) as one str."""
    return "".join(value) if isinstance(value, list) else str(value)


def safe_output(output: dict[str, Any]) -> dict[str, Any]:
    """One nbformat output dict as the laptop may display it (streams and errors are text)."""
    if output.get("output_type") not in ("display_data", "execute_result"):
        return dict(output)
    raw = output.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kept: dict[str, Any] = {}
    for mime, value in data.items():
        if mime == "text/plain" or image_bytes(mime, value) is not None:
            kept[mime] = value
        elif mime == "text/html":
            kept[mime] = sanitize_html(join_text(value))
    dropped = sorted(set(data) - set(kept))
    if "text/plain" not in kept and (dropped or not kept):
        kept["text/plain"] = (f"[{', '.join(dropped)} output not shown: only text, PNG/JPEG/GIF images "
                              "and sanitised HTML from a run are shown here (anything else could run code "
                              "on this machine); open the run's result.ipynb to see it]" if dropped else "")
    safe = {k: v for k, v in output.items() if k not in ("data", "metadata")}
    safe["data"] = kept
    safe["metadata"] = {}
    return safe
