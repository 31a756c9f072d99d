"""Chunks fetched from a server as the restore needs them: pull back without a local bundle.

``RemoteChunks`` is the chunk source ``snapshot.restore.restore_from`` reads from when pulling a
run back: out-of-band buffers are streamed from ``GET /blobs/{address}`` straight into the
arrays' own memory (a few GETs at once, on the client's kept-alive connections), hashed as the
bytes arrive; nothing is written to disk first and nothing is trusted before its hash matches.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from ..chunks import AddressHasher, ChunkRef, decode_chunk
from ..errors import BundleError

Progress = Callable[[int, int], None]


class RemoteChunks:
    """The ``ChunkStore`` reading interface over a server's blob routes."""

    local = False        # no files to map: restore reads buffers with read_into
    readers = 4          # GETs in flight while buffers fill

    def __init__(self, client: Any, chunks: dict[str, ChunkRef], progress: Progress | None = None) -> None:
        self.client = client
        self.chunks = chunks
        self.codecs = {sha: ref.codec for sha, ref in chunks.items()}
        self.progress = progress
        self.total = sum(ref.stored for ref in chunks.values())
        self.done = 0
        self._lock = threading.Lock()
        self._small: dict[str, bytes] = {}     # file chunks between their check and their write

    def _count(self, n: int) -> None:
        """Bytes arrived (negative: a retried chunk starts over)."""
        with self._lock:   # reported in order, so the bar never jumps back but for a rewind
            self.done += n
            if self.progress is not None:
                self.progress(self.done, max(self.total, self.done))

    def read_stored(self, sha: str) -> bytes:
        """The stored bytes of a chunk, hash-checked; kept until ``get`` takes them (a file's
        chunks are checked before anything is written, then written)."""
        data = self._small.get(sha)
        if data is None:
            data = self._fetch(sha)
            with self._lock:
                self._small[sha] = data
        return data

    def get(self, sha: str, codec: Any = ...) -> bytes:
        with self._lock:
            stored = self._small.pop(sha, None)
        if stored is None:
            stored = self._fetch(sha)
        return decode_chunk(sha, stored, self.codecs.get(sha) if codec is ... else codec)

    def read_into(self, sha: str, dest: memoryview, codec: str | None) -> None:
        """Stream a chunk into ``dest`` (its raw size), verifying its hash on the way."""
        if codec is not None:
            raw = decode_chunk(sha, self._fetch(sha), codec)
            if len(raw) != len(dest):
                raise BundleError(f"chunk {sha[:19]} decodes to {len(raw)} bytes, the manifest says {len(dest)}")
            dest[:] = raw
            return
        if not self.client.get_blob_into(sha, dest, self._count):
            raise BundleError(f"chunk {sha[:19]} arrived corrupted (hash mismatch); pull again, nothing was "
                              "changed here")

    def _fetch(self, sha: str) -> bytes:
        data = self.client.get_blob(sha)
        if not _matches(sha, data):
            raise BundleError(f"chunk {sha[:19]} arrived corrupted (hash mismatch); pull again, nothing was "
                              "changed here")
        self._count(len(data))
        return data

    def intact(self, sha: str, stored: Any) -> bool:
        return _matches(sha, stored)


def _matches(sha: str, data: Any) -> bool:
    h = AddressHasher(sha)
    h.update(data)
    return h.matches()


__all__ = ["RemoteChunks"]
