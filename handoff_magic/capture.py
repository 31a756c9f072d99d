"""Old home of the capture code (now ``handoff_magic.snapshot``), kept for one reason: bundles
written before the move name these rebuild functions by this module path inside their pickles
(``handoff_magic.capture._rebuild_view`` ...). They must stay importable here or those bundles stop
loading (tests/unit/test_legacy_bundle.py). Nothing else belongs in this module.
"""
from .snapshot.pickling import _rebuild_by_value
from .snapshot.reducers import _rebuild_from_buffer, _rebuild_str_array, _rebuild_str_codes, _rebuild_view

__all__ = ["_rebuild_by_value", "_rebuild_from_buffer", "_rebuild_str_array", "_rebuild_str_codes", "_rebuild_view"]
