"""What a remote run changed: files and variables between two bundle manifests.

Runs on the server (GET /runs/{id}/diff), so it reads only JSON manifests and raw chunk bytes
(zstd-decompressed for text files); variables are compared by their own recorded type, summary
and method, plus their group's chunk hashes when that group kept the same members — nothing is
ever unpickled. ``render_diff_html`` is the one HTML view: the server's diff page and the
notebook's DiffView both render through it.
"""
from __future__ import annotations

import difflib
import html
from typing import Any, Callable

import zstandard

from .chunks import address_matches
from .errors import DiffError
from .sanitize import sanitize_view

MAX_TEXT_BYTES = 1024 * 1024      # larger files are diffed by size and hash only
MAX_DIFF_LINES = 400              # per file
MAX_DIFF_CHARS = 100_000          # per file
REPORT_FILES = frozenset({"result.ipynb"})  # the run's own report, not the user's work


def _file_map(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in manifest.get("files") or []
            if isinstance(f, dict) and isinstance(f.get("path"), str)}


def _read_file(entry: dict[str, Any], manifest: dict[str, Any],
               read_chunk: Callable[[str], bytes]) -> bytes:
    """Concatenate a file's chunks, verifying each address and undoing zstd."""
    table = manifest.get("chunks") or {}
    parts: list[bytes] = []
    for sha in entry.get("chunks") or []:
        raw = read_chunk(sha)
        if not address_matches(sha, raw):
            raise DiffError(f"chunk {sha} of {entry.get('path')} does not match its hash")
        meta = table.get(sha) or {}
        if meta.get("codec") == "zstd":
            size = int(meta.get("size") or 0)
            try:
                raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=max(size, 1))
            except zstandard.ZstdError as exc:
                raise DiffError(f"chunk {sha} of {entry.get('path')} is not valid zstd: {exc}") from exc
        parts.append(raw)
    return b"".join(parts)


def _as_text(data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unified(path: str, before: str, after: str) -> tuple[str, bool]:
    lines = list(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                      fromfile=f"a/{path}", tofile=f"b/{path}"))
    truncated = False
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES]
        truncated = True
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS]
        truncated = True
    if truncated:
        text += "... (diff truncated)\n"
    return text, truncated


def _file_entry(path: str, change: str, b: dict[str, Any] | None, a: dict[str, Any] | None,
                before: dict[str, Any], after: dict[str, Any],
                read_chunk: Callable[[str], bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "path": path, "change": change, "binary": False,
        "size_before": b.get("size") if b else None, "size_after": a.get("size") if a else None,
        "sha256_before": b.get("sha256") if b else None, "sha256_after": a.get("sha256") if a else None,
        "unified_diff": None,
    }
    sizes = [e.get("size") or 0 for e in (b, a) if e]
    if any(s > MAX_TEXT_BYTES for s in sizes):
        out["binary"] = None  # not inspected: too large to diff as text
        out["note"] = f"larger than {MAX_TEXT_BYTES} bytes: compared by size and hash only"
        return out
    texts: list[str] = []
    for entry, manifest in ((b, before), (a, after)):
        if entry is None:
            texts.append("")
            continue
        text = _as_text(_read_file(entry, manifest, read_chunk))
        if text is None:
            out["binary"] = True
            return out
        texts.append(text)
    out["unified_diff"], out["truncated"] = _unified(path, texts[0], texts[1])
    return out


def _groups(manifest: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {g.get("id"): g for g in manifest.get("groups") or [] if isinstance(g, dict)}


def _var_evidence(var: dict[str, Any], manifest: dict[str, Any]) -> tuple[Any, ...]:
    """What is known about one variable by itself: type, method, summary, replay code."""
    replay = next((r.get("code") for r in manifest.get("replays") or []
                   if isinstance(r, dict) and var.get("name") in (r.get("names") or [])), None)
    return (var.get("type"), var.get("method"), var.get("summary"), replay)


def _group_bytes(var: dict[str, Any],
                 groups: dict[Any, dict[str, Any]]) -> tuple[frozenset[str], tuple[Any, ...]] | None:
    g = groups.get(var.get("group")) if var.get("group") is not None else None
    if g is None:
        return None
    buffers = tuple(tuple(b.get("chunks") or []) for b in g.get("buffers") or [] if isinstance(b, dict))
    return frozenset(str(n) for n in g.get("names") or []), (tuple(g.get("payload") or []), buffers)


def _var_changed(b: dict[str, Any], before: dict[str, Any], bgroups: dict[Any, dict[str, Any]],
                 a: dict[str, Any], after: dict[str, Any], agroups: dict[Any, dict[str, Any]]) -> bool:
    """Per-variable evidence decides. A group's stored bytes are evidence only when the group
    has the same members on both sides (for a variable alone in its group they are exact); a
    group whose membership changed (``model`` joining ``X``) re-pickles everyone in it, which
    says nothing about ``X`` itself, so then type, summary and method decide."""
    if _var_evidence(b, before) != _var_evidence(a, after):
        return True
    if b.get("digest") and a.get("digest"):   # a digest of the data itself (pandas): the pickle may differ
        return bool(b["digest"] != a["digest"])
    gb, ga = _group_bytes(b, bgroups), _group_bytes(a, agroups)
    if gb is None or ga is None:
        return (gb is None) != (ga is None) or b.get("size") != a.get("size")
    if gb[0] != ga[0]:
        return False  # membership changed: its payload is not this variable's evidence
    return gb[1] != ga[1] or (len(ga[0]) == 1 and b.get("size") != a.get("size"))


def _variables(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    bv = {v["name"]: v for v in before.get("variables") or [] if isinstance(v, dict) and "name" in v}
    av = {v["name"]: v for v in after.get("variables") or [] if isinstance(v, dict) and "name" in v}
    bgroups, agroups = _groups(before), _groups(after)
    out: list[dict[str, Any]] = []
    for name in sorted(set(bv) | set(av)):
        b, a = bv.get(name), av.get(name)
        if b is None:
            change = "added"
        elif a is None:
            change = "removed"
        elif _var_changed(b, before, bgroups, a, after, agroups):
            change = "changed"
        else:
            continue
        out.append({"name": name, "change": change,
                    "type_before": b.get("type") if b else None, "type_after": a.get("type") if a else None,
                    "summary_before": b.get("summary") if b else None,
                    "summary_after": a.get("summary") if a else None,
                    "method_after": a.get("method") if a else None,
                    "reason": (a or {}).get("reason")})
    return out


def diff_manifests(before: dict[str, Any], after: dict[str, Any],
                   read_chunk: Callable[[str], bytes]) -> dict[str, Any]:
    """Files (added/removed/modified, unified diffs for text) and variables (added/changed/
    removed) from the handoff manifest ``before`` to the checkpoint ``after``."""
    bf, af = _file_map(before), _file_map(after)
    files: list[dict[str, Any]] = []
    for path in sorted(set(bf) | set(af)):
        b, a = bf.get(path), af.get(path)
        if path in REPORT_FILES and b is None:
            continue
        if b is None:
            change = "added"
        elif a is None:
            change = "removed"
        elif b.get("sha256") != a.get("sha256"):
            change = "modified"
        else:
            continue
        files.append(_file_entry(path, change, b, a, before, after, read_chunk))
    variables = _variables(before, after)
    return {"files": files, "variables": variables,
            "before": {"created": before.get("created")}, "after": {"created": after.get("created")},
            "counts": {"files": len(files), "variables": len(variables)}}


_TABLE = "border-collapse:collapse;margin:0;table-layout:auto"
_CELL = "text-align:left;vertical-align:top;padding:2px 8px;white-space:pre-wrap"
_CHANGE_COLOR = {"added": "#1a7f37", "removed": "#cf222e", "modified": "#9a6700", "changed": "#9a6700"}


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _diff_lines(text: str) -> str:
    rows = []
    for line in text.splitlines():
        color = ("#1a7f37" if line.startswith("+") and not line.startswith("+++") else
                 "#cf222e" if line.startswith("-") and not line.startswith("---") else
                 "#6e7781" if line.startswith("@@") else "inherit")
        rows.append(f'<span style="color:{color}">{_esc(line)}</span>')
    return "\n".join(rows)


def render_diff_html(diff: dict[str, Any], title: str | None = None) -> str:
    """Self-contained HTML (inline styles, everything escaped, then sanitised: names, summaries and
    file contents are the remote run's) for notebooks and pages; ``title`` says what is compared
    with what (which run, handoff vs latest checkpoint)."""
    parts = ['<div class="handoff-diff" style="font-family:system-ui,sans-serif;font-size:13px">']
    if title:
        parts.append(f"<h3 style='margin:4px 0 8px'>{html.escape(title)}</h3>")
    parts.append("<h4 style='margin:4px 0'>Variables</h4>")
    variables = diff.get("variables") or []
    if variables:
        # explicit left alignment: JupyterLab's .jp-RenderedHTMLCommon right-aligns td/th
        parts.append(f'<table style="{_TABLE}"><thead><tr>'
                     + "".join(f'<th style="{_CELL};border-bottom:1px solid #d0d7de">{h}</th>'
                               for h in ("name", "change", "type", "before", "after")) + "</tr></thead><tbody>")
        for v in variables:
            color = _CHANGE_COLOR.get(v.get("change"), "inherit")
            typ = v.get("type_after") or v.get("type_before")
            if v.get("type_before") and v.get("type_after") and v["type_before"] != v["type_after"]:
                typ = f"{v['type_before']} → {v['type_after']}"
            parts.append(
                "<tr>" + f'<td style="{_CELL}"><code>{_esc(v.get("name"))}</code></td>'
                + f'<td style="{_CELL};color:{color}">{_esc(v.get("change"))}</td>'
                + f'<td style="{_CELL}">{_esc(typ)}</td>'
                + f'<td style="{_CELL}">{_esc(v.get("summary_before"))}</td>'
                + f'<td style="{_CELL}">{_esc(v.get("summary_after"))}</td></tr>')
        parts.append("</tbody>")
        parts.append("</table>")
    else:
        parts.append("<p><i>No variable changed.</i></p>")
    parts.append("<h4 style='margin:8px 0 4px'>Files</h4>")
    files = diff.get("files") or []
    if not files:
        parts.append("<p><i>No file changed.</i></p>")
    for f in files:
        color = _CHANGE_COLOR.get(f.get("change"), "inherit")
        sizes = f"{_esc(f.get('size_before'))} → {_esc(f.get('size_after'))} bytes"
        parts.append(f'<div style="margin:6px 0"><code>{_esc(f.get("path"))}</code> '
                     f'<span style="color:{color}">{_esc(f.get("change"))}</span> '
                     f'<span style="color:#6e7781">({sizes}{", binary" if f.get("binary") else ""})</span>')
        if f.get("unified_diff"):
            parts.append('<pre style="background:#f6f8fa;padding:6px;overflow:auto;max-height:30em">'
                         + _diff_lines(f["unified_diff"]) + "</pre>")
        elif f.get("note"):
            parts.append(f'<div style="color:#6e7781">{_esc(f["note"])}</div>')
        parts.append("</div>")
    parts.append("</div>")
    return sanitize_view("".join(parts))
