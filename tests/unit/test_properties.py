"""Property-based tests (hypothesis) for what a server parses from strangers: run states and
bundle manifests. Whatever arrives, the parsers answer with StateError/BundleError (the server
turns those into a 400 with a message), never another exception (a 500, or worse a crash in a
loop that resumes runs); valid states round-trip exactly; no file path that escapes the run's
workspace is ever accepted.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from handoff_magic.errors import BundleError, BundleSchemaError
from handoff_magic.manifest import Manifest, check_relpath, read_manifest
from handoff_magic.state import (PLAN_STATUSES, RUN_STATUSES, Budgets, Event, Message, Origin, PlanStep,
                                 RunState, SchemaVersionError, StateError, ToolCall, ToolResult)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- JSON-like values ------------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


# -- valid run states --------------------------------------------------------------------------------
texts = st.text(max_size=30)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)
tool_calls = st.builds(ToolCall, id=texts, name=texts, arguments=json_objects)
tool_results = st.builds(ToolResult, call_id=texts, name=texts, content=texts, is_error=st.booleans(),
                         outputs=st.lists(json_objects, max_size=2))
messages = st.builds(Message, role=st.sampled_from(["system", "user", "assistant", "tool"]), text=texts,
                     tool_calls=st.lists(tool_calls, max_size=2), tool_results=st.lists(tool_results, max_size=2))
plan_steps = st.builds(PlanStep, text=texts, status=st.sampled_from(PLAN_STATUSES))
finite = st.floats(allow_nan=False, allow_infinity=False)
event_types = st.sampled_from(["status", "plan", "assistant", "tool_call", "tool_result", "question",
                               "answer", "finish", "error", "checkpoint", "interrupted"])


@st.composite
def run_states(draw: st.DrawFn) -> RunState:
    n_events = draw(st.integers(0, 5))
    events = [Event(seq=i + 1, type=draw(event_types), data=draw(json_objects), time=draw(finite))
              for i in range(n_events)]
    return RunState(
        goal=draw(texts), id=draw(st.text(string.hexdigits.lower(), min_size=1, max_size=12)),
        status=draw(st.sampled_from(RUN_STATUSES)), plan=draw(st.lists(plan_steps, max_size=3)),
        messages=draw(st.lists(messages, max_size=3)), steps=draw(st.integers(0, 10**6)),
        budgets=Budgets(max_steps=draw(st.integers(0, 1000)), max_seconds=draw(finite)),
        model=draw(texts),
        origin=Origin(host=draw(texts), notebook_path=draw(texts), python=draw(texts),
                      packages=draw(st.dictionaries(texts, texts, max_size=3)), time=draw(finite)),
        events=events, question=draw(st.none() | texts), summary=draw(st.none() | texts),
        error=draw(st.none() | texts), created=draw(finite), updated=draw(finite),
    )


@FAST
@given(run_states())
def test_valid_run_states_round_trip_exactly(state: RunState) -> None:
    assert RunState.from_dict(state.to_dict()) == state
    assert RunState.from_json(state.to_json()) == state
    assert RunState.from_json(state.to_json().encode("utf-8")) == state
    # and through a real JSON text (what SQLite and the wire carry), key for key
    assert json.loads(RunState.from_json(state.to_json()).to_json()) == json.loads(state.to_json())


# -- hostile run states ------------------------------------------------------------------------------
def _from_dict_only_state_errors(data: Any) -> None:
    try:
        state = RunState.from_dict(data)
    except StateError as exc:
        assert str(exc), "a StateError must say what is wrong"
        return
    assert isinstance(state, RunState)


@FAST
@given(json_values)
def test_run_state_from_arbitrary_json_raises_only_state_error(data: Any) -> None:
    _from_dict_only_state_errors(data)


_VALID = RunState(goal="g", plan=[PlanStep("p")], messages=[
    Message("assistant", "t", tool_calls=[ToolCall("c1", "run_python", {"code": "x"})]),
    Message("tool", tool_results=[ToolResult("c1", "run_python", "ok")])],
    events=[Event(1, "status", {"status": "idle"})]).to_dict()


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a JSON value (so a mutation can hit any depth)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


@FAST
@given(st.sampled_from(_paths(_VALID)[1:]), json_values)
@example(("plan", 0, "status"), [])
@example(("messages", 0, "tool_calls"), 5)
@example(("schema_version",), True)
def test_run_state_with_one_field_corrupted_raises_only_state_error(path: tuple[Any, ...], value: Any) -> None:
    _from_dict_only_state_errors(_replace(_VALID, path, value))


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200))
@example("[" * 100_000)
@example('{"schema_version": 1, "goal": ' + "[" * 50_000)
@example(b"\xff\xfe\x00")
@example('{"schema_version": 2, "goal": "g"}')
def test_run_state_from_arbitrary_text_raises_only_state_error(text: str | bytes) -> None:
    try:
        RunState.from_json(text)
    except SchemaVersionError as exc:
        assert "upgrade" in str(exc)
    except StateError as exc:
        assert str(exc)


def test_a_newer_schema_says_upgrade() -> None:
    with pytest.raises(SchemaVersionError, match="upgrade"):
        RunState.from_dict(dict(_VALID, schema_version=99))


# -- hostile manifests --------------------------------------------------------------------------------
SHA_A, SHA_B = "a" * 64, "b" * 64
_MANIFEST: dict[str, Any] = {
    "schema_version": 1, "kind": "handoff-bundle", "created": 0.0,
    "chunks": {SHA_A: {"size": 8, "stored": 8, "codec": None, "crc32": 1},
               SHA_B: {"size": 10, "stored": 9, "codec": "zstd"}},
    "variables": [{"name": "df", "type": "pandas.DataFrame", "size": 1, "method": "pickle5", "group": "g1",
                   "summary": "DataFrame", "reason": None},
                  {"name": "gen", "type": "generator", "size": 0, "method": "replay", "reason": None}],
    "groups": [{"id": "g1", "names": ["df"], "method": "pickle5", "payload": [SHA_A],
                "buffers": [{"chunks": [SHA_B], "size": 10}]}],
    "replays": [{"names": ["gen"], "cell": 3, "code": "gen = (i for i in range(3))"}],
    "imports": ["import numpy as np", "from math import sqrt"],
    "history": {"In": ["", "x = 1"], "Out": {"2": {"text/plain": "1"}}},
    "files": [{"path": "data/sales.csv", "mode": 0o644, "size": 8, "sha256": SHA_A, "chunks": [SHA_A]}],
    "run": _VALID,
}


def test_the_reference_manifest_is_valid() -> None:
    """The mutation tests below start from a manifest the validator accepts (or they prove nothing)."""
    assert Manifest.parse(_MANIFEST).shas == [SHA_A, SHA_B]


def _validate_only_bundle_errors(manifest: Any) -> None:
    try:
        shas = Manifest.parse(manifest).shas
    except BundleError as exc:
        assert str(exc)
        return
    assert isinstance(shas, list) and all(isinstance(s, str) for s in shas)


@FAST
@given(json_values)
def test_validate_manifest_on_arbitrary_json_raises_only_bundle_error(data: Any) -> None:
    _validate_only_bundle_errors(data)


@FAST
@given(st.sampled_from(_paths(_MANIFEST)[1:]), json_values)
@example(("variables", 0, "group"), [])
@example(("chunks", SHA_B), 5)
@example(("chunks", SHA_A), [])
@example(("groups", 0, "buffers", 0, "chunks"), "ab")
def test_manifest_with_one_field_corrupted_raises_only_bundle_error(path: tuple[Any, ...], value: Any) -> None:
    _validate_only_bundle_errors(_replace(_MANIFEST, path, value))


@FAST
@given(st.sampled_from(["variables", "groups", "replays", "imports", "files", "chunks"]),
       st.lists(json_values, max_size=4) | st.dictionaries(st.text(max_size=70), json_values, max_size=4))
def test_manifest_with_junk_entries_raises_only_bundle_error(key: str, junk: Any) -> None:
    m = json.loads(json.dumps(_MANIFEST))
    if isinstance(m[key], list) and isinstance(junk, list):
        m[key] = m[key] + junk
    elif isinstance(m[key], dict) and isinstance(junk, dict):
        m[key] = {**m[key], **junk}
    else:
        m[key] = junk
    _validate_only_bundle_errors(m)


def test_manifest_over_the_entry_limit_is_rejected_with_the_limit() -> None:
    m = dict(_MANIFEST, imports=["import os"] * 101)
    with pytest.raises(BundleError, match="limit 100"):
        Manifest.parse(m, max_entries=100)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle")


@FAST
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
@example(b"[" * 100_000)
@example(json.dumps(_MANIFEST).encode()[:-7])   # truncated
@example(json.dumps(dict(_MANIFEST, schema_version=2)).encode())
def test_read_manifest_raises_only_bundle_error(bundle_dir: Path, raw: bytes) -> None:
    (bundle_dir / "manifest.json").write_bytes(raw)
    try:
        m = read_manifest(bundle_dir)
    except BundleSchemaError as exc:
        assert "upgrade" in str(exc)
        return
    except BundleError as exc:
        assert str(exc)
        return
    assert isinstance(m, dict) and m["kind"] == "handoff-bundle"


# -- path traversal -------------------------------------------------------------------------------------
safe_segment = st.text(st.characters(blacklist_characters="/\\\x00:", blacklist_categories=("Cs",)),  # type: ignore[arg-type]
                       min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
safe_paths = st.lists(safe_segment, min_size=1, max_size=4).map("/".join)


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    """Every traversal form: '..' segments, absolute, backslashes, drive letters, NUL, empty/'.' parts."""
    a, b = draw(safe_paths), draw(safe_paths)
    drive = draw(st.sampled_from(string.ascii_letters)) + ":"
    form = draw(st.sampled_from([
        "../{b}", "{a}/../{b}", "{a}/../../{b}", "{a}/..", "..", "../../{b}",
        "/{a}", "//{a}", "/../{a}", "/{a}/../../{b}",
        "{a}\\{b}", "..\\{b}", "{a}\\..\\..\\{b}", "\\{a}", "\\\\server\\share\\{a}",
        "{d}{a}", "{d}/{a}", "{d}\\{a}",
        "{a}\x00{b}", "{a}/\x00", "\x00",
        "{a}//{b}", "{a}/", "/", "", "./{a}", "{a}/./{b}", "{a}/.",
    ]))
    return form.format(a=a, b=b, d=drive)


def _file_manifest(path: Any) -> dict[str, Any]:
    return dict(_MANIFEST, files=[{"path": path, "mode": 0o644, "size": 8, "sha256": SHA_A, "chunks": [SHA_A]}])


@FAST
@given(hostile_paths())
@example("../" * 40 + "etc/passwd")
@example("C:\\Windows\\system32")
@example("a/" * 2100 + "b")   # over the length cap
def test_every_traversal_form_is_rejected(path: str) -> None:
    assert check_relpath(path) is not None
    with pytest.raises(BundleError, match="file"):
        Manifest.parse(_file_manifest(path))


@FAST
@given(safe_paths)
def test_safe_relative_paths_are_accepted(path: str) -> None:
    assert check_relpath(path) is None, path
    Manifest.parse(_file_manifest(path))


@FAST
@given(st.text(max_size=40) | hostile_paths() | safe_paths | json_values)
def test_an_accepted_path_always_stays_inside_the_root(path: Any) -> None:
    """The security property itself: whatever the check lets through, joined to a root and
    normalised, is strictly inside that root (POSIX and Windows readings alike)."""
    if check_relpath(path) is not None:
        return
    root = "/srv/handoff-runs/abc"
    joined = posixpath.normpath(posixpath.join(root, path))
    assert joined.startswith(root + "/"), path
    assert "\\" not in path and "\x00" not in path and not re.match(r"^[A-Za-z]:", path)
    assert os.path.normpath(os.path.join(root, path)).startswith(root + os.sep)


def test_non_string_paths_are_rejected() -> None:
    for bad in (None, 5, ["a"], {"p": "a"}, True):
        assert check_relpath(bad) is not None
        with pytest.raises(BundleError):
            Manifest.parse(_file_manifest(bad))


def test_a_manifest_with_more_variables_than_any_namespace_is_rejected_before_each_is_checked() -> None:
    from handoff_magic.manifest import MAX_VARIABLES
    junk = {"name": "v", "type": "int", "size": 1, "method": "skipped", "group": None, "summary": "", "reason": "x"}
    m = dict(_MANIFEST, variables=[junk] * (MAX_VARIABLES + 1))
    with pytest.raises(BundleError, match=f"{MAX_VARIABLES + 1} variable entries, more than the limit"):
        Manifest.parse(m)
