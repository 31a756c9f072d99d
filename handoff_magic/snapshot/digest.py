"""Content digests of variables whose pickle is not a function of their data.

A DataFrame restored from a bundle pickles a few bytes differently from the one that was
sent (pandas consolidates its blocks on load), so comparing pickles would mark it "changed"
in Review diff although not one value differs. Such objects get a digest of their data
(values, index, columns, dtypes); the diff compares digests when both sides have one.
Everything else is compared by its chunk addresses, which already are a digest of its pickle.
"""
from __future__ import annotations

import sys
from typing import Any

import blake3

MAX_DIGEST_BYTES = 512 * 1024 * 1024   # above this the extra pass over the data would cost too much


def content_digest(value: Any) -> str | None:
    """``blake3:<hex>`` of a pandas object's data, or None (not pandas, too big, or unhashable)."""
    pd = sys.modules.get("pandas")
    if pd is None or not isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
        return None
    try:
        if int(value.memory_usage(deep=False).sum() if hasattr(value, "columns") else value.memory_usage()) \
                > MAX_DIGEST_BYTES:
            return None
        h = blake3.blake3()
        h.update(type(value).__name__.encode())
        if isinstance(value, pd.DataFrame):
            h.update(repr([(str(c), str(t)) for c, t in value.dtypes.items()]).encode())
            _frame_data(h, value.reset_index(drop=True), pd)
            _index(h, value.index, pd)
        elif isinstance(value, pd.Series):
            h.update(repr((str(value.name), str(value.dtype))).encode())
            _frame_data(h, value.reset_index(drop=True).to_frame(), pd)
            _index(h, value.index, pd)
        else:
            _index(h, value, pd)
        return "blake3:" + h.hexdigest()
    except (TypeError, ValueError, AttributeError):
        return None


def _frame_data(h: Any, frame: Any, pd: Any) -> None:
    for _, col in frame.items():
        arr = col.to_numpy()
        if arr.dtype.kind in "biufcmM" and arr.flags.c_contiguous:
            h.update(memoryview(arr).cast("B"))     # numbers and dates: their bytes, no copy
        else:
            h.update(memoryview(pd.util.hash_pandas_object(col, index=False).to_numpy()).cast("B"))


def _index(h: Any, index: Any, pd: Any) -> None:
    h.update(repr((type(index).__name__, list(index.names), str(index.dtype))).encode())
    h.update(memoryview(pd.util.hash_pandas_object(index, index=False).to_numpy()).cast("B"))
