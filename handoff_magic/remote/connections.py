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
    """Idle connections to one server, taken by one download at a time and given back once its
    response was read to the end (so the next GET reuses the socket)."""

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

    def take(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


__all__ = ["ChunkConnections", "direct_reachable"]
