"""diff_manifests over two real bundles written by the snapshot engine (save_state on a dict
namespace and a real working directory), read back as raw stored chunks like the server does."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import pytest

from handoff_magic.chunks import shard_path
from handoff_magic import save_state
from handoff_magic.diff import DiffError, diff_manifests, render_diff_html


def _capture(root: Path, bundle: Path, ns: dict[str, Any]) -> dict[str, Any]:
    save_state(bundle, ns=ns, root=root, environ={})
    return json.loads((bundle / "manifest.json").read_text())


def _reader(*bundles: Path) -> Callable[[str], bytes]:
    def read(sha: str) -> bytes:
        for b in bundles:
            p = shard_path(b / "chunks", sha)
            if p.exists():
                return p.read_bytes()
        raise FileNotFoundError(sha)
    return read


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Callable[[str], bytes]]:
    root = tmp_path_factory.mktemp("ws")
    (root / "notes.txt").write_text("line one\nline two\nline three\n")
    (root / "model.bin").write_bytes(bytes(range(256)) * 4)
    (root / "same.txt").write_text("unchanged\n")
    (root / "big.txt").write_text("sales,amount\n" + "north,10\n" * 20_000)  # compressible: zstd chunks
    before = _capture(root, root.parent / "b1", {"x": 1, "rows": [1, 2, 3], "kept": "same", "gone": 3.5})

    (root / "notes.txt").write_text("line one\nline 2 <script>alert(1)</script>\nline three\n")
    (root / "model.bin").write_bytes(bytes(range(256)) * 8)
    (root / "big.txt").write_text("sales,amount\n" + "north,10\n" * 19_999 + "south,99\n")
    (root / "new.csv").write_text("a,b\n1,2\n")
    after = _capture(root, root.parent / "b2",
                     {"x": 2, "rows": [1, 2, 3, 4], "kept": "same", "y": {"fresh": "<b>bold</b>"}})
    return before, after, _reader(root.parent / "b1", root.parent / "b2")


def test_files_added_removed_modified_with_bounded_unified_diffs(pair: Any) -> None:
    before, after, read = pair
    diff = diff_manifests(before, after, read)
    files = {f["path"]: f for f in diff["files"]}
    assert set(files) == {"notes.txt", "model.bin", "big.txt", "new.csv"}  # same.txt unchanged
    notes = files["notes.txt"]
    assert notes["change"] == "modified" and notes["binary"] is False
    assert "-line two\n" in notes["unified_diff"] and "+line 2 <script>alert(1)</script>\n" in notes["unified_diff"]
    assert files["model.bin"]["binary"] is True and files["model.bin"]["unified_diff"] is None
    assert (files["model.bin"]["size_before"], files["model.bin"]["size_after"]) == (1024, 2048)
    assert files["new.csv"]["change"] == "added" and "+a,b\n" in files["new.csv"]["unified_diff"]
    big = files["big.txt"]  # stored zstd-compressed: the diff decompresses it
    assert any(c.get("codec") == "zstd" for c in after["chunks"].values())
    assert "-north,10\n" in big["unified_diff"] and "+south,99\n" in big["unified_diff"]
    assert len(big["unified_diff"]) < 5000


def test_variables_added_changed_removed_without_unpickling(pair: Any) -> None:
    before, after, read = pair
    variables = {v["name"]: v for v in diff_manifests(before, after, read)["variables"]}
    assert variables["x"]["change"] == "changed"
    assert variables["rows"]["change"] == "changed"
    assert variables["gone"]["change"] == "removed" and variables["gone"]["type_before"] == "float"
    assert variables["y"]["change"] == "added" and variables["y"]["type_after"] == "dict"
    assert "kept" not in variables


def test_a_corrupted_chunk_is_refused(pair: Any, tmp_path: Path) -> None:
    before, after, read = pair

    def flipped(sha: str) -> bytes:
        data = bytearray(read(sha))
        data[0] ^= 0xFF
        return bytes(data)

    with pytest.raises(DiffError, match="does not match its hash"):
        diff_manifests(before, after, flipped)


def test_html_rendering_escapes_names_and_content(pair: Any) -> None:
    before, after, read = pair
    page = render_diff_html(diff_manifests(before, after, read))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page  # variable summaries too
    assert "notes.txt" in page and "model.bin" in page
    assert "No file changed" in render_diff_html({"files": [], "variables": []})


def test_the_result_notebook_is_not_reported_as_the_users_change(pair: Any, tmp_path: Path) -> None:
    before, _, read = pair
    root = tmp_path / "ws"
    root.mkdir()
    (root / "result.ipynb").write_text("{}")
    after = _capture(root, tmp_path / "b3", {"x": 1})
    own = _reader(tmp_path / "b3")

    def both(sha: str) -> bytes:
        try:
            return own(sha)
        except FileNotFoundError:
            return read(sha)

    files = diff_manifests(before, after, both)["files"]
    assert "result.ipynb" not in {f["path"] for f in files}
    shutil.rmtree(root)


def test_a_variable_joining_a_shared_group_is_not_changed(tmp_path: Path) -> None:
    """``model`` holding a reference to ``X`` puts both in one pickle group; X itself did not
    change, so it must not be flagged (the group's payload changed, not X)."""
    import numpy as np
    root = tmp_path / "ws"
    root.mkdir()
    X = np.arange(50_000, dtype="float64")
    y = [1, 2, 3]
    before = _capture(root, tmp_path / "b1", {"X": X, "y": y})
    after = _capture(root, tmp_path / "b2", {"X": X, "y": y, "model": {"coef": X, "fitted": True}})
    group_of = {v["name"]: v["group"] for v in after["variables"]}
    assert group_of["X"] == group_of["model"], "precondition: X and model share a group"
    variables = {v["name"]: v for v in diff_manifests(before, after, _reader(tmp_path / "b1"))["variables"]}
    assert set(variables) == {"model"} and variables["model"]["change"] == "added"

    X2 = X.copy()
    X2[0] = -1.0  # now X really changes (its summary shows the new first value)
    later = _capture(root, tmp_path / "b3", {"X": X2, "y": y, "model": {"coef": X2, "fitted": True}})
    changed = {v["name"]: v["change"] for v in diff_manifests(after, later, _reader(tmp_path / "b2"))["variables"]}
    assert changed.get("X") == "changed"


def test_diff_table_cells_are_left_aligned_whatever_the_page_css(pair: Any) -> None:
    before, after, read = pair
    page = render_diff_html(diff_manifests(before, after, read))
    import re
    cells = re.findall(r"<t[dh]\b[^>]*>", page)
    assert cells and all("text-align:left" in c for c in cells), cells[:3]


def test_unchanged_frames_are_unchanged_after_a_round_trip_and_edits_show(tmp_path: Path) -> None:
    """A frame restored and saved again pickles differently (pandas consolidates its blocks);
    the diff compares the data's digest, so only a frame whose values changed is listed."""
    import numpy as np
    import pandas as pd

    from handoff_magic import load_state
    root = tmp_path / "ws"
    root.mkdir()
    df = pd.DataFrame({"a": np.arange(1000), "b": [f"s{i % 7}" for i in range(1000)], "c": np.linspace(0, 1, 1000)})
    df["d"] = df["a"] * 2
    ns = {"df": df, "s": df["c"].rename("c2"), "edited": df.copy()}
    before = _capture(root, tmp_path / "b1", ns)
    restored: dict[str, Any] = {}
    load_state(tmp_path / "b1", ns=restored, files=False)
    restored["edited"].loc[3, "c"] = 42.0
    after = _capture(root, tmp_path / "b2", restored)
    assert [v["name"] for v in diff_manifests(before, after, _reader(tmp_path / "b1", tmp_path / "b2"))["variables"]] \
        == ["edited"]


HOSTILE = '<img src=x onerror="alert(1)"><script>alert(2)</script>" onmouseover="alert(3)'


class _Page(HTMLParser):
    """Every tag and attribute a browser would build from a page, and its visible text."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text = ""
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text += data


def _no_live_markup(page: str) -> _Page:
    parsed = _Page(page)
    assert {t for t, _ in parsed.tags} <= {"div", "h3", "h4", "table", "thead", "tbody", "tr", "th", "td", "code",
                                           "span", "pre", "p", "i", "b", "ul", "li"}, parsed.tags
    assert all(set(a) <= {"style", "class"} for _, a in parsed.tags), parsed.tags
    assert not any("url(" in (a.get("style") or "") for _, a in parsed.tags)
    return parsed


def test_a_hostile_file_name_variable_and_summary_show_as_text_in_the_diff_view() -> None:
    """Names, summaries and file contents are the remote run's: the user reads them as text and
    the view keeps its colours; nothing becomes a tag, a handler or a style of the run's choosing."""
    diff = {"variables": [{"name": HOSTILE, "change": "added", "type_after": HOSTILE, "summary_after": HOSTILE}],
            "files": [{"path": HOSTILE + ".txt", "change": "modified", "size_before": 1, "size_after": 2,
                       "unified_diff": f"--- a\n+++ b\n+{HOSTILE}\n"},
                      {"path": "big.bin", "change": "added", "note": HOSTILE}]}
    parsed = _no_live_markup(render_diff_html(diff, title=f"What run {HOSTILE} changed"))
    assert parsed.text.count(HOSTILE) == 7, parsed.text   # title, name, type, summary, path, line, note
    assert any("color:#1a7f37" in (a.get("style") or "") for _, a in parsed.tags)   # added, in green


def test_a_hostile_pull_report_shows_as_text() -> None:
    from types import SimpleNamespace

    from handoff_magic.remote.views import PullReport
    from handoff_magic.snapshot.reports import RestoreReport, VarReport
    restore = RestoreReport(path="", variables=[VarReport(HOSTILE, HOSTILE, "pickle5", 10, 0.0, "skipped", HOSTILE)],
                            run=SimpleNamespace(status="waiting_input", question=HOSTILE), title=HOSTILE)
    report = PullReport("abc123", "http://127.0.0.1:1", 10, restore, [{"path": HOSTILE, "written_as": HOSTILE}], 0.1)
    parsed = _no_live_markup(report._repr_html_())
    assert parsed.text.count(HOSTILE) >= 6, parsed.text
