"""The JSON API under ``/handoff/api``: each handler parses its request (api.py), calls one
``RunService`` method (service.py) and sends the result; auth and errors are http.py's.
The HTML pages are pages.py's; ``handlers()`` lists every route of the extension.
"""
from __future__ import annotations

import asyncio
import copy
import mmap
import os
from pathlib import Path
from typing import Any, cast

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError

from handoff_magic.chunks import CHUNK_SIZE

from . import pages
from .api import parse_answer, parse_create, parse_events_query, parse_pull_timeout, parse_shas
from .blobs import BlobWriter, check_sha
from .errors import BadRequest, BlobError, BlobTooLarge, NotFound, ServerError
from .http import RESOURCE, ApiHandler, is_authorized
from .workspace import API

RUN_ID = pages.RUN_ID
DISCARD_BYTES = 4 * 1024 * 1024     # refused uploads up to this size are drained to answer cleanly


class MissingBlobsHandler(ApiHandler):
    @web.authenticated
    @authorized
    def post(self) -> None:
        shas = parse_shas(self.json_body())
        for sha in shas:
            check_sha(sha)
        # the bundle limit travels along, so a client streaming chunks can stop before uploading
        # a bundle this server would refuse anyway
        self.send({"missing": self.service.blobs.missing(shas),
                   "max_bundle_bytes": self.service.settings.max_bundle_bytes})


BODY_PIECE = 1024 * 1024   # bytes tornado hands a streaming upload at once (its default is 64 KiB)
BODY_BUFFER = CHUNK_SIZE   # uploads up to this size are received into a reused buffer
YIELD_BYTES = 4 * 1024 * 1024   # let other requests run after this much of one body (as tornado does)


class _BodyBuffers:
    """Receive buffers reused from one chunk upload to the next (used on the event loop only).

    Tornado reads a streamed body into a new 1 MiB bytearray per piece, appends it to its read
    buffer and slices a new bytes object off that: three copies and fresh memory to fault in
    per piece. An upload read with ``read_into`` into one of these lands in place, in one copy;
    its pieces are views of it, so a buffer is reused only after its upload was committed (every
    piece hashed and written)."""

    KEEP = 8

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(BODY_BUFFER)

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.KEEP:
            self._free.append(buf)


_BUFFERS = _BodyBuffers()


def _bigger_body_pieces(connection: Any) -> None:
    """Read this upload connection's bodies in pieces of up to BODY_PIECE: 16x fewer callbacks
    per chunk. The parameters object is shared by every connection of the server, so this one
    gets its own copy; other handlers are unaffected."""
    params = getattr(connection, "params", None)
    if params is not None and getattr(params, "chunk_size", BODY_PIECE) < BODY_PIECE:
        params = copy.copy(params)
        params.chunk_size = BODY_PIECE
        connection.params = params
    stream = getattr(connection, "stream", None)
    if stream is not None and getattr(stream, "read_chunk_size", BODY_PIECE) < BODY_PIECE:
        stream.read_chunk_size = BODY_PIECE


@web.stream_request_body
class BlobHandler(ApiHandler):
    """HEAD (exists?), GET (stored bytes), PUT (streamed upload, hash verified, size capped)."""

    _writer: BlobWriter | None = None
    _deferred: Exception | None = None
    _buffer: bytearray | None = None

    async def prepare(self) -> None:  # type: ignore[override]
        if self.request.method != "PUT":
            await super().prepare()
            return
        # The body streams in before put() runs, so authenticate and bound it here. An error is
        # answered after the (small) body is drained: closing a socket with unread bytes resets
        # it, and the client would never see the JSON error.
        try:
            await super().prepare()
            if not self.current_user:
                raise web.HTTPError(403, "no valid token or login")
            if not await is_authorized(self, "write"):
                raise web.HTTPError(403, f"user may not write to resource {RESOURCE}")
            sha = self.path_kwargs["sha"]
            try:
                check_sha(sha)
            except BlobError as exc:
                raise BlobError(exc.message, "PUT each chunk at /handoff/api/blobs/<sha256 of its "
                                "bytes>") from None
            cap = self.service.settings.max_chunk_bytes
            length = self.request.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise BlobTooLarge(f"chunk of {int(length)} bytes is over the {cap} byte limit",
                                   "split data into smaller chunks or raise HandoffApp.max_chunk_bytes")
            self._cap_body(cap + DISCARD_BYTES)
            _bigger_body_pieces(self.request.connection)
            self._writer = self.service.blobs.writer(sha, cap)
            if length is not None and length.isdigit() and 0 < int(length) <= BODY_BUFFER:
                self._receive_in_place()
        except (web.HTTPError, ServerError) as exc:
            self._deferred = exc
            self._cap_body(DISCARD_BYTES)

    def _receive_in_place(self) -> None:
        """Read this request's body with ``read_into`` into a reused buffer (see _BodyBuffers)
        instead of tornado's copying reads: this request's connection object (tornado makes one
        per request) gets its own ``_read_fixed_body``; anything unexpected keeps tornado's."""
        conn = self.request.connection
        stream = getattr(conn, "stream", None)
        deliver = getattr(conn, "_deliver_body", None)
        if stream is None or deliver is None or not hasattr(conn, "_read_fixed_body") \
                or not hasattr(stream, "read_into"):
            return
        buf = self._buffer = _BUFFERS.take()
        view = memoryview(buf)

        async def read_fixed_body(content_length: int, delegate: Any) -> None:
            if content_length > len(view):   # cannot happen (Content-Length was checked); be safe
                raise web.HTTPError(400, "body larger than its Content-Length")
            pos = work = 0
            while pos < content_length:
                n = await stream.read_into(view[pos: min(content_length, pos + BODY_PIECE)], partial=True)
                await deliver(delegate, view[pos: pos + n])
                pos += n
                work += n
                if work >= YIELD_BYTES:
                    work = 0
                    await asyncio.sleep(0)

        conn._read_fixed_body = read_fixed_body  # type: ignore[union-attr]

    def _cap_body(self, limit: int) -> None:
        cast(HTTP1Connection, self.request.connection).set_max_body_size(limit)

    def data_received(self, chunk: bytes) -> Any:
        """Hand the piece to the writer's thread; when the disk is behind, tornado waits for the
        returned future before it reads more (back pressure instead of memory)."""
        if self._writer is None:
            return None  # draining a refused body
        self.service.blobs.moved()
        try:
            if self._writer.offer(chunk):
                return None
            return asyncio.get_running_loop().run_in_executor(None, self._write_or_refuse, self._writer, chunk)
        except BlobError as exc:  # over the cap while streaming (no Content-Length)
            self._refuse(exc)
            return None

    def _write_or_refuse(self, writer: BlobWriter, chunk: bytes) -> None:
        try:
            writer.write(chunk)
        except BlobError as exc:
            self._refuse(exc)

    def _refuse(self, exc: BlobError) -> None:
        self._writer = None
        self._deferred = exc

    def on_connection_close(self) -> None:
        if self._writer is not None:  # cut mid-body: drop the temp file, nothing is published
            self._writer.abort()
            self._writer = None
        super().on_connection_close()

    def on_finish(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    @web.authenticated
    @authorized
    async def put(self, sha: str) -> None:
        if self._deferred is not None:
            raise self._deferred
        writer, self._writer = self._writer, None
        if writer is None:
            raise BadRequest("upload was not received", "retry the PUT")
        # off the event loop (hash check, close); made durable in one batch when the run is
        # created (BlobStore.settle), not one fsync per chunk
        try:
            created = await asyncio.to_thread(writer.commit, durable=False)
        finally:
            buf, self._buffer = self._buffer, None
            if buf is not None:   # the body was read to its end and every piece written
                _BUFFERS.give(buf)
        self.send({"sha256": sha, "size": writer.size, "created": created}, 201 if created else 200)

    def _existing(self, sha: str) -> Path:
        """The blob's file (call it in a thread: an upload not yet durable is fsynced first)."""
        path = self.service.blobs.path(sha)
        if not path.is_file():
            raise NotFound(f"chunk {sha} is not on this server", "upload it with PUT")
        return path

    def _mapped(self, sha: str) -> tuple[int, mmap.mmap | None]:
        """The blob's size and a read-only mapping of it with its pages read in (call it in a
        thread). Uploads skip the page cache and a run's kernel maps its chunks without reading
        them, so a pull back's GET is often the first read: from the disk, which must not stall
        the event loop in the middle of a socket write."""
        with open(self._existing(sha), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # blobs are published by rename and never written in place, so the mapping stays valid
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if mapped is not None:
            _ = mapped[::mmap.PAGESIZE]   # a byte a page: every page is faulted in here, not on the loop
        return size, mapped

    @web.authenticated
    @authorized
    async def head(self, sha: str) -> None:
        path = await asyncio.to_thread(self._existing, sha)
        self.set_header("Content-Length", str(path.stat().st_size))
        self.set_status(200)
        self.finish(set_content_type="application/octet-stream")

    @web.authenticated
    @authorized
    async def get(self, sha: str) -> None:
        """The stored bytes, sent from a read-only mapping of the blob: the page cache goes to the
        socket in one copy, with no read() loop on the event loop (reading 1 MiB pieces into bytes
        first cost about a quarter of the loop's time during a pull back)."""
        blobs = self.service.blobs
        blobs.moved()
        size, mapped = await asyncio.to_thread(self._mapped, sha)
        self.set_header("Content-Length", str(size))
        self.set_header("Content-Type", "application/octet-stream")   # never gzip-transformed
        if mapped is not None:
            try:
                await self.flush()   # the headers; the body goes straight to the connection (no join)
                await self.request.connection.write(memoryview(mapped))  # type: ignore[union-attr, arg-type]
            except StreamClosedError:
                return   # the client went away mid-body; it retries the chunk on a new connection
            finally:
                blobs.moved()
        self.finish()


class RunsHandler(ApiHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.send({"runs": self.service.list_runs()})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        summary, created = await self.service.create(parse_create(self.json_body()))
        self.send(summary, 201 if created else 200)


class RunHandler(ApiHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        self.send(self.service.summary(run_id))


class EventsHandler(ApiHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        query = parse_events_query(self.get_argument, self.service.settings.max_events_wait)
        page = await self.service.events(run_id, query)
        stream = self.request.connection.stream if self.request.connection is not None else None  # type: ignore[attr-defined]
        if stream is not None and stream.closed():
            return  # the client went away while we waited
        self.send(page)


class AnswerHandler(ApiHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        self.service.summary(run_id)
        self.send(await self.service.answer(run_id, parse_answer(self.json_body())))


class CancelHandler(ApiHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        self.send(await self.service.cancel(run_id))


class PullHandler(ApiHandler):
    @web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        self.service.summary(run_id)
        self.send(await self.service.pull(run_id, parse_pull_timeout(self.json_body())))


class BundleHandler(ApiHandler):
    @web.authenticated
    @authorized
    def get(self, run_id: str) -> None:
        self.send(self.service.bundle(run_id))


class DiffHandler(ApiHandler):
    @web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        self.send(await self.service.diff(run_id))


def handlers() -> list[tuple[str, type]]:
    return [
        (rf"{API}/blobs/missing", MissingBlobsHandler),
        (rf"{API}/blobs/(?P<sha>[^/]+)", BlobHandler),
        (rf"{API}/runs", RunsHandler),
        (rf"{API}/runs/{RUN_ID}", RunHandler),
        (rf"{API}/runs/{RUN_ID}/events", EventsHandler),
        (rf"{API}/runs/{RUN_ID}/answer", AnswerHandler),
        (rf"{API}/runs/{RUN_ID}/cancel", CancelHandler),
        (rf"{API}/runs/{RUN_ID}/pull", PullHandler),
        (rf"{API}/runs/{RUN_ID}/bundle", BundleHandler),
        (rf"{API}/runs/{RUN_ID}/diff", DiffHandler),
        *pages.routes(),
    ]
