"""Per-type save/rebuild pairs used by the pickler (``reducer_override``) and their rebuild side.

Each ``_reduce_*`` turns one kind of object into a small, fast pickle (``(rebuild, args)``) and each
``_rebuild_*`` is what the pickle names: those names are part of the bundle format (old bundles
name them at ``handoff_magic.capture``, which re-exports them), so never rename one without
keeping the old name importable. Today: numpy views of a shared base stay views, text columns
travel as UTF-8 blobs or a string table + codes, datetimes go out of band.
"""
from __future__ import annotations

import pickle
import sys
from typing import Any, Callable

def np_root(arr: Any) -> Any:
    root = arr
    import numpy as np
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


STR_ARRAY_MIN = 2048          # object arrays smaller than this pickle fine as they are


STR_SLICE = 1 << 18           # strings per encoded slice: bounds the extra memory


def array_reducer(roots: dict[int, Any] | None) -> Callable[[Any], Any]:
    """reducer_override for numpy arrays (called by the C pickler only for non-builtin types):

    - views of a group's arrays are pickled as views, so they stay views of one base;
    - big object arrays holding only str (pandas text columns) are pickled as a few UTF-8 blobs
      instead of millions of memoised str objects: several times faster, far less memory.
    """
    import numpy as np

    def reduce(obj: Any) -> Any:
        if type(obj) is not np.ndarray:
            return NotImplemented
        if roots and obj.base is not None:
            root = np_root(obj)
            if root is not obj and id(root) in roots and root.flags.c_contiguous:
                off = obj.__array_interface__["data"][0] - root.__array_interface__["data"][0]
                return (_rebuild_view, (root, off, obj.shape, obj.strides, obj.dtype.str if not obj.dtype.fields
                                        else obj.dtype, bool(obj.flags.writeable)))
        kind = obj.dtype.kind
        if kind == "O" and obj.size >= STR_ARRAY_MIN:
            return _reduce_str_array(obj)
        if kind in "mM" and obj.size and (obj.flags.c_contiguous or obj.flags.f_contiguous):
            # numpy pickles datetime64/timedelta64 data in-band (a copy); send it out of band instead
            order = "C" if obj.flags.c_contiguous else "F"
            ints = obj.view(f"<i{obj.dtype.itemsize}" if obj.dtype.byteorder != ">" else f">i{obj.dtype.itemsize}")
            return (_rebuild_from_buffer, (pickle.PickleBuffer(ints), obj.dtype.str, obj.shape, order,
                                           bool(obj.flags.writeable)))
        return NotImplemented
    return reduce


def _rebuild_from_buffer(buf: Any, dtype: str, shape: tuple, order: str, writeable: bool) -> Any:
    import numpy as np
    dt = np.dtype(dtype)
    arr = np.frombuffer(buf, dtype=np.dtype(f"{dt.str[0]}i{dt.itemsize}")).view(dt)
    arr = arr.reshape(shape, order=order)  # type: ignore[call-overload]
    if writeable and not arr.flags.writeable:
        arr = arr.copy(order=order)       # the buffer came read-only: give back a writable array
    elif not writeable:
        arr.flags.writeable = False
    return arr


STR_CODES_SLICE = 1 << 20  # rows factorised at once when building a string table


STR_DEDUP_MIN = 1 << 16       # text columns at least this long are checked for repeated values


STR_DEDUP_SAMPLE = 20_000


def _repeats_a_lot(flat: Any) -> bool:
    """Whether a text column holds far fewer distinct values than items (city, status, label...),
    judged from a random sample: with s of n items drawn and k distinct values, about s²/2k
    of the drawn items repeat, so a column of unique strings shows none and costs nothing more."""
    import numpy as np
    n = flat.size
    s = min(n, STR_DEDUP_SAMPLE)
    idx = np.random.default_rng(0).choice(n, size=s, replace=False)
    repeats = s - len(set(flat[idx].tolist()))
    return repeats > 0 and s * s / (2 * repeats) * 4 <= n   # estimated distinct values <= n/4


def _reduce_str_codes(arr: Any, flat: Any) -> Any:
    """A text column with repeated values as its distinct strings (one UTF-8 blob) plus integer codes:
    the load then builds only the distinct str objects and one take, not millions of strs."""
    import pandas as pd
    import numpy as np
    # Factorised a slice at a time into one shared table, so only a slice's intp codes exist at
    # once (a whole-column factorize holds 8 bytes per row on top of the column: +30% peak memory).
    table: dict[Any, int] = {}
    codes = np.empty(flat.size, dtype=np.int32 if flat.size < 1 << 31 else np.int64)
    for start in range(0, flat.size, STR_CODES_SLICE):
        part_codes, part_uniques = pd.factorize(flat[start:start + STR_CODES_SLICE], use_na_sentinel=True)
        if part_codes.size and int(part_codes.min()) < 0:
            return None
        to_global = np.fromiter((table.setdefault(u, len(table)) for u in part_uniques),
                                dtype=codes.dtype, count=len(part_uniques))
        codes[start:start + STR_CODES_SLICE] = to_global[part_codes]
    k = len(table)
    if not k:
        return None
    small = np.uint8 if k <= 1 << 8 else np.uint16 if k <= 1 << 16 else codes.dtype
    if small != codes.dtype:
        codes = codes.astype(small)
    items = list(table)
    del table
    if set(map(type, items)) != {str}:
        return None
    text = "\0".join(items)
    if text.count("\0") != k - 1:
        return None
    del items
    return (_rebuild_str_codes, (arr.shape, k, text.encode("utf-8", "surrogatepass"), codes,
                                 bool(arr.flags.writeable)))


def _rebuild_str_codes(shape: tuple, k: int, blob: bytes, codes: Any, writeable: bool = True) -> Any:
    import numpy as np
    items = blob.decode("utf-8", "surrogatepass").split("\0")
    if len(items) != k:
        raise pickle.UnpicklingError(f"string table holds {len(items)} items, expected {k}")
    uniques = np.empty(k, dtype=object)
    uniques[:] = items
    out = uniques[np.asarray(codes)].reshape(shape)
    if not writeable:
        out.flags.writeable = False
    return out


def _reduce_str_array(arr: Any) -> Any:
    flat = arr.reshape(-1) if arr.flags.c_contiguous else arr.ravel()
    if flat.size >= STR_DEDUP_MIN and "pandas" in sys.modules and _repeats_a_lot(flat):
        try:
            reduced = _reduce_str_codes(arr, flat)
        except (TypeError, ValueError):   # unhashable or odd items: the plain path decides
            reduced = None
        if reduced is not None:
            return reduced
    parts: list[bytes] = []
    for i in range(0, flat.size, STR_SLICE):
        items = flat[i: i + STR_SLICE].tolist()
        if set(map(type, items)) != {str}:
            return NotImplemented
        text = "\0".join(items)
        if text.count("\0") != len(items) - 1:   # a string holds NUL itself: keep the normal path
            return NotImplemented
        parts.append(text.encode("utf-8", "surrogatepass"))
    return (_rebuild_str_array, (arr.shape, int(flat.size), parts, bool(arr.flags.writeable)))


def _rebuild_str_array(shape: tuple, n: int, parts: list[bytes], writeable: bool = True) -> Any:
    import numpy as np
    out = np.empty(n, dtype=object)
    i = 0
    for part in parts:
        items = part.decode("utf-8", "surrogatepass").split("\0")
        out[i: i + len(items)] = items
        i += len(items)
    if i != n:
        raise pickle.UnpicklingError(f"string array holds {i} items, expected {n}")
    out = out.reshape(shape)
    if not writeable:
        out.flags.writeable = False
    return out


def _rebuild_view(root: Any, offset: int, shape: tuple, strides: tuple, dtype: Any, writeable: bool) -> Any:
    import numpy as np
    base = root.reshape(-1).view(np.uint8) if root.ndim else root.reshape(1).view(np.uint8)
    arr = np.ndarray(shape, dtype=dtype, buffer=base, offset=offset, strides=strides)
    if not writeable:
        arr.flags.writeable = False
    return arr
