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

# The digest is a second pass over the data (the chunks already hash the pickle): bounded so a
# capture never pays much for it. Larger objects are compared by their pickle bytes.
MAX_DIGEST_CELLS = 1_000_000
MAX_TEXT_CELLS = 100_000   # text costs most: it is hashed as UTF-8, not as memory


def content_digest(value: Any) -> str | None:
    """``blake3:<hex>`` of a pandas object's data, or None (not pandas, too big, or unhashable)."""
    pd = sys.modules.get("pandas")
    if pd is None or not isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
        return None
    try:
        dtypes = list(value.dtypes) if isinstance(value, pd.DataFrame) else [value.dtype]
        text_cells = sum(len(value) for t in dtypes if t == object)  # noqa: E721 - numpy dtypes compare equal to object; `is` never would
        if len(value) * len(dtypes) > MAX_DIGEST_CELLS or text_cells > MAX_TEXT_CELLS:
            return None
        h = blake3.blake3()
        h.update(type(value).__name__.encode())
        if isinstance(value, pd.DataFrame):
            h.update(repr([(str(c), str(t)) for c, t in value.dtypes.items()]).encode())
            for _, col in value.items():
                _column(h, col, pd)
            _index(h, value.index, pd)
        elif isinstance(value, pd.Series):
            h.update(repr((str(value.name), str(value.dtype))).encode())
            _column(h, value, pd)
            _index(h, value.index, pd)
        else:
            _index(h, value, pd)
        return "blake3:" + h.hexdigest()
    except (TypeError, ValueError, AttributeError):
        return None


def _column(h: Any, col: Any, pd: Any) -> None:
    """One column into the hash without building Python objects: numpy-backed numbers and dates
    by their bytes (no copy), anything else (text, categories, tz-aware dates) through pandas'
    vectorised hash_pandas_object, which never materialises the values."""
    import numpy as np
    if isinstance(col.dtype, np.dtype) and col.dtype.kind in "biufcmM":
        arr = col.to_numpy(copy=False)
        if arr.flags.c_contiguous:
            h.update(memoryview(arr.view(np.uint8) if arr.ndim == 1 else arr.reshape(-1).view(np.uint8)))
            return
    if col.dtype == object:
        items = col.to_numpy(copy=False).tolist()
        if set(map(type, items)) == {str}:   # a text column: its UTF-8, as the pickler sends it
            h.update(len(items).to_bytes(8, "little"))
            h.update("\0".join(items).encode("utf-8", "surrogatepass"))
            return
    h.update(memoryview(pd.util.hash_pandas_object(col, index=False).to_numpy()).cast("B"))


def _index(h: Any, index: Any, pd: Any) -> None:
    h.update(repr((type(index).__name__, list(index.names), str(index.dtype))).encode())
    h.update(memoryview(pd.util.hash_pandas_object(index, index=False).to_numpy()).cast("B"))
