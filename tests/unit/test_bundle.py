"""Bundle format, verification, secrets helpers and file handling of the snapshot engine,
exercised in-process on real directories (no kernel needed for these)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pytest

from handoff_magic import secrets
from handoff_magic.chunks import CHUNK_SIZE, ChunkStore, shard_path
from handoff_magic.errors import BundleError, BundleSchemaError
from handoff_magic.manifest import Manifest, read_manifest, verify, write_manifest
from handoff_magic.snapshot.capture import save_state
from handoff_magic.snapshot.restore import load_state
from handoff_magic.state import RunState, StateError


def _save(bundle: Path, ns: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("files", False)
    kw.setdefault("environ", {})
    return save_state(bundle, ns=ns, **kw)


# -- chunk store -------------------------------------------------------------------
def test_chunk_address_is_blake3_of_stored_bytes_and_dedups(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    text = b"hello world " * 10_000
    ref = store.put(text, compress=True)
    assert ref.codec == "zstd" and ref.stored < ref.size
    stored = store.path(ref.sha).read_bytes()
    assert ref.sha == "blake3-" + blake3.blake3(stored).hexdigest()
    assert store.get(ref.sha) == text
    again = store.put(text, compress=True)
    assert again.sha == ref.sha and not again.new
    assert store.bytes_new == ref.stored
    noise = os.urandom(80_000)
    raw = store.put(noise, compress=True)  # incompressible: stored as is
    assert raw.codec is None and store.path(raw.sha).read_bytes() == noise
    assert not list((tmp_path / "chunks").rglob("*.tmp-*")), "temp files left behind"


def test_large_buffers_are_split_into_chunks_without_compressing_noise(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    arr = np.random.default_rng(1).random((CHUNK_SIZE * 2 + 1000) // 8)
    zeros = np.zeros(CHUNK_SIZE // 8 * 3)
    rep = _save(bundle, {"arr": arr, "zeros": zeros})
    m = rep.manifest
    bufs = {tuple(g["names"]): g["buffers"] for g in m["groups"]}
    assert len(bufs[("arr",)][0]["chunks"]) == 3
    assert all(m["chunks"][s]["codec"] is None for s in bufs[("arr",)][0]["chunks"])
    assert all(m["chunks"][s]["codec"] == "zstd" for s in bufs[("zeros",)][0]["chunks"])
    ns: dict[str, Any] = {}
    load_state(bundle, ns=ns, files=False)
    assert np.array_equal(ns["arr"], arr) and ns["arr"].flags.writeable
    ns["arr"][0] = 5.0  # a loaded array is an ordinary writable array


def test_resave_writes_only_changed_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ns = {f"a{i}": rng.random(200_000) for i in range(10)}
    first = _save(tmp_path / "b", ns)
    assert first.bytes_new == first.bytes_total
    ns["a3"] = rng.random(200_000)
    second = _save(tmp_path / "b", ns)
    assert second.bytes_total == pytest.approx(first.bytes_total, rel=0.01)
    assert second.bytes_new <= 0.15 * second.bytes_total
    ns2: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=ns2, files=False)
    assert np.array_equal(ns2["a3"], ns["a3"]) and np.array_equal(ns2["a0"], ns["a0"])


# -- manifest and verification -------------------------------------------------------
def test_verify_names_flipped_chunk_and_its_owner(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    (root / "notes.txt").write_text("some notes\n" * 100)
    bundle = tmp_path / "b"
    rep = save_state(bundle, ns={"weights": np.arange(50_000.0)}, root=root, environ={})
    verify(bundle)
    g = next(g for g in rep.manifest["groups"] if g["names"] == ["weights"])
    sha = g["buffers"][0]["chunks"][0]
    p = shard_path(bundle / "chunks", sha)
    data = bytearray(p.read_bytes())
    data[1234] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"chunk {sha} is corrupt.*variable weights"):
        verify(bundle)
    fsha = rep.manifest["files"][0]["chunks"][0]
    (shard_path(bundle / "chunks", fsha)).unlink()
    with pytest.raises(BundleError, match="file notes.txt"):
        verify(bundle)


def test_read_manifest_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a handoff bundle"):
        read_manifest(tmp_path)
    _save(tmp_path, {"x": 1})
    raw = (tmp_path / "manifest.json").read_bytes()
    (tmp_path / "manifest.json").write_bytes(raw[:-20])
    with pytest.raises(BundleError, match="truncated"):
        read_manifest(tmp_path)
    m = json.loads(raw)
    m["schema_version"] = 7
    write_manifest(tmp_path, m)
    with pytest.raises(BundleSchemaError, match="upgrade jupyter-handoff") as err:
        read_manifest(tmp_path)
    assert isinstance(err.value, StateError)


@pytest.mark.parametrize("path", ["../escape.txt", "/etc/passwd", "a/../../b", "C:/x", "a\\b", "", "a//b"])
def test_validate_manifest_refuses_unsafe_paths(tmp_path: Path, path: str) -> None:
    rep = _save(tmp_path / "b", {"x": [1, 2]})
    m = json.loads(json.dumps(rep.manifest))
    sha = next(iter(m["chunks"]))
    m["files"] = [{"path": path, "mode": 0o644, "size": 1, "sha256": "0" * 64, "chunks": [sha]}]
    with pytest.raises(BundleError, match="path"):
        Manifest.parse(m)


def test_validate_manifest_lists_chunks_and_checks_refs(tmp_path: Path) -> None:
    rep = _save(tmp_path / "b", {"x": list(range(10)), "arr": np.ones(10)})
    m = json.loads(json.dumps(rep.manifest))
    assert set(Manifest.parse(m).shas) == set(m["chunks"])
    m["groups"][0]["payload"].append("f" * 64)
    m["imports"].append("import os; os.system('rm -rf ~')")
    with pytest.raises(BundleError) as err:
        Manifest.parse(m)
    assert "not listed in 'chunks'" in str(err.value) and "not a plain import" in str(err.value)
    with pytest.raises(BundleError, match="more than the limit"):
        Manifest.parse(rep.manifest, max_bytes=1)


# -- restore safety ----------------------------------------------------------------
def test_bad_bundle_changes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.csv").write_text("a,b\n")
    bundle = tmp_path / "b"
    rep = save_state(bundle, ns={"x": [1, 2, 3], "arr": np.arange(10.0)}, root=src, environ={})
    m = json.loads(json.dumps(rep.manifest))
    m["files"][0]["path"] = "../outside.csv"
    write_manifest(bundle, m)
    dst = tmp_path / "dst"
    dst.mkdir()
    ns = {"x": "mine"}
    with pytest.raises(BundleError, match="path"):
        load_state(bundle, ns=ns, root=dst)
    assert ns == {"x": "mine"} and not (tmp_path / "outside.csv").exists() and not list(dst.iterdir())


def test_file_conflicts_write_remote_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a.txt").write_text("remote version\n")
    (src / "b.txt").write_text("remote b\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o755)
    bundle = tmp_path / "b"
    save_state(bundle, ns={}, root=src, environ={})
    original = hashlib.sha256(b"as handed off\n").hexdigest()
    (dst / "a.txt").write_text("edited locally\n")   # changed since handoff: keep it
    (dst / "b.txt").write_text("as handed off\n")    # unchanged since handoff: take remote
    rep = load_state(bundle, ns={}, root=dst, file_conflicts={"a.txt": original, "b.txt": original})
    assert (dst / "a.txt").read_text() == "edited locally\n"
    assert (dst / "a.txt.remote").read_text() == "remote version\n"
    assert (dst / "b.txt").read_text() == "remote b\n"
    assert rep.conflicts == [{"path": "a.txt", "written_as": "a.txt.remote"}]
    assert os.stat(dst / "run.sh").st_mode & 0o777 == 0o755
    json.dumps(rep.to_dict())


def test_object_that_cannot_be_unpickled_here_is_skipped_others_restored(tmp_path: Path) -> None:
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "only_here.py").write_text("class Thing:\n    def __init__(self):\n        self.v = 7\n")
    sys.path.insert(0, str(mod_dir))
    try:
        import only_here
        ns = {"thing": only_here.Thing(), "kept": {"v": 1}}
        _save(tmp_path / "b", ns)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("only_here", None)
    out: dict[str, Any] = {}
    rep = load_state(tmp_path / "b", ns=out, files=False)
    assert out == {"kept": {"v": 1}}
    row = rep.var("thing")
    assert row.outcome == "skipped" and "only_here" in row.reason and "install" in row.reason


# -- secrets -----------------------------------------------------------------------
def test_secret_helpers() -> None:
    for name in ("OPENAI_API_KEY", "github_token", "db_password", "Secret", "AWS_CREDENTIALS", "passwd"):
        assert secrets.is_secret_name(name), name
    for name in ("df", "model", "results"):
        assert not secrets.is_secret_name(name)
    env = {"OPENAI_API_KEY": "sk-abcdef123456", "HOME": "/root", "SHORT_TOKEN": "1"}
    vals = secrets.secret_values({"my_key": b"bytes-secret-1", "x": "sk-nope"}, env)
    assert vals >= {"sk-abcdef123456", "bytes-secret-1"} and "1" not in vals and "/root" not in vals
    assert secrets.redact("key=sk-abcdef123456!", vals) == "key=<redacted>!"
    assert secrets.redact_obj({"a": ["sk-abcdef123456"], "n": 3}, vals) == {"a": ["<redacted>"], "n": 3}
    assert secrets.is_secret_value("sk-abcdef123456", vals)


def test_secrets_never_reach_the_bundle(tmp_path: Path) -> None:
    value = "sk-live-0123456789abcdef"
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.md").write_text(f"my key is {value}\n")
    (work / ".env").write_text("X=1\n")
    (work / "ok.txt").write_text("fine\n")
    state = RunState(goal=f"use {value} to call the API")
    state.emit("assistant", text=f"I will use {value}")
    ns = {"API_KEY": value, "copy": value, "nested": {"cfg": [value]}, "arr": np.frombuffer(value.encode(), np.uint8),
          "fine": [1, 2, 3]}
    rep = save_state(tmp_path / "b", ns=ns, root=work, run=state, environ={"OPENAI_API_KEY": value})
    for p in (tmp_path / "b").rglob("*"):
        if p.is_file():
            assert value.encode() not in p.read_bytes(), p
    names = {v["name"] for v in rep.manifest["variables"]}
    assert names == {"nested", "arr", "fine"}  # skipped for content, with a reason; secret-named ones absent
    assert {r.name: r.outcome for r in rep.variables}["nested"] == "skipped"
    assert [f["path"] for f in rep.manifest["files"]] == ["ok.txt"]
    assert "<redacted>" in json.dumps(rep.manifest["run"])
    restored = load_state(tmp_path / "b", ns={}, files=False).run
    assert restored.goal == "use <redacted> to call the API"


def test_report_is_json_and_renders(tmp_path: Path) -> None:
    rep = _save(tmp_path / "b", {"x": 1, "f": lambda v: v})
    d = json.loads(json.dumps(rep.to_dict()))
    assert {v["name"]: v["method"] for v in d["variables"]} == {"x": "pickle5", "f": "dill"}
    assert "<table" in rep._repr_html_() and "pickle5" in str(rep)
    back = load_state(tmp_path / "b", ns={}, files=False)
    assert json.loads(json.dumps(back.to_dict()))["variables"][0]["outcome"] == "ok"
    assert "restored" in str(back) and "<table" in back._repr_html_()


def test_resave_reuses_unchanged_files_and_leaves_no_orphan_chunks(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "big.csv").write_bytes(os.urandom(300_000))
    (work / "small.txt").write_text("v1\n")
    shared = list(range(1000))
    ns = {"a": {"k": shared}, "b": shared, "c": np.arange(1000.0)}  # a and b pickled together in the end
    bundle = tmp_path / "b"
    first = save_state(bundle, ns=ns, root=work, environ={})
    on_disk = {p.name for p in (bundle / "chunks").rglob("*") if p.is_file()}
    assert on_disk == set(first.manifest["chunks"]), "chunks of discarded trial pickles were left behind"
    (work / "small.txt").write_text("v2, longer\n")
    second = save_state(bundle, ns=ns, root=work, environ={})
    small = next(f for f in second.manifest["files"] if f["path"] == "small.txt")
    assert second.bytes_new == sum(second.manifest["chunks"][s]["stored"] for s in small["chunks"])
    out: dict[str, Any] = {}
    dst = tmp_path / "dst"
    dst.mkdir()
    load_state(bundle, ns=out, root=dst)
    assert out["a"]["k"] is out["b"] and (dst / "small.txt").read_text() == "v2, longer\n"
    assert (dst / "big.csv").read_bytes() == (work / "big.csv").read_bytes()


def test_capture_benchmark_runs_at_tiny_scale(tmp_path: Path) -> None:
    """`make bench` must not rot: run benchmarks/capture.py at a tiny scale and read its JSON."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "capture.py"), "--scale", "0.002", "--repeat", "1",
                           "--json", str(out), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=root)   # generous: a loaded machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "re-capture after replacing 1 of 10 arrays" in proc.stdout
    results = {r["namespace"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"numpy", "pandas", "small"}
    assert results["numpy"]["recapture_new"] <= 0.15 * results["numpy"]["recapture_total"]


def test_mapped_loads_are_private_and_truncated_chunks_refused(tmp_path: Path) -> None:
    arr = np.random.default_rng(5).random((CHUNK_SIZE * 2 + 4096) // 8)   # three chunks, last one partial
    rep = _save(tmp_path / "b", {"arr": arr})
    ns: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=ns, files=False)
    ns["arr"][:] = -1.0                      # copy-on-write: the bundle's chunks stay intact
    verify(tmp_path / "b")
    again: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=again, files=False)
    assert np.array_equal(again["arr"], arr)
    sha = rep.manifest["groups"][0]["buffers"][0]["chunks"][1]
    p = shard_path(tmp_path / "b" / "chunks", sha)
    p.write_bytes(p.read_bytes()[:-100])
    target = {"arr": "untouched"}
    with pytest.raises(BundleError, match="truncated|corrupt"):
        load_state(tmp_path / "b", ns=target, files=False)
    assert target == {"arr": "untouched"}


def test_key_shaped_strings_never_travel(tmp_path: Path) -> None:
    key = "sk-proj-" + "A1b2C3d4" * 5
    work = tmp_path / "w"
    work.mkdir()
    state = RunState(goal="g")
    state.emit("assistant", text=f"found {key} in the config")
    ns = {"cfg": {"api": key}, "plain": key, "fine": "sk-short"}
    rep = save_state(tmp_path / "b", ns=ns, root=work, run=state, environ={})
    for p in (tmp_path / "b").rglob("*"):
        if p.is_file():
            assert key.encode() not in p.read_bytes(), p
    rows = {r.name: r for r in rep.variables}
    assert rows["plain"].reason == "looks like a secret" and rows["cfg"].outcome == "skipped"
    assert rows["fine"].outcome == "ok"
    assert secrets.redact(f"x={key}", [], patterns=True) == "x=<redacted>"


def test_deep_sharing_is_kept_and_unrelated_variables_stay_apart(tmp_path: Path) -> None:
    leaf = [1, 2]
    records = [{"id": i, "tags": ["a"]} for i in range(50_000)]
    ns = {
        "deep": {"a": {"b": (leaf,)}},          # reached through a tuple
        "leaf": leaf,
        "objs": np.array([leaf, None], dtype=object),   # object arrays hide items from gc
        "records": records,
        "index": {r["id"]: r for r in records[:10]},
        "alone": [{"x": 1}] * 3,                # shared only inside itself
        "other": {"y": ()},
        "cyc": None,
    }
    loop: list[Any] = []
    ns["cyc"] = (loop,)
    loop.append(ns["cyc"])                      # a cycle through a tuple must not hang the walk
    rep = _save(tmp_path / "b", ns)
    groups = sorted(sorted(g["names"]) for g in rep.manifest["groups"])
    assert ["deep", "leaf", "objs"] in groups and ["index", "records"] in groups
    assert ["alone"] in groups and ["other"] in groups
    out: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=out, files=False)
    assert out["deep"]["a"]["b"][0] is out["leaf"] and out["objs"][0] is out["leaf"]
    assert out["index"][3] is out["records"][3] and out["alone"][0] is out["alone"][2]
    assert out["cyc"][0][0] is out["cyc"]


def test_other_bundles_under_the_root_are_not_captured_as_files(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "data.txt").write_text("x\n")
    save_state(work / "snap1", ns={"a": 1}, root=work, environ={})
    rep = save_state(work / "snap2", ns={"a": 2}, root=work, environ={})
    assert [f["path"] for f in rep.manifest["files"]] == ["data.txt"]


def test_repetitive_text_columns_round_trip_as_a_string_table(tmp_path: Path) -> None:
    """Text columns with repeated values load as few shared strs, every value and flag intact;
    columns with a missing value, a str subclass or all-unique values take the plain path."""
    import pandas as pd  # a test dependency: missing means a broken install, not a skip
    n = 100_000
    labels = np.array([f"item-{i % 500}" for i in range(n)], dtype=object)
    grid = np.array([f"é{i % 7}" for i in range(n)], dtype=object).reshape(250, 400, order="F")
    frozen = labels.copy()
    frozen.flags.writeable = False
    with_nan = labels.copy()
    with_nan[5] = np.nan
    subclass = labels.copy()
    subclass[7] = np.str_("item-7")
    unique = np.array([f"u{i}" for i in range(n)], dtype=object)
    df = pd.DataFrame({"label": labels, "n": np.arange(n)})
    ns: dict[str, Any] = {"labels": labels, "grid": grid, "frozen": frozen, "with_nan": with_nan,
                          "subclass": subclass, "unique": unique, "df": df}
    save_state(tmp_path / "b", ns=ns, files=False, environ={})
    back: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=back, files=False)
    for name in ("labels", "grid", "frozen", "unique"):
        assert back[name].dtype == object and back[name].shape == ns[name].shape
        assert back[name].tolist() == ns[name].tolist(), name
    assert len({id(s) for s in back["labels"].tolist()}) == 500   # one str per distinct value
    assert back["frozen"].flags.writeable is False and back["labels"].flags.writeable is True
    assert back["with_nan"][5] != back["with_nan"][5] and back["with_nan"][6] == "item-6"
    assert type(back["subclass"][7]) is np.str_
    pd.testing.assert_frame_equal(back["df"], df)


def test_without_verify_a_mapped_load_reads_nothing_but_still_checks_sizes(tmp_path: Path) -> None:
    """``verify=False`` (a server kernel's read-only view of chunks the server hash-checked):
    large buffers are mapped and not re-hashed, so a flipped byte goes unseen by design, while
    a chunk of the wrong size is still refused and the namespace stays untouched."""
    arr = np.random.default_rng(7).random((CHUNK_SIZE * 2 + 4096) // 8)
    rep = _save(tmp_path / "b", {"arr": arr})
    shas = rep.manifest["groups"][0]["buffers"][0]["chunks"]
    p = shard_path(tmp_path / "b" / "chunks", shas[0])
    data = bytearray(p.read_bytes())
    data[8] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        load_state(tmp_path / "b", ns={}, files=False)
    ns: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=ns, files=False, verify=False)
    assert np.array_equal(ns["arr"][CHUNK_SIZE // 8:], arr[CHUNK_SIZE // 8:]) and ns["arr"][1] != arr[1]
    last = shard_path(tmp_path / "b" / "chunks", shas[-1])
    last.write_bytes(last.read_bytes()[:-100])
    target = {"arr": "untouched"}
    with pytest.raises(BundleError, match="truncated|wrong size"):
        load_state(tmp_path / "b", ns=target, files=False, verify=False)
    assert target == {"arr": "untouched"}
