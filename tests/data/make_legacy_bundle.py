"""Writes tests/data/legacy_bundle/: a bundle saved by the flat layout (handoff_magic/capture.py,
commit 862efb9), before the snapshot/ split. Kept so the regression test can show what it holds;
re-running it with today's code would write a bundle of the NEW layout, so don't overwrite the data.

    python tests/data/make_legacy_bundle.py tests/data/legacy_bundle

Every name the old layout put into pickles by module path is exercised:
handoff_magic.capture._rebuild_view (a view of a shared base), _rebuild_from_buffer (datetime64
out of band), _rebuild_str_array (a unique text column), _rebuild_str_codes (a repetitive text
column, pandas loaded) and _rebuild_by_value (notebook functions and classes by value via dill).
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from handoff_magic import save_state
from handoff_magic.state import RunState


def scale(x: float, k: float = 2.0) -> float:
    return x * k


@dataclasses.dataclass
class Point:
    x: int
    y: int

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


def main(out: Path) -> None:
    base = np.arange(24, dtype=np.float64)
    ns = {
        "base": base,
        "view": base[2:20:3],                                                      # _rebuild_view
        "stamps": np.array(["2024-01-01", "2024-06-30"], dtype="datetime64[ns]").repeat(50),  # _rebuild_from_buffer
        "words": np.array([f"w{i}" for i in range(3000)], dtype=object),          # _rebuild_str_array
        "frame": pd.DataFrame({"city": np.array(["Oslo", "Lima", "Pune", "Kyiv"] * 20_000, dtype=object),
                               "n": np.arange(80_000)}),                          # _rebuild_str_codes
        "scale": scale,                                                            # _rebuild_by_value (function)
        "Point": Point,                                                            # _rebuild_by_value (class)
        "points": [Point(1, -2), Point(3, 4)],
        "double": lambda v: v * 2,
        "shared": (lst := [1, 2, 3]),
        "alias": lst,
        "lock": threading.Lock(),                                                   # skipped (no defining cell)
        "plain": {"a": 1, "b": [1.5, "x"], "c": None},
    }
    run = RunState(goal="legacy fixture goal", id="legacy000001")
    save_state(out, ns=ns, run=run, files=False, environ={})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
