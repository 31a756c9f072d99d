"""A loopback TCP proxy in front of a test server: counts requests and can cut connections
mid-upload (a PUT's body) or mid-download (the response to a GET of a chunk)."""
from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """A loopback TCP proxy that drops the first ``cuts`` connections carrying a request that
    starts with ``request`` once ``after`` bytes of its body went through: the upload's (``PUT``,
    the default) or, for any other method, the response's."""

    def __init__(self, target_port: int, cuts: int = 1, after: int = 300_000, request: bytes = b"PUT ") -> None:
        self.target_port, self.cuts, self.after, self.request = target_port, cuts, after, request
        self.cut_count = 0
        self.puts = 0        # requests starting with ``request`` (PUTs by default)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        cut = {"up": False, "down": False}   # which direction of this connection is being cut
        threading.Thread(target=self._pump, args=(upstream, conn, "down", cut), daemon=True).start()
        self._pump(conn, upstream, "up", cut)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, cut: dict[str, bool]) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if direction == "up" and data.startswith(self.request):
                    with self._lock:
                        self.puts += 1
                        if self.cut_count < self.cuts:
                            self.cut_count += 1
                            cut["up" if self.request.startswith(b"PUT") else "down"] = True
                if cut[direction]:
                    sent += len(data)
                    if sent > self.after:  # drop the connection mid-body, both ways (shutdown
                        for s in (src, dst):   # first: it wakes the other pump's recv and sends the FIN)
                            s.shutdown(socket.SHUT_RDWR)
                            s.close()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
