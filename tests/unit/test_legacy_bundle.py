"""A bundle written by the previous (flat) layout still loads: its pickles name
handoff_magic.capture._rebuild_* by module path, so those names must stay importable there."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from handoff_magic import load_state

LEGACY = Path(__file__).parents[1] / "data" / "legacy_bundle"


def test_bundle_from_the_flat_layout_loads_with_every_value(tmp_path: Path) -> None:
    bundle = tmp_path / "legacy"
    shutil.copytree(LEGACY, bundle)
    ns: dict = {}
    report = load_state(bundle, ns=ns, files=False)

    outcomes = {v.name: v.outcome for v in report.variables}
    assert outcomes.pop("lock") == "skipped"
    assert set(outcomes.values()) == {"ok"}, outcomes
    base = ns["base"]
    assert np.array_equal(base, np.arange(24.0))
    assert np.array_equal(ns["view"], base[2:20:3])
    assert np.shares_memory(ns["view"], base)                       # still a view of its base
    assert ns["stamps"].dtype == np.dtype("datetime64[ns]") and ns["stamps"].shape == (100,)
    assert str(ns["stamps"][-1]).startswith("2024-06-30")
    assert ns["words"].dtype == object and list(ns["words"][:2]) == ["w0", "w1"] and len(ns["words"]) == 3000
    frame = ns["frame"]
    assert isinstance(frame, pd.DataFrame) and frame.shape == (80_000, 2)
    assert list(frame["city"][:5]) == ["Oslo", "Lima", "Pune", "Kyiv", "Oslo"]
    assert ns["scale"](3.0) == 6.0 and ns["scale"](3.0, k=3) == 9.0
    points = ns["points"]
    assert isinstance(points[0], ns["Point"]) and [p.norm1() for p in points] == [3, 7]
    assert ns["double"](21) == 42
    assert ns["shared"] is ns["alias"] and ns["shared"] == [1, 2, 3]
    assert ns["plain"] == {"a": 1, "b": [1.5, "x"], "c": None}
    assert report.run is not None and report.run.goal == "legacy fixture goal"
