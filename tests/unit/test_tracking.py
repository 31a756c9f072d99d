"""Change tracking of big buffers: a re-capture reuses a chunk only when its bytes provably did
not change (userfaultfd write-protect on anonymous memory), and a changed byte is never missed."""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handoff_magic import chunks, load_state, save_state
from handoff_magic.chunks import CHUNK_SIZE
from handoff_magic.tracking import PAGE, TRACKER, buffer_address

TRACKING = TRACKER._userfaultfd() is not None
needs_uffd = pytest.mark.skipif(not TRACKING, reason="this kernel has no userfaultfd async write-protect "
                                                     "(Linux >= 6.7); buffers are simply re-hashed")


def _buffer(chunks: float) -> np.ndarray:
    return np.random.default_rng(0).random(int(CHUNK_SIZE * chunks) // 8)


@needs_uffd
def test_only_written_chunks_are_reported_changed() -> None:
    t = TRACKER
    a = _buffer(5.5)
    mv = memoryview(a).cast("B")  # type: ignore[arg-type]  # numpy: a buffer
    refs = [f"r{i}" for i in range(6)]
    assert t.reusable(mv, CHUNK_SIZE) == [None] * 6            # first sight: hash everything
    t.record(mv, CHUNK_SIZE, refs)
    assert t.reusable(mv, CHUNK_SIZE) == refs                  # nothing written since
    t.record(mv, CHUNK_SIZE, refs)
    a[(3 * CHUNK_SIZE + CHUNK_SIZE // 2) // 8] += 1.0          # middle of chunk 3
    got = t.reusable(mv, CHUNK_SIZE)
    assert got[3] is None and [g for i, g in enumerate(got) if i != 3] == [r for i, r in enumerate(refs) if i != 3]
    t.record(mv, CHUNK_SIZE, refs)

    # writes that bypass Python: a C thread (numpy releases the GIL), read(2) into the buffer
    th = threading.Thread(target=np.copyto, args=(a[CHUNK_SIZE // 8 + 1000: CHUNK_SIZE // 8 + 1010], 7.0))
    th.start()
    th.join()
    r, w = os.pipe()
    os.write(w, b"x" * 64)
    os.readv(r, [mv[5 * CHUNK_SIZE + 100: 5 * CHUNK_SIZE + 164]])
    os.close(r)
    os.close(w)
    got = t.reusable(mv, CHUNK_SIZE)
    assert got[1] is None and got[5] is None and got[0] == "r0" and got[3] == "r3"
    t.record(mv, CHUNK_SIZE, refs)

    # pages dropped by madvise(MADV_DONTNEED) now read as zeros: that is a change too
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = (buffer_address(mv) + 2 * CHUNK_SIZE) // PAGE * PAGE + PAGE
    assert libc.madvise(page, PAGE, 4) == 0
    assert t.reusable(mv, CHUNK_SIZE)[2] is None


@needs_uffd
def test_a_new_buffer_at_an_old_address_is_hashed_again() -> None:
    t = TRACKER
    a = _buffer(4)
    mv = memoryview(a).cast("B")  # type: ignore[arg-type]  # numpy: a buffer
    t.reusable(mv, CHUNK_SIZE)
    t.record(mv, CHUNK_SIZE, ["r0", "r1", "r2", "r3"])
    addr, n = buffer_address(mv), len(mv)
    del mv, a
    b = np.full(n // 8, 3.0)           # freed mapping, new mapping: not registered any more
    mv2 = memoryview(b).cast("B")  # type: ignore[arg-type]  # numpy: a buffer
    if buffer_address(mv2) == addr:
        assert t.reusable(mv2, CHUNK_SIZE) == [None] * 4


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes hashed into chunk addresses (what a re-capture had to read)."""
    seen: list[int] = []
    real = chunks.address_of

    def spy(stored: Any) -> str:
        seen.append(len(stored))
        return real(stored)
    monkeypatch.setattr(chunks, "address_of", spy)
    return seen


def test_recapture_after_small_change_is_right_and_reads_little(tmp_path: Path, hashed: list[int]) -> None:
    """The user-visible promise: values after a re-capture are the new ones, and (where tracking
    works) only the changed chunk is read again."""
    ns: dict[str, Any] = {"a": _buffer(6), "b": _buffer(3)}
    bundle = tmp_path / "b"
    save_state(bundle, ns=ns, files=False, environ={})
    ns["a"][12345] = -1.0
    hashed.clear()
    save_state(bundle, ns=ns, files=False, environ={})
    if TRACKING:   # the changed chunk, plus at most one whose edge page it shares with other heap objects
        assert sum(hashed) <= 2 * CHUNK_SIZE + 64 * 1024
    out: dict[str, Any] = {}
    load_state(bundle, ns=out, files=False)
    assert out["a"][12345] == -1.0 and np.array_equal(out["a"], ns["a"]) and np.array_equal(out["b"], ns["b"])
    fresh = tmp_path / "fresh"                     # another bundle: reused refs must be written there too
    save_state(fresh, ns=ns, files=False, environ={})
    out2: dict[str, Any] = {}
    load_state(fresh, ns=out2, files=False)
    assert np.array_equal(out2["a"], ns["a"])


def test_a_loaded_bundle_saved_again_reads_only_what_was_written(tmp_path: Path, hashed: list[int]) -> None:
    """Restored arrays map the chunk files privately; saving them again (a server checkpoint)
    reuses every chunk whose pages are still the file's, and re-hashes a written one."""
    bundle = tmp_path / "b"
    save_state(bundle, ns={"a": _buffer(6)}, files=False, environ={})
    ns: dict[str, Any] = {}
    load_state(bundle, ns=ns, files=False)
    first = ns["a"].copy()
    hashed.clear()
    save_state(bundle, ns=ns, files=False, environ={})
    assert sum(hashed) < 64 * 1024                      # nothing but the small pickle stream
    ns["a"][3 * CHUNK_SIZE // 8 + 100] = -5.0
    hashed.clear()
    third = save_state(bundle, ns=ns, files=False, environ={})
    assert 0 < third.bytes_new and sum(hashed) <= CHUNK_SIZE + 64 * 1024     # the written chunk only
    out: dict[str, Any] = {}
    load_state(bundle, ns=out, files=False)
    first[3 * CHUNK_SIZE // 8 + 100] = -5.0
    assert np.array_equal(out["a"], first)
