"""A chunk connection goes back to the idle list only after a response read to its end; one on
which anything raised, or whose response is left half-read, is closed instead."""
from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from handoff_magic.remote.connections import ChunkConnections


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, like the Jupyter Server

    def do_GET(self) -> None:
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def chunks() -> Iterator[ChunkConnections]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pool = ChunkConnections(f"http://127.0.0.1:{server.server_address[1]}/api", {}, 10.0,
                            ssl.create_default_context())
    try:
        yield pool
    finally:
        pool.close()
        server.shutdown()
        server.server_close()


def _get(chunks: ChunkConnections, read: bool = True) -> http.client.HTTPConnection:
    with chunks.connection() as lease:
        lease.conn.request("GET", f"{chunks.prefix}/blobs/a")
        reply = lease.conn.getresponse()
        if read:
            assert len(reply.read()) == 1000
        lease.keep_if_ended(reply)
        return lease.conn


def test_a_connection_read_to_the_end_is_reused(chunks: ChunkConnections) -> None:
    first = _get(chunks)
    assert _get(chunks) is first


def test_a_connection_on_which_something_raised_is_closed(chunks: ChunkConnections) -> None:
    with pytest.raises(RuntimeError), chunks.connection() as lease:
        lease.conn.request("GET", f"{chunks.prefix}/blobs/a")
        reply = lease.conn.getresponse()
        reply.read()
        lease.keep_if_ended(reply)
        broken = lease.conn
        raise RuntimeError("the caller refused the body")
    assert broken.sock is None
    assert _get(chunks) is not broken


def test_a_half_read_response_is_not_reused(chunks: ChunkConnections) -> None:
    half = _get(chunks, read=False)
    assert half.sock is None
    assert _get(chunks) is not half
