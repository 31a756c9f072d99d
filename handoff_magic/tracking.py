"""Which chunks of a big buffer are *provably* unchanged since they were last hashed.

A re-capture must not re-read a gigabyte to learn that it did not change. Guessing (sampled
fingerprints, object ids, ``flags.writeable``) is not enough: numpy lets anyone flip the flag
back, and a sample misses a changed byte. Two facts the Linux kernel itself maintains are:

* **Anonymous memory** (what numpy allocates): the buffer's pages are registered with
  ``userfaultfd`` in asynchronous write-protect mode (Linux >= 6.7, ``UFFD_FEATURE_WP_ASYNC``).
  The kernel then clears a page's protection bit on *any* write through this process's page
  tables -- Python, C extensions, BLAS threads, ``read(2)``/``recv_into`` (``copy_to_user``),
  ``O_DIRECT``/``process_vm_writev`` (``get_user_pages`` with FOLL_WRITE) -- and
  ``ioctl(PAGEMAP_SCAN, PM_SCAN_WP_MATCHING)`` reports the written pages *and* protects them
  again in one step under the page-table lock, so no write between "read" and "reset" is lost.
  A page discarded by ``madvise(MADV_DONTNEED)`` is reported as written too. A mapping that
  was replaced (freed and re-allocated at the same address) is no longer registered: the scan
  refuses it (``PM_SCAN_CHECK_WPASYNC``) and the buffer is hashed again.
* **Private file mappings** (buffers restored by mapping chunk files, ``restore._stitched_map``):
  ``/proc/self/pagemap`` says per page whether it is still the file's page (bit 61) or was
  copied on write; a page never faulted in is the file's too. The file itself is checked by
  ``(dev, inode, size, mtime_ns, ctime_ns)`` against what it was when it was mapped (and
  verified); chunk files are content addressed and only ever replaced by rename.

A chunk is reused only when every page under it is clean by one of these rules and the buffer
has the same address and length as when its chunks were recorded; anything else (another OS,
an older kernel, userfaultfd refused, a buffer smaller than a chunk) is simply hashed again.
What is NOT covered, and why it does not matter here: a write made while a capture is reading
that very buffer (the capture is then torn either way, tracked or not), and memory shared with
another process (MAP_SHARED anonymous memory, ``np.memmap`` of a file another process writes):
userfaultfd does not register those as private anonymous memory, so they are always re-hashed.

Cost: after a capture, the first write to each tracked page takes one minor fault (about a
second per GiB rewritten on this VM, once per capture); reads cost nothing.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
MIN_TRACKED = 4 * 1024 * 1024          # smaller buffers are cheap to hash; tracking them splits VMAs

# <linux/userfaultfd.h>, <linux/fs.h>
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFDIO_API = 0xC018AA3F
_UFFDIO_REGISTER = 0xC020AA00
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_PAGEMAP_SCAN = 0xC0606610
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class _Scan(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask")]


def buffer_address(view: memoryview) -> int:
    """Address of a contiguous buffer's first byte (read-only buffers included)."""
    import numpy as np
    arr = np.frombuffer(view, dtype=np.uint8)
    return int(arr.__array_interface__["data"][0]) if arr.size else 0


def _page_span(addr: int, nbytes: int) -> tuple[int, int]:
    return addr // PAGE * PAGE, (addr + nbytes + PAGE - 1) // PAGE * PAGE


@dataclass
class _FileMap:
    """One chunk file mapped privately at ``start`` (restore's stitched mappings)."""
    start: int
    size: int
    path: str
    stat: tuple[int, ...]


@dataclass
class _Record:
    chunk: int                          # chunk size the refs were cut at
    refs: list[Any] = field(default_factory=list)


def _file_stat(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BufferTracker:
    """Per process: buffers whose chunk addresses are known, and whether their bytes changed since."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[int, int], _Record] = {}
        self._files: dict[int, _FileMap] = {}          # start address -> mapped chunk file
        self._uffd: int | None = None
        self._uffd_failed = False
        self._libc: Any = None

    # -- kernel interfaces -----------------------------------------------------------------
    def _lib(self) -> Any:
        if self._libc is None:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.syscall.restype = ctypes.c_long
            lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
            lib.ioctl.restype = ctypes.c_int
            self._libc = lib
        return self._libc

    def _userfaultfd(self) -> int | None:
        """The process's one userfaultfd in async write-protect mode, or None where unavailable."""
        if self._uffd is not None or self._uffd_failed:
            return self._uffd
        self._uffd_failed = True
        nr = _SYS_USERFAULTFD.get(os.uname().machine) if sys.platform.startswith("linux") else None
        if nr is None:
            return None
        lib = self._lib()
        for flags in (os.O_CLOEXEC | os.O_NONBLOCK, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY):
            fd = int(lib.syscall(nr, flags))
            if fd < 0:
                continue
            api = _Api(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
            if lib.ioctl(fd, _UFFDIO_API, ctypes.byref(api)) == 0 and self._pagemap_scan_works():
                self._uffd, self._uffd_failed = fd, False
                return fd
            os.close(fd)
        log.debug("userfaultfd write-protect tracking unavailable (errno %s); big buffers are re-hashed",
                  ctypes.get_errno())
        return None

    @staticmethod
    def _pagemap_scan_works() -> bool:
        return os.path.exists("/proc/self/pagemap")

    def _register(self, start: int, end: int) -> bool:
        fd = self._userfaultfd()
        if fd is None:
            return False
        reg = _Register(start, end - start, _UFFDIO_REGISTER_MODE_WP, 0)
        if self._lib().ioctl(fd, _UFFDIO_REGISTER, ctypes.byref(reg)) != 0:
            return False     # not private anonymous memory, or registered by someone else
        return self._written(start, end) is not None   # protects every page now

    def _written(self, start: int, end: int) -> list[tuple[int, int]] | None:
        """Written page ranges in [start, end) since the last scan, protecting them again;
        None if the range is not (or no longer) tracked."""
        lib = self._lib()
        cap = 256
        vec = (_Region * cap)()
        out: list[tuple[int, int]] = []
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            pos = start
            while pos < end:
                arg = _Scan(ctypes.sizeof(_Scan), _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, pos, end, 0,
                            ctypes.addressof(vec), cap, 0, 0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
                n = lib.ioctl(fd, _PAGEMAP_SCAN, ctypes.byref(arg))
                if n < 0:
                    return None
                out.extend((vec[i].start, vec[i].end) for i in range(n))
                if arg.walk_end <= pos:
                    return None
                pos = arg.walk_end
        finally:
            os.close(fd)
        return out

    def _file_pages_clean(self, start: int, end: int) -> bool:
        """Every page of [start, end) in tracked file maps is still the (unchanged) file's page."""
        maps = [m for m in self._files.values() if m.start < end and start < m.start + m.size]
        covered = sum(min(end, _page_span(m.start, m.size)[1]) - max(start, m.start) for m in maps)
        if covered < end - start or any(_file_stat(m.path) != m.stat for m in maps):
            return False
        import numpy as np
        first, last = start // PAGE, (end + PAGE - 1) // PAGE
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(first * 8)
            raw = f.read((last - first) * 8)
        if len(raw) != (last - first) * 8:
            return False
        flags = np.frombuffer(raw, dtype=np.uint64)
        present = (flags & np.uint64(_PM_PRESENT)) != 0
        swapped = (flags & np.uint64(_PM_SWAPPED)) != 0
        file_page = (flags & np.uint64(_PM_FILE)) != 0
        return bool(np.all(np.where(present, file_page, ~swapped)))

    # -- the API capture and restore use ------------------------------------------------------
    def reusable(self, view: memoryview, chunk: int) -> list[Any | None]:
        """Per ``chunk``-sized slice of ``view``: the recorded ChunkRef when its bytes provably did
        not change since it was recorded, else None. Also (re)arms tracking, so call it BEFORE
        reading the bytes you are about to hash, then ``record`` the new refs."""
        n = len(view)
        slices = max(1, (n + chunk - 1) // chunk)
        none: list[Any | None] = [None] * slices
        if n < MIN_TRACKED:
            return none
        addr = buffer_address(view)
        start, end = _page_span(addr, n)
        with self._lock:
            rec = self._records.get((addr, n))
            if rec is not None and rec.chunk != chunk:
                rec = None
            if any(m.start < end and start < m.start + m.size for m in self._files.values()):
                if rec is None:
                    return none
                out: list[Any | None] = []
                for i, ref in enumerate(rec.refs):
                    lo, hi = _page_span(addr + i * chunk, min(chunk, n - i * chunk))
                    out.append(ref if self._file_pages_clean(lo, hi) else None)
                return out
            written = self._written(start, end)
            if written is None:                        # not tracked (yet): track it from now on
                self._records.pop((addr, n), None)
                self._register(start, end)
                return none
            if rec is None:
                return none
            out = list(rec.refs)
            for lo, hi in written:
                first = max(0, (lo - addr) // chunk)
                last = min(slices - 1, (hi - 1 - addr) // chunk)
                for i in range(first, last + 1):
                    out[i] = None
            return out

    def record(self, view: memoryview, chunk: int, refs: Sequence[Any]) -> None:
        """The chunk refs of ``view`` as just hashed (after ``reusable``) or verified on load."""
        n = len(view)
        if n < MIN_TRACKED or len(refs) != max(1, (n + chunk - 1) // chunk):
            return
        with self._lock:
            self._records[(buffer_address(view), n)] = _Record(chunk, list(refs))

    def track_loaded(self, view: memoryview) -> None:
        """A buffer restore just filled in anonymous memory: protect it now, so ``record``ed refs
        hold until the next write."""
        if len(view) >= MIN_TRACKED:
            start, end = _page_span(buffer_address(view), len(view))
            with self._lock:
                if self._written(start, end) is None:
                    self._register(start, end)

    def track_file_map(self, start: int, size: int, path: str) -> None:
        """A chunk file restore mapped privately at ``start`` (its bytes verified just after)."""
        st = _file_stat(path)
        if st is not None and size:
            with self._lock:
                self._files[start] = _FileMap(start, size, path, st)

    def forget_file_maps(self, start: int, length: int) -> None:
        """The mapping at [start, start+length) is gone (unmapped)."""
        with self._lock:
            for s in [s for s in self._files if start <= s < start + length]:
                del self._files[s]
            for key in [k for k in self._records if start <= k[0] < start + length]:
                del self._records[key]


TRACKER = BufferTracker()

__all__ = ["TRACKER", "BufferTracker", "MIN_TRACKED", "buffer_address"]
