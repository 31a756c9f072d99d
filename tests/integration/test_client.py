"""HandoffClient against a real Jupyter Server with the extension (no mocks of our own code).

Covers: missing-only uploads with progress, a connection cut mid-upload (a real TCP proxy that
drops the socket), idempotent create, long-poll, a chunk downloaded into its buffer and verified
(direct connections and httpx), and the clear errors a user sees for a dead server, a wrong
token, an unknown run and a too-large bundle.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from handoff_magic.chunks import ChunkStore, address_of, shard_path
from handoff_magic.manifest import Manifest, write_manifest
from handoff_magic.remote.http import (AuthError, BundleTooLarge, ClientError, HandoffClient, RunNotFound,
                                  ServerUnreachable)
from handoff_magic.state import RunState
from tests.harness.cutting_proxy import CuttingProxy
from tests.harness.server_process import JupyterServerProcess, free_port

BUNDLE_LIMIT = 5_000_000   # this module's server refuses bundles over 5 MB


def make_bundle(dir: Path, payloads: dict[str, bytes], goal: str = "noop", model: str = "") -> dict:
    """A real bundle: each payload is a working file split into stored chunks."""
    store = ChunkStore(dir / "chunks")
    manifest = Manifest().to_dict()
    import hashlib
    for name, data in payloads.items():
        ref = store.put(data, compress=False)
        manifest["chunks"][ref.sha] = ref.meta()
        manifest["files"].append({"path": name, "mode": 0o644, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(), "chunks": [ref.sha]})
    state = RunState(goal=goal, model=model, status="paused")
    manifest["run"] = state.to_dict()
    write_manifest(dir, manifest)
    return manifest


def finish_script(tmp: Path) -> str:
    path = tmp / "finish.json"
    path.write_text(json.dumps([{"text": "nothing to do", "tool_calls": [
        {"name": "finish", "arguments": {"summary": "done"}}]}]))
    return f"scripted:{path}"


@pytest.fixture(scope="module")
def handoff_server():
    """One real server for the module, with a small bundle limit for the 413 case."""
    srv = JupyterServerProcess(extra_args=[f"--HandoffApp.max_bundle_bytes={BUNDLE_LIMIT}"]).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def client(handoff_server):
    with HandoffClient(handoff_server.url, handoff_server.token, retries=2, backoff=0.05) as c:
        yield c


def test_upload_sends_only_missing_chunks_with_progress(client, tmp_path):
    a, b = os.urandom(1_500_000), os.urandom(700_000)
    manifest = make_bundle(tmp_path / "b1", {"a.bin": a, "b.bin": b})
    seen: list[tuple[int, int]] = []
    first = client.upload_bundle(tmp_path / "b1", progress=lambda d, t: seen.append((d, t)))
    assert first.chunks_sent == 2 and first.bytes_sent == len(a) + len(b)
    assert seen[-1] == (len(a) + len(b), len(a) + len(b))
    assert all(x[0] <= y[0] for x, y in zip(seen, seen[1:])), "progress never goes backwards here"
    assert client.missing(list(manifest["chunks"])) == []

    # same a, new c: only c travels
    c = os.urandom(10_000)
    make_bundle(tmp_path / "b2", {"a.bin": a, "c.bin": c})
    second = client.upload_bundle(tmp_path / "b2")
    assert second.chunks_sent == 1 and second.bytes_sent == len(c)
    assert second.bytes_total == len(a) + len(c)


def test_connection_cut_mid_upload_is_retried(handoff_server, tmp_path):
    proxy = CuttingProxy(handoff_server.port, cuts=1, after=400_000)
    try:
        data = os.urandom(2_000_000)
        manifest = make_bundle(tmp_path / "b", {"big.bin": data})
        progress: list[int] = []
        with HandoffClient(proxy.url, handoff_server.token, retries=3, backoff=0.05) as c:
            report = c.upload_bundle(tmp_path / "b", progress=lambda d, t: progress.append(d))
            assert c.missing(list(manifest["chunks"])) == []
        assert proxy.cut_count == 1 and proxy.puts == 2, "one cut PUT, then one complete retry"
        assert report.chunks_sent == 1 and report.retries == 1
        assert progress[-1] == len(data)
        got = handoff_server.client.get(f"/handoff/api/blobs/{next(iter(manifest['chunks']))}")
        assert got.status_code == 200 and got.content == data
    finally:
        proxy.close()


def test_create_run_is_idempotent_and_events_long_poll(client, tmp_path):
    manifest = make_bundle(tmp_path / "b", {"x.txt": b"hello"}, goal="say hi",
                           model=finish_script(tmp_path))
    client.upload_bundle(tmp_path / "b")
    one = client.create_run(manifest, idempotency_key="key-123")
    two = client.create_run(manifest, idempotency_key="key-123")
    assert one["id"] == two["id"]
    other = client.create_run(manifest, idempotency_key="key-456")
    assert other["id"] != one["id"]
    assert one["id"] in {r["id"] for r in client.list_runs()}

    # follow until completion through the long-poll
    after, status, deadline = 0, one["status"], time.monotonic() + 90
    while status not in ("completed", "failed") and time.monotonic() < deadline:
        page = client.events(one["id"], after=after, timeout=5)
        after, status = page["last_seq"], page["status"]
    assert status == "completed", client.get_run(one["id"])
    # the terminal status is the run's last event (its final checkpoint came before it): the
    # next long-poll has nothing new, waits about `timeout`, then returns empty
    t0 = time.monotonic()
    page = client.events(one["id"], after=after, timeout=1)
    assert page["events"] == [] and 0.8 < time.monotonic() - t0 < 10

    # a notebook following the run (as after %reattach) ends with every event the server has
    from handoff_magic.remote.follow import RemoteRun

    class Shown:
        def __init__(self) -> None:
            self.events: list = []
            self.final = None

        def show_event(self, ev) -> None:
            self.events.append(ev)

        def show_state(self, state) -> None:
            self.final = state.status

    view = Shown()
    follower = RemoteRun(client, one["id"], widget=view).follow()
    assert follower.wait(timeout=30) == "completed"
    follower._thread.join(10)
    assert not follower._thread.is_alive() and view.final == "completed"
    assert [e.seq for e in view.events] == list(range(1, after + 1))
    assert view.events[-1].type == "status" and view.events[-1].data["status"] == "completed"


@pytest.mark.parametrize("route", ["direct", "httpx"])
def test_a_chunk_downloads_into_its_buffer_verified_on_either_route(handoff_server, route):
    """Direct stdlib connections, or httpx (what carries chunks when a proxy applies)."""
    data = os.urandom(1_500_000)
    sha = address_of(data)
    transport = httpx.HTTPTransport() if route == "httpx" else None
    with HandoffClient(handoff_server.url, handoff_server.token, retries=1, backoff=0.01, transport=transport) as c:
        c.put_blob(sha, data)
        dest = bytearray(len(data))
        seen: list[int] = []
        assert c.get_blob_into(sha, memoryview(dest), seen.append) is True
        assert bytes(dest) == data and sum(seen) == len(data)
        # the server's copy damaged on its disk: same size, other bytes -> refused by the hash
        had = f"the bytes {route:>6}".encode()   # 16 bytes, one blob per route
        other = address_of(had)
        c.put_blob(other, had)
        assert c.get_blob_into(other, memoryview(bytearray(16)), None) is True   # (and now on its disk)
        blob = shard_path(handoff_server.data_dir / "blobs", other)
        blob.with_name("damaged").write_bytes(had.upper())
        os.replace(blob.with_name("damaged"), blob)
        assert c.get_blob_into(other, memoryview(bytearray(16)), None) is False
        with pytest.raises(ClientError, match="the manifest says 10"):
            c.get_blob_into(sha, memoryview(bytearray(10)), None)
        with pytest.raises(RunNotFound, match="not on this server"):
            c.get_blob_into(address_of(b"never uploaded"), memoryview(bytearray(14)), None)
        assert c.get_blob_into(sha, memoryview(dest), None) is True, "the connection is still usable"


def test_dead_server_says_start_it(tmp_path):
    port = free_port()
    with HandoffClient(f"http://127.0.0.1:{port}", "t", retries=1, backoff=0.01) as c:
        with pytest.raises(ServerUnreachable) as err:
            c.list_runs()
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "is the server running" in msg and "HANDOFF_SERVER_URL" in msg


def test_wrong_token_and_unknown_run(handoff_server):
    with HandoffClient(handoff_server.url, "not-the-token", retries=0) as bad:
        with pytest.raises(AuthError) as err:
            bad.list_runs()
    assert "HANDOFF_TOKEN" in str(err.value) and err.value.status == 403
    with HandoffClient(handoff_server.url, handoff_server.token, retries=0) as c:
        with pytest.raises(RunNotFound) as nf:
            c.get_run("doesnotexist")
    assert nf.value.status == 404


def test_no_server_configured_says_what_to_set(monkeypatch):
    monkeypatch.delenv("HANDOFF_SERVER_URL", raising=False)
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", "/nonexistent-handoff-test")
    monkeypatch.setenv("HOME", "/nonexistent-handoff-test")
    with pytest.raises(ClientError) as err:
        HandoffClient()
    assert "HANDOFF_SERVER_URL" in str(err.value)


def test_too_large_bundle_gets_the_servers_hint(client, tmp_path):
    manifest = make_bundle(tmp_path / "b", {"big.bin": os.urandom(BUNDLE_LIMIT + 1000)})
    runs_before = client.list_runs()
    with pytest.raises(BundleTooLarge) as err:
        client.create_run(manifest)   # refused on size before the server looks for chunks
    assert err.value.status == 413 and "limit" in err.value.message
    assert "max_bundle_bytes" in err.value.hint
    assert client.list_runs() == runs_before, "a refused bundle creates no run"


# -- the notebook-side views (no server needed) --------------------------------------------------
def test_run_list_renders_text_and_html():
    from handoff_magic.remote.views import RunList
    runs = RunList("http://h:1", [{"id": "abc123", "status": "waiting_input", "steps": 3, "updated": 0,
                                   "goal": "clean <sales> & fit"}])
    text = str(runs)
    assert "abc123" in text and "%reattach ID" in text
    html = runs._repr_html_()
    assert "&lt;sales&gt; &amp; fit" in html and "<script" not in html
    for shown in (text, html):   # the words the widget and the status page use
        assert "waiting for input" in shown and "waiting_input" not in shown
    assert "no runs on http://h:1" == str(RunList("http://h:1", []))


def test_pull_conflict_map_protects_files_changed_or_created_here():
    from handoff_magic.remote.journey import ABSENT, _file_conflicts
    manifest = {"files": [{"path": "a.csv", "sha256": "1" * 64}, {"path": "new.md", "sha256": "2" * 64}]}
    record = {"files": {"a.csv": "3" * 64}}
    assert _file_conflicts(manifest, record) == {"a.csv": "3" * 64, "new.md": ABSENT}
    assert _file_conflicts(manifest, None) == {"a.csv": ABSENT, "new.md": ABSENT}


def test_remote_run_links_to_the_result_notebook(handoff_server):
    from handoff_magic.remote.follow import RemoteRun
    with HandoffClient(handoff_server.url, handoff_server.token) as c:
        r = RemoteRun(c, "abc123")
        assert r.notebook_url() == f"{handoff_server.url}/lab/tree/handoff-runs/abc123/result.ipynb"


def test_a_server_without_the_extension_is_named():
    """Something else answers at the URL (a plain web server, a Jupyter without the extension):
    tornado-style HTML 404s everywhere. The error says the API is missing, not "unknown run"."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def _404(self) -> None:
            body = b"<html><title>404: Not Found</title></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _404

        def log_message(self, *args) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with HandoffClient(f"http://127.0.0.1:{httpd.server_address[1]}", "t", retries=0) as c:
            with pytest.raises(ClientError) as err:
                c.check()
            with pytest.raises(ClientError) as err2:
                c.get_run("abc")
    finally:
        httpd.shutdown()
        httpd.server_close()
    for e in (err, err2):
        assert "no jupyter-handoff API" in str(e.value) and "installed and enabled" in str(e.value)
