"""The server extension over real HTTP: a real ``jupyter server`` subprocess (tests/server_process.py).

Auth on every route, JSON errors, blob uploads (hash, size caps), manifest validation (hostile
input creates nothing and writes nothing outside the data dir), idempotent creates, long-poll
events, the status page, and a run that survives a server SIGKILL.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from handoff_magic.state import RunState
from server_process import JupyterServerProcess

MiB = 1024 * 1024
SHA0 = "0" * 64


@pytest.fixture(scope="module")
def srv() -> Iterator[JupyterServerProcess]:
    s = JupyterServerProcess(extra_args=[f"--HandoffApp.max_chunk_bytes={MiB}",
                                         f"--HandoffApp.max_bundle_bytes={3 * MiB}",
                                         "--HandoffApp.max_events_wait=5"])
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_for(files: dict[str, bytes], *, goal: str = "summarise sales.csv",
                 run: dict[str, Any] | None = None, **extra: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A hand-built bundle manifest (files only) and its chunks, per docs/internals.md."""
    chunks: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    entries = []
    for path, data in files.items():
        h = sha(data)
        chunks[h] = {"size": len(data), "stored": len(data), "codec": None}
        blobs[h] = data
        entries.append({"path": path, "mode": 0o644, "size": len(data), "sha256": h, "chunks": [h]})
    m = {"schema_version": 1, "kind": "handoff-bundle", "created": time.time(), "chunks": chunks,
         "variables": [], "groups": [], "replays": [], "imports": [], "history": {"In": [""], "Out": {}},
         "files": entries, "run": run if run is not None else RunState(goal=goal, model="scripted:x").to_dict()}
    m.update(extra)
    return m, blobs


def upload(client: httpx.Client, blobs: dict[str, bytes]) -> None:
    for h, data in blobs.items():
        r = client.put(f"/handoff/api/blobs/{h}", content=data)
        assert r.status_code in (200, 201), r.text


def run_ids(srv: JupyterServerProcess) -> set[str]:
    return {r["id"] for r in srv.client.get("/handoff/api/runs").json()["runs"]}


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] and body["hint"], body
    for n in needles:
        assert n in body["error"] + " " + body["hint"], body
    return body


# ---------------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------------
RID = "abc123def456"
API_ROUTES = [
    ("HEAD", f"/handoff/api/blobs/{SHA0}"), ("GET", f"/handoff/api/blobs/{SHA0}"),
    ("PUT", f"/handoff/api/blobs/{SHA0}"), ("POST", "/handoff/api/blobs/missing"),
    ("GET", "/handoff/api/runs"), ("POST", "/handoff/api/runs"),
    ("GET", f"/handoff/api/runs/{RID}"), ("GET", f"/handoff/api/runs/{RID}/events"),
    ("POST", f"/handoff/api/runs/{RID}/answer"), ("POST", f"/handoff/api/runs/{RID}/cancel"),
    ("POST", f"/handoff/api/runs/{RID}/pull"), ("GET", f"/handoff/api/runs/{RID}/bundle"),
    ("GET", f"/handoff/api/runs/{RID}/diff"),
]
PAGES = ["/handoff/runs", f"/handoff/runs/{RID}", f"/handoff/runs/{RID}/diff"]
FORMS = [f"/handoff/runs/{RID}/answer", f"/handoff/runs/{RID}/cancel"]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_every_route_refuses_missing_or_wrong_token(srv: JupyterServerProcess, token: str | None) -> None:
    headers = {"Authorization": f"token {token}"} if token else {}
    with srv.anon_client(headers=headers) as anon:
        for method, path in API_ROUTES:
            r = anon.request(method, path, content=b"{}")
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            if method != "HEAD":
                assert "not authorized" in r.json()["error"], (method, path)
        for path in PAGES:
            r = anon.get(path)
            assert r.status_code == 302 and "/login" in r.headers["location"], (path, r.status_code)
        for path in FORMS:
            r = anon.post(path, data={"answer": "yes"})
            assert r.status_code == 403, (path, r.status_code)
    assert not (srv.data_dir / "blobs" / "00").exists()


def _login(srv: JupyterServerProcess) -> httpx.Client:
    """A browser-like session: cookie login with the token as password, no Authorization header."""
    c = srv.anon_client(follow_redirects=False)
    c.get("/login")
    xsrf = c.cookies.get("_xsrf")
    r = c.post("/login", data={"_xsrf": xsrf, "password": srv.token})
    assert r.status_code == 302, r.text
    return c


def test_form_posts_need_the_xsrf_field(srv: JupyterServerProcess) -> None:
    browser = _login(srv)
    try:
        assert browser.get("/handoff/runs").status_code == 200
        r = browser.post(f"/handoff/runs/{RID}/cancel", data={})
        assert r.status_code == 403
        r = browser.post(f"/handoff/runs/{RID}/cancel", data={"_xsrf": browser.cookies.get("_xsrf")})
        assert r.status_code == 404 and "list runs" in r.text  # past XSRF, and the run is unknown
    finally:
        browser.close()


def test_unknown_run_ids_are_404_with_a_hint(srv: JupyterServerProcess) -> None:
    for method, path in API_ROUTES:
        if "/runs/" not in path:
            continue
        r = srv.client.request(method, path, json={"answer": "x"})
        assert_error(r, 404, RID, "GET /handoff/api/runs")
    for path in PAGES[1:]:
        r = srv.client.get(path)
        assert r.status_code == 404 and "reattach" in r.text
    r = srv.client.get("/handoff/runs/..%2F..%2Fetc")
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------
# blobs
# ---------------------------------------------------------------------------------------------
def test_blob_upload_download_and_missing(srv: JupyterServerProcess) -> None:
    data = uuid.uuid4().bytes * 1000
    h = sha(data)
    c = srv.client
    assert c.post("/handoff/api/blobs/missing", json={"shas": [h, h]}).json() == {"missing": [h]}
    assert c.head(f"/handoff/api/blobs/{h}").status_code == 404
    r = c.put(f"/handoff/api/blobs/{h}", content=data)
    assert r.status_code == 201 and r.json()["size"] == len(data)
    assert c.put(f"/handoff/api/blobs/{h}", content=data).status_code == 200  # idempotent
    head = c.head(f"/handoff/api/blobs/{h}")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert c.get(f"/handoff/api/blobs/{h}").content == data
    assert c.post("/handoff/api/blobs/missing", json={"shas": [h]}).json() == {"missing": []}
    assert (srv.data_dir / "blobs" / h[:2] / h).read_bytes() == data
    assert_error(c.post("/handoff/api/blobs/missing", json={"shas": ["../x"]}), 400, "sha256")
    assert_error(c.post("/handoff/api/blobs/missing", content=b"{not json"), 400, "JSON")


def test_blob_hash_mismatch_is_rejected_and_not_stored(srv: JupyterServerProcess) -> None:
    data = b"the real bytes" * 100
    h = sha(data)
    r = srv.client.put(f"/handoff/api/blobs/{h}", content=data[:-1] + b"X")
    assert_error(r, 400, h, "again")
    assert srv.client.head(f"/handoff/api/blobs/{h}").status_code == 404
    assert not list((srv.data_dir / "blobs").rglob(".tmp-*"))


@pytest.mark.parametrize("bad", ["ABC", "0" * 63, "g" * 64, "..%2F..%2Fescape"])
def test_blob_bad_address_is_400(srv: JupyterServerProcess, bad: str) -> None:
    r = srv.client.put(f"/handoff/api/blobs/{bad}", content=b"x")
    assert_error(r, 400, "sha256")
    assert not (srv.data_dir.parent / "escape").exists()


def test_blob_over_the_size_limit_is_413(srv: JupyterServerProcess) -> None:
    big = b"z" * (MiB + 10)
    h = sha(big)
    assert_error(srv.client.put(f"/handoff/api/blobs/{h}", content=big), 413, "limit", "max_chunk_bytes")

    def stream() -> Iterator[bytes]:  # no Content-Length: the cap must hold while streaming
        for i in range(0, len(big), 64 * 1024):
            yield big[i:i + 64 * 1024]

    try:
        r = srv.client.put(f"/handoff/api/blobs/{h}", content=stream())
        assert r.status_code in (400, 413), r.text
    except httpx.TransportError:
        pass  # the server may close the connection once the cap is passed
    assert srv.client.head(f"/handoff/api/blobs/{h}").status_code == 404
    assert not list((srv.data_dir / "blobs").rglob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# POST /runs validation: hostile or broken manifests create nothing
# ---------------------------------------------------------------------------------------------
def _outside_snapshot(srv: JupyterServerProcess) -> set[Path]:
    base = srv.data_dir.parent
    return {p for p in base.rglob("*") if srv.data_dir not in p.parents and p != srv.data_dir
            and p.name != "server.log"}


def _post_run(srv: JupyterServerProcess, body: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return srv.client.post("/handoff/api/runs", content=body)
    return srv.client.post("/handoff/api/runs", json=body)


def test_manifest_with_missing_chunks_is_400_listing_them(srv: JupyterServerProcess) -> None:
    m, blobs = manifest_for({"a.csv": b"a,b\n1,2\n" + uuid.uuid4().bytes, "b.txt": uuid.uuid4().bytes})
    first, second = list(blobs)
    upload(srv.client, {first: blobs[first]})
    before = run_ids(srv)
    body = assert_error(_post_run(srv, {"manifest": m, "idempotency_key": uuid.uuid4().hex}), 400,
                        "1 chunk", "PUT /handoff/api/blobs")
    assert body["missing"] == [second]
    assert run_ids(srv) == before


def _hostile_cases() -> list[tuple[str, Any, int, str]]:
    ok, _ = manifest_for({"x.txt": b"x"})
    cases: list[tuple[str, Any, int, str]] = [
        ("truncated JSON", json.dumps({"manifest": ok})[:-20], 400, "JSON"),
        ("not an object", "[1, 2]", 400, "object"),
        ("no manifest", {"idempotency_key": "k1"}, 400, "manifest"),
        ("bad idempotency key", {"manifest": ok, "idempotency_key": "../../x"}, 400, "idempotency_key"),
    ]
    for label, path in [("dotdot path", "../../escape.txt"), ("absolute path", "/tmp/escape.txt"),
                        ("nested dotdot", "data/../../escape.txt"), ("backslash", "..\\escape.txt")]:
        m, _ = manifest_for({"x.txt": b"x"})
        m["files"][0]["path"] = path
        cases.append((label, {"manifest": m}, 400, "path"))
    m, _ = manifest_for({"x.txt": b"x"})
    m["schema_version"] = 99
    cases.append(("newer schema", {"manifest": m}, 400, "upgrade"))
    m, _ = manifest_for({"x.txt": b"x"})
    m["kind"] = "something-else"
    cases.append(("wrong kind", {"manifest": m}, 400, "handoff-bundle"))
    m, _ = manifest_for({})
    m["variables"] = [{"name": f"v{i}", "type": "int", "size": 1, "method": "skipped", "group": None,
                       "summary": "", "reason": "x"} for i in range(100_001)]
    cases.append(("huge variable count", {"manifest": m}, 400, "entries"))
    m, _ = manifest_for({"x.txt": b"x"})
    m["chunks"][next(iter(m["chunks"]))]["stored"] = 4 * MiB
    cases.append(("bundle over the limit", {"manifest": m}, 413, "max_bundle_bytes"))
    m, _ = manifest_for({"x.txt": b"x"}, run={"goal": 3, "schema_version": 1})
    cases.append(("bad run state", {"manifest": m}, 400, "goal"))
    m, _ = manifest_for({"x.txt": b"x"})
    m["run"] = None
    cases.append(("no run", {"manifest": m}, 400, "%agent"))
    return cases


def test_hostile_manifests_are_4xx_and_write_nothing(srv: JupyterServerProcess) -> None:
    before_runs = run_ids(srv)
    before_files = _outside_snapshot(srv)
    for label, body, status, needle in _hostile_cases():
        r = _post_run(srv, body)
        assert r.status_code == status, (label, r.status_code, r.text[:300])
        err = r.json()
        assert needle in err["error"] + err["hint"], (label, err)
    assert run_ids(srv) == before_runs
    assert _outside_snapshot(srv) == before_files
    assert not (srv.root_dir / "handoff-runs").exists() or not any((srv.root_dir / "handoff-runs").iterdir())


def test_declared_size_must_match_the_stored_chunk(srv: JupyterServerProcess) -> None:
    data = uuid.uuid4().bytes * 10
    m, blobs = manifest_for({"d.bin": data})
    upload(srv.client, blobs)
    h = next(iter(blobs))
    m["chunks"][h]["stored"] = len(data) - 1  # "chunk larger than declared"
    before = run_ids(srv)
    assert_error(_post_run(srv, {"manifest": m}), 400, "declares")
    assert run_ids(srv) == before
