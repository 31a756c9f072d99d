"""HTTP client for a Jupyter Server's ``/handoff/api``: uploads, runs, events, pull back.

Pure HTTP over httpx, no kernel or widget code, so it runs in a notebook kernel, a script or a
test alike. Every failure becomes a ``ClientError`` whose message says what happened and what to
do next; the server's own ``{"error", "hint"}`` is passed through verbatim.

(Over 400 lines: one method per API route, plus the one place that turns HTTP failures into errors.)
"""
from __future__ import annotations

import functools
import http.client
import json
import re
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx

from ..chunks import CHUNKS, AddressHasher, is_sha, shard_path
from ..errors import AuthError, BundleTooLarge, ClientError, ConfigError, RunNotFound, ServerUnreachable
from ..manifest import read_manifest
from .connections import ChunkConnections, direct_reachable
from .settings import server_settings

API_PREFIX = "/handoff/api"
STREAM_PIECE = 256 * 1024          # bytes per progress update while streaming a chunk
BODY_PIECE = 1024 * 1024           # bytes read into a download's destination (and hashed) at a time
Progress = Callable[[int, int], None]   # (bytes done, bytes total)

_RETRY_STATUS = frozenset({500, 502, 503, 504})
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")   # the server's route pattern for a run id


@dataclass
class UploadReport:
    """What an upload did: the second handoff of a kernel should send only what changed."""
    chunks_total: int = 0
    chunks_sent: int = 0
    bytes_total: int = 0           # stored bytes of every chunk the manifest references
    bytes_sent: int = 0            # stored bytes actually PUT
    retries: int = 0
    seconds: float = 0.0
    sent: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "sent"}


def _chunk_path(bundle_dir: Path, sha: str) -> Path:
    return shard_path(bundle_dir / CHUNKS, sha)


class _Arrival:
    """One download attempt's bytes as they land in ``dest``: hashed while cache-hot, counted for
    the progress bar, and un-counted if the attempt breaks (a retry starts over)."""

    def __init__(self, sha: str, dest: memoryview, count: Callable[[int], None] | None) -> None:
        self.dest, self.count, self.got = dest, count, 0
        self.hasher = AddressHasher(sha)

    def __call__(self, n: int) -> None:
        self.hasher.update(self.dest[self.got: self.got + n])
        self.got += n
        if self.count is not None:
            self.count(n)

    def rewind(self) -> None:
        if self.count is not None and self.got:
            self.count(-self.got)


@functools.lru_cache(maxsize=1)
def _trusted_roots() -> ssl.SSLContext:
    return httpx.create_ssl_context()   # what httpx uses by default (certifi, SSL_CERT_FILE...)


def tls_context(url: str) -> ssl.SSLContext:
    """The TLS settings for ``url``'s clients. httpx loads the CA bundle for every client it
    makes (~50-150 ms each, the largest part of a first %handoff's set-up), so an https server's
    clients share one verifying context; a plain-http server never does TLS (redirects are not
    followed), and gets a verifying context with no trusted roots, which can only refuse."""
    if url.lower().startswith("https:"):
        return _trusted_roots()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class HandoffClient:
    """One server. Retries connect errors and 5xx with backoff; maps status codes to clear errors."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.25, upload_workers: int = 3,
                 transport: httpx.BaseTransport | None = None) -> None:
        try:   # arguments > HANDOFF_SERVER_URL / HANDOFF_TOKEN > handoff.json
            url, token = server_settings(url, token)
        except ConfigError as exc:
            raise ClientError(str(exc)) from exc
        self.url = url
        self.token = token
        self.retries = max(0, retries)
        self.upload_workers = upload_workers
        self.max_bundle_bytes: int | None = None   # learnt by check()
        self.backoff = backoff
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"token {token}"
        limits = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        tls = tls_context(self.url)
        self._http = httpx.Client(base_url=self.url + API_PREFIX, headers=headers, timeout=limits,
                                  transport=transport, follow_redirects=False, verify=tls)
        # the identity check goes without the token (see _verify_server)
        self._anon = httpx.Client(base_url=self.url + API_PREFIX, headers={"Accept": "application/json"},
                                  timeout=limits, transport=transport, follow_redirects=False, verify=tls)
        # chunk bodies over stdlib connections (connections.py says why), unless a proxy or a
        # test's transport sits in between: then httpx carries them too
        self._bodies = ChunkConnections(self.url + API_PREFIX, headers, timeout, tls) \
            if transport is None and direct_reachable(self.url) else None
        self._verified = token is None  # nothing to protect without a token

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        self._anon.close()
        if self._bodies is not None:
            self._bodies.close()

    def __enter__(self) -> "HandoffClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:  # never show the token
        return f"HandoffClient({self.url!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # a snapshot of the kernel must never carry the server token
        raise TypeError("a HandoffClient holds the server token and is never captured; "
                        "it is recreated from HANDOFF_SERVER_URL/HANDOFF_TOKEN where needed")

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2 ** attempt))

    def _unreachable(self, exc: Exception) -> ServerUnreachable:
        return ServerUnreachable(
            f"cannot reach {self.url} ({type(exc).__name__}: {exc})",
            "is the server running? check HANDOFF_SERVER_URL (or %handoff --to URL)")

    def _error(self, resp: httpx.Response, what: str) -> ClientError:
        """Turn a non-2xx response into a ClientError, keeping the server's words."""
        err = self._classify(resp, what)
        try:
            body = resp.json()
        except ValueError:
            body = None
        err.body = body if isinstance(body, dict) else {}
        return err

    def _classify(self, resp: httpx.Response, what: str) -> ClientError:
        error = hint = None
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            body = None
        if isinstance(body, dict):
            error = body.get("error") or body.get("message") or body.get("reason")
            hint = body.get("hint")
        code = resp.status_code
        if code in (401, 403):
            # Jupyter Server answers an unknown token on a POST with its form check ("'_xsrf'
            # argument missing"): that only means the token was not accepted, so say that
            refused = " may not " not in f" {error} "   # else: a valid token without the permission
            said = "" if refused else f": {error}" + (f" ({hint})" if hint else "")
            return AuthError(f"the server refused the token (HTTP {code} on {what}{said})",
                             "get one with `jupyter server list` on the server (the token=... part of "
                             "its URL) and set HANDOFF_TOKEN, or pass --token", code)
        if code == 404 and not error:  # tornado's own 404 page: nobody serves /handoff/api here
            return ClientError(f"{self.url} has no jupyter-handoff API ({what} got HTTP 404)",
                               "is this the right server, with jupyter-handoff installed and enabled? "
                               "(`jupyter server extension list` on it shows jupyter_server_ext)", code)
        if code == 404:
            return RunNotFound(error or f"not found on {self.url}: {what}",
                               hint or "check the run id: %reattach lists the runs on this server", code)
        if code == 413:
            return BundleTooLarge(error or f"the bundle is larger than the server accepts ({what})",
                                  hint or "drop or delete large variables (del big_df) or raise "
                                          "c.HandoffApp.max_bundle_bytes on the server", code)
        return ClientError(error or f"{what} failed with HTTP {code} {resp.reason_phrase}",
                           hint or ("the server log says more" if code >= 500 else None), code)

    def _request(self, method: str, path: str, *, what: str, idempotent: bool = True,
                 ok: Iterable[int] = (200, 201, 204), **kwargs: Any) -> httpx.Response:
        """Send with retries: connect errors always (nothing was sent), read errors and 5xx
        only for idempotent requests."""
        if not self._verified:
            self._verify_server()
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self.retries:
                    raise self._unreachable(exc) from exc
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                    httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                if not idempotent or attempt >= self.retries:
                    raise ClientError(f"the connection to {self.url} broke during {what} "
                                      f"({type(exc).__name__}: {exc})",
                                      "try again; nothing was lost on this side") from exc
            else:
                if resp.status_code in ok:
                    return resp
                if not (idempotent and resp.status_code in _RETRY_STATUS and attempt < self.retries):
                    raise self._error(resp, what)
            self._sleep(attempt)
            attempt += 1

    def _verify_server(self) -> None:
        """Before the token goes anywhere: an unauthenticated ``GET /runs`` must answer as a
        jupyter-handoff API does (the run list, or a JSON 401/403 with error and hint), so a
        mistyped or hostile URL never receives the token or a manifest."""
        try:
            resp = self._anon.get("/runs")
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(exc) from exc
        except httpx.HTTPError as exc:
            raise ClientError(f"checking that {self.url} is a jupyter-handoff server failed "
                              f"({type(exc).__name__}: {exc})", "try again; no token was sent") from exc
        try:
            body = resp.json()
        except ValueError:
            body = None
        shaped = isinstance(body, dict) and (
            (resp.status_code == 200 and isinstance(body.get("runs"), list))
            or (resp.status_code in (401, 403) and isinstance(body.get("error"), str) and "hint" in body))
        if not shaped and resp.status_code == 404 and not isinstance(body, dict):
            raise self._classify(resp, "checking the server; no token and no data were sent")
        if not shaped:
            raise ClientError(
                f"{self.url} does not answer like a jupyter-handoff server (GET {API_PREFIX}/runs gave "
                f"{resp.status_code} {resp.headers.get('content-type', 'without a content type')}); "
                "no token and no data were sent",
                "check --to / HANDOFF_SERVER_URL: it must be the base URL of a Jupyter Server with "
                "jupyter-handoff installed")
        self._verified = True

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ClientError(f"the server's reply to {what} is not JSON",
                              f"is {self.url} a Jupyter Server with jupyter-handoff enabled?") from exc

    # -- blobs ------------------------------------------------------------------------------
    def missing(self, shas: list[str]) -> list[str]:
        """Which of these chunks the server lacks (one batch request; HEAD per chunk if the
        server has no batch route)."""
        if not shas:
            return []
        try:
            resp = self._request("POST", "/blobs/missing", json={"shas": shas}, what="checking chunks")
            missing = self._json(resp, "checking chunks").get("missing")
            if not isinstance(missing, list):
                raise ClientError("the server's /blobs/missing reply has no 'missing' list",
                                  "upgrade jupyter-handoff on the server")
            lacking = set(missing)
            return [s for s in shas if s in lacking]
        except ClientError as exc:
            if exc.status != 404:
                raise
            return [s for s in shas if not self.has_blob(s)]   # no batch route: HEAD each

    def check(self) -> None:
        """A cheap authenticated request: raises ServerUnreachable / AuthError / "no
        jupyter-handoff API" before any expensive work (capturing a big namespace) is wasted.
        Learns the server's bundle limit (``max_bundle_bytes``; None from older servers)."""
        resp = self._request("POST", "/blobs/missing", json={"shas": ["0" * 64]}, what="checking the server")
        try:
            limit = resp.json().get("max_bundle_bytes")
        except (ValueError, AttributeError):
            limit = None
        self.max_bundle_bytes = limit if isinstance(limit, int) and not isinstance(limit, bool) else None

    def has_blob(self, sha: str) -> bool:
        try:
            self._request("HEAD", f"/blobs/{sha}", what=f"checking chunk {sha[:12]}")
            return True
        except ClientError as exc:  # HEAD replies have no body, so a 404 is never "classified"
            if exc.status != 404:
                raise
            return False

    def put_blob(self, sha: str, source: Path | bytes | memoryview, progress: Callable[[int], None] | None = None,
                 report: UploadReport | None = None) -> int:
        """PUT one stored chunk (a file, or bytes in memory sent without a copy), streamed; a
        connection cut mid-body is retried from the start (progress is rewound). Returns the
        bytes sent."""
        view = None if isinstance(source, Path) else memoryview(source).cast("B")
        size = len(view) if view is not None else source.stat().st_size  # type: ignore[union-attr]
        attempt = 0
        while True:
            sent = 0

            def pieces() -> Iterator[bytes | memoryview]:
                if view is not None:
                    for i in range(0, size, STREAM_PIECE):
                        yield view[i: i + STREAM_PIECE]
                    return
                with open(source, "rb") as fh:  # type: ignore[arg-type]
                    while piece := fh.read(STREAM_PIECE):
                        yield piece

            def body() -> Iterator[bytes | memoryview]:
                nonlocal sent
                for piece in pieces():
                    yield piece
                    sent += len(piece)
                    if progress:
                        progress(len(piece))

            try:
                status, reply = self._put_body(sha, body(), size)
            except (OSError, http.client.HTTPException, httpx.TransportError) as exc:
                if progress and sent:
                    progress(-sent)
                if attempt >= self.retries:
                    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError)):
                        raise self._unreachable(exc) from exc
                    raise ClientError(f"uploading chunk {sha[:12]} to {self.url} kept failing "
                                      f"({type(exc).__name__}: {exc})",
                                      "check the connection and run %handoff again; only missing "
                                      "chunks are sent") from exc
            else:
                if status in (200, 201, 204):
                    return size
                if progress and sent:
                    progress(-sent)
                if not (status in _RETRY_STATUS and attempt < self.retries):
                    raise self._error(httpx.Response(status, content=reply), f"uploading chunk {sha[:12]}")
            if report is not None:
                report.retries += 1
            self._sleep(attempt)
            attempt += 1

    def _put_body(self, sha: str, pieces: Iterator[bytes | memoryview], size: int) -> tuple[int, bytes]:
        """One PUT of a chunk: (status, reply body). On the stdlib connections each piece goes to
        the socket as it is (a memoryview of the live array, no copy); through httpx otherwise."""
        if not self._verified:
            self._verify_server()   # the token goes only to the server it belongs to
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if self._bodies is None:
            resp = self._http.put(f"/blobs/{sha}", content=pieces, headers=headers)  # type: ignore[arg-type]
            return resp.status_code, resp.content
        with self._bodies.connection() as lease:
            conn = lease.conn
            conn.putrequest("PUT", f"{self._bodies.prefix}/blobs/{sha}", skip_accept_encoding=True)
            for name, value in {**self._bodies.headers, **headers}.items():
                conn.putheader(name, value)
            conn.endheaders()
            for piece in pieces:
                conn.send(piece)
            reply = conn.getresponse()
            body = reply.read()
            lease.keep_if_ended(reply)
            return reply.status, body

    def upload_bundle(self, bundle_dir: str | Path, progress: Progress | None = None,
                      manifest: dict[str, Any] | None = None) -> UploadReport:
        """Upload the chunks of ``bundle_dir/manifest.json`` that the server lacks."""
        t0 = time.perf_counter()
        bundle_dir = Path(bundle_dir)
        if manifest is None:
            manifest = read_manifest(bundle_dir)
        shas = list((manifest.get("chunks") or {}).keys())
        report = UploadReport(chunks_total=len(shas))
        for sha in shas:
            if not is_sha(sha):
                raise ClientError(f"the bundle at {bundle_dir} lists an invalid chunk id {sha!r}",
                                  "take the snapshot again (%handoff does this)")
            path = _chunk_path(bundle_dir, sha)
            if not path.is_file():
                raise ClientError(f"chunk {sha[:12]} listed in {bundle_dir}/manifest.json is missing",
                                  "the local bundle cache is damaged; delete it and run %handoff again")
            report.bytes_total += path.stat().st_size
        todo = self.missing(shas)
        total = sum(_chunk_path(bundle_dir, s).stat().st_size for s in todo)
        done = 0
        lock = threading.Lock()
        if progress:
            progress(0, total)

        def step(n: int) -> None:
            nonlocal done
            with lock:  # reported in order, so a progress bar never jumps back
                done += n
                if progress:
                    progress(max(0, done), total)

        def send(sha: str) -> None:
            sent = self.put_blob(sha, _chunk_path(bundle_dir, sha), step, report)
            with lock:
                report.bytes_sent += sent
                report.chunks_sent += 1
                report.sent.append(sha)

        # a few PUTs in flight overlap reading, sending and the server's hashing; the first
        # error stops new ones and is raised once the running ones end
        with ThreadPoolExecutor(max_workers=max(1, min(self.upload_workers, len(todo) or 1))) as pool:
            futures = [pool.submit(send, sha) for sha in todo]
            for fut in as_completed(futures):
                if fut.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
        report.seconds = time.perf_counter() - t0
        return report

    def get_blob(self, sha: str) -> bytes:
        """The stored bytes of one chunk (the caller checks them against the address)."""
        return self._request("GET", f"/blobs/{sha}", what=f"downloading chunk {sha[:19]}").content

    def get_blob_into(self, sha: str, dest: memoryview, count: Callable[[int], None] | None = None) -> bool:
        """Download one uncompressed chunk straight into ``dest`` (its exact size), hashing each
        piece as it lands; True if the bytes match the address (the caller refuses them
        otherwise). ``count`` sees the bytes received. A cut connection or a 5xx is retried from
        the start (``count`` is rewound, the hash starts over)."""
        what = f"downloading chunk {sha[:19]}"
        if not self._verified:
            self._verify_server()
        attempt = 0
        while True:
            arrival = _Arrival(sha, dest, count)
            try:
                status, body = self._blob_body(sha, dest, arrival)
                if status == 200:
                    return arrival.hasher.matches()
                if not (status in _RETRY_STATUS and attempt < self.retries):
                    raise self._error(httpx.Response(status, content=body), what)
            except (OSError, http.client.HTTPException, httpx.TransportError) as exc:
                arrival.rewind()
                if attempt >= self.retries:
                    raise ClientError(f"{what} from {self.url} kept failing ({type(exc).__name__}: {exc})",
                                      "run %pull again; nothing was changed locally") from exc
            self._sleep(attempt)
            attempt += 1

    def _blob_body(self, sha: str, dest: memoryview, landed: Callable[[int], None]) -> tuple[int, bytes]:
        """One GET of a chunk: (200, b"") once ``dest`` is filled, else (status, error body). Raises
        a transport error when the connection breaks, ClientError when the size is not ``dest``'s."""
        if self._bodies is None:
            with self._http.stream("GET", f"/blobs/{sha}") as resp:
                if resp.status_code != 200:
                    return resp.status_code, resp.read()
                self._check_length(sha, resp.headers.get("Content-Length"), len(dest))
                got = 0
                for piece in resp.iter_raw(BODY_PIECE):
                    dest[got: got + len(piece)] = piece
                    landed(len(piece))
                    got += len(piece)
                self._check_received(got, len(dest))
                return 200, b""
        with self._bodies.connection() as lease:
            lease.conn.request("GET", f"{self._bodies.prefix}/blobs/{sha}", headers=self._bodies.headers)
            reply = lease.conn.getresponse()
            if reply.status != 200:
                body = reply.read()
                lease.keep_if_ended(reply)
                return reply.status, body
            self._check_length(sha, reply.getheader("Content-Length"), len(dest))
            got = 0
            while got < len(dest):
                n = reply.readinto(dest[got: got + BODY_PIECE])
                if not n:
                    raise http.client.IncompleteRead(b"", len(dest) - got)
                landed(n)
                got += n
            lease.keep_if_ended(reply)
            return 200, b""

    @staticmethod
    def _check_length(sha: str, length: str | None, expected: int) -> None:
        if length is None or not length.isdigit() or int(length) != expected:
            raise ClientError(f"chunk {sha[:19]} has {length or 'an unknown number of'} bytes on the server, "
                              f"the manifest says {expected}",
                              "the run's checkpoint is damaged; report this to the server admin")

    @staticmethod
    def _check_received(got: int, expected: int) -> None:
        if got != expected:   # the server closed the body early: retried like a cut connection
            raise httpx.RemoteProtocolError(f"the body ended after {got} of {expected} bytes")

    # -- runs -------------------------------------------------------------------------------
    def create_run(self, manifest: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /runs. The idempotency key makes a retried create return the same run."""
        key = idempotency_key or uuid.uuid4().hex
        resp = self._request("POST", "/runs", json={"manifest": manifest, "idempotency_key": key},
                             what="creating the remote run")
        return self._json(resp, "creating the remote run")

    @staticmethod
    def check_run_id(run_id: str) -> str:
        """Checked before it goes into a URL: ``../../etc`` is not a run id, whatever the server says."""
        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            raise RunNotFound(f"{run_id!r} is not a valid run id",
                              "run ids are 1-64 letters, digits, '-' or '_'; %reattach (or "
                              "`jupyter handoff list`) lists the runs on the server")
        return run_id

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/runs/{self.check_run_id(run_id)}", what=f"run {run_id}"), "get run")

    def list_runs(self) -> list[dict[str, Any]]:
        data = self._json(self._request("GET", "/runs", what="listing runs"), "list runs")
        return data.get("runs", []) if isinstance(data, dict) else list(data)

    def events(self, run_id: str, after: int = 0, timeout: float = 25.0) -> dict[str, Any]:
        """Long-poll: returns ``{"events", "last_seq", "status"}`` as soon as there is news or
        after ``timeout`` seconds."""
        resp = self._request("GET", f"/runs/{self.check_run_id(run_id)}/events",
                             params={"after": after, "timeout": timeout},
                             timeout=httpx.Timeout(timeout + 15.0, connect=10.0),
                             what=f"events of run {run_id}")
        return self._json(resp, "events")

    def answer(self, run_id: str, text: str) -> dict[str, Any]:
        resp = self._request("POST", f"/runs/{self.check_run_id(run_id)}/answer", json={"answer": text},
                             idempotent=False, what=f"answering run {run_id}")
        return self._json(resp, "answer") if resp.content else {}

    def cancel(self, run_id: str) -> dict[str, Any]:
        resp = self._request("POST", f"/runs/{self.check_run_id(run_id)}/cancel", json={},
                             what=f"cancelling run {run_id}")
        return self._json(resp, "cancel") if resp.content else {}

    def pull(self, run_id: str, timeout: float = 180.0) -> dict[str, Any]:
        """Ask the server to pause the run at a step boundary, checkpoint and end it ``pulled``."""
        resp = self._request("POST", f"/runs/{self.check_run_id(run_id)}/pull", json={},
                             timeout=httpx.Timeout(timeout, connect=10.0), what=f"pulling run {run_id}")
        return self._json(resp, "pull") if resp.content else {}

    def bundle(self, run_id: str) -> dict[str, Any]:
        """The run's latest checkpoint manifest (with ``run`` = the remote RunState)."""
        data = self._json(self._request("GET", f"/runs/{self.check_run_id(run_id)}/bundle",
                                        what=f"bundle of run {run_id}"), "bundle")
        return data.get("manifest", data) if isinstance(data, dict) and "kind" not in data else data

    def diff(self, run_id: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/runs/{self.check_run_id(run_id)}/diff",
                                        what=f"diff of run {run_id}"), "diff")
