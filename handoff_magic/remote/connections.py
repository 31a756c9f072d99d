"""Kept-alive stdlib HTTP connections for chunk bodies (``GET`` and ``PUT /blobs/{address}``).

Why not httpx here: its HTTP/1.1 stack (h11) hands a body over in 64 KiB pieces and copies each
byte three or four times in Python on the way (about 3 CPU-seconds per GB on the 2-core test
machine, more than the server's whole share of a pull back). ``http.client``'s ``readinto``
lands the bytes in their destination (a restored array's memory) in one copy, from C, and
``send`` hands an upload's pieces (views of the live arrays) to the socket without one. Every
other request, and chunk bodies when an environment proxy applies (httpx honours it, this path
does not), stays on httpx. Status codes and retries remain ``HandoffClient``'s job.
"""
from __future__ import annotations

import http.client
import ssl
import threading
import urllib.request
from urllib.parse import urlsplit


def direct_reachable(url: str) -> bool:
    """Whether httpx would talk to ``url`` directly: no HTTP(S)_PROXY / ALL_PROXY applies to it."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname or ""))


class ChunkConnections:
    """Idle connections to one server, taken by one chunk GET or PUT at a time and given back once
    its response was read to the end (so the next request reuses the socket)."""

    def __init__(self, base: str, headers: dict[str, str], timeout: float, tls: ssl.SSLContext) -> None:
        parts = urlsplit(base)   # the API's base URL: a request's path is ``prefix + path``
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.headers = dict(headers)
        self.timeout = timeout
        self.tls = tls
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def connection(self) -> Lease:
        """``with chunks.connection() as lease:`` one connection for one request and its response
        (an idle one if there is one). It goes back to the idle list only when the body called
        ``lease.keep_if_ended(reply)`` and nothing raised; otherwise it is closed, so a socket
        with a half-read response or a broken exchange is never reused."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None and self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
        elif conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return Lease(self, conn)

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Lease:
    """One connection taken from a ``ChunkConnections`` for the length of a ``with`` block."""

    def __init__(self, pool: ChunkConnections, conn: http.client.HTTPConnection) -> None:
        self.pool = pool
        self.conn = conn
        self.reusable = False

    def keep_if_ended(self, reply: http.client.HTTPResponse) -> None:
        """Mark the connection reusable if ``reply`` was read to its end and the server did not
        ask to close: only then does the next request start on a clean socket."""
        self.reusable = not reply.will_close and reply.read(1) == b""

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.reusable and exc_type is None:
            self.pool._give(self.conn)
        else:
            self.conn.close()


__all__ = ["ChunkConnections", "Lease", "direct_reachable"]
