"""A loopback TCP proxy in front of a test server: counts PUTs and can cut connections mid-upload."""
from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """A loopback TCP proxy that closes the first ``cuts`` PUT connections after ``after`` bytes."""

    def __init__(self, target_port: int, cuts: int = 1, after: int = 300_000) -> None:
        self.target_port, self.cuts, self.after = target_port, cuts, after
        self.cut_count = 0
        self.puts = 0
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
        threading.Thread(target=self._pump, args=(upstream, conn, None), daemon=True).start()
        self._pump(conn, upstream, "up")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str | None) -> None:
        sent, cut_this = 0, False
        try:
            while data := src.recv(65536):
                if direction == "up" and data.startswith(b"PUT "):
                    with self._lock:
                        self.puts += 1
                        if self.cut_count < self.cuts:
                            self.cut_count += 1
                            cut_this, sent = True, 0
                if cut_this:
                    sent += len(data)
                    if sent > self.after:  # drop the connection mid-body, both ways
                        src.close()
                        dst.close()
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
