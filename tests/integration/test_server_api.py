"""The server extension over real HTTP: a real ``jupyter server`` subprocess (tests/harness/server_process.py).

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff_magic.state import RunState
from tests.harness.server_process import JupyterServerProcess, Webhook

MiB = 1024 * 1024
SHA0 = "0" * 64


@pytest.fixture(scope="module")
def hook() -> Iterator[Webhook]:
    h = Webhook().start()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def srv(hook: Webhook) -> Iterator[JupyterServerProcess]:
    s = JupyterServerProcess(extra_args=[f"--HandoffApp.max_chunk_bytes={MiB}",
                                         f"--HandoffApp.max_bundle_bytes={3 * MiB}",
                                         "--HandoffApp.max_events_wait=2",
                                         f"--HandoffApp.notify_urls={hook.url}",
                                         "--HandoffApp.notify_retry_seconds=0.2"])
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
    assert c.post("/handoff/api/blobs/missing", json={"shas": [h, h]}).json()["missing"] == [h]
    assert c.head(f"/handoff/api/blobs/{h}").status_code == 404
    r = c.put(f"/handoff/api/blobs/{h}", content=data)
    assert r.status_code == 201 and r.json()["size"] == len(data)
    assert c.put(f"/handoff/api/blobs/{h}", content=data).status_code == 200  # idempotent
    head = c.head(f"/handoff/api/blobs/{h}")
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert c.get(f"/handoff/api/blobs/{h}").content == data
    assert c.post("/handoff/api/blobs/missing", json={"shas": [h]}).json()["missing"] == []
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


def test_upload_cut_mid_body_leaves_nothing(srv: JupyterServerProcess) -> None:
    """A real socket closed halfway through a PUT: no blob, no temp file; a retry then works."""
    import socket
    data = uuid.uuid4().bytes * 20_000  # 320 kB
    h = sha(data)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall((f"PUT /handoff/api/blobs/{h} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                   f"Authorization: token {srv.token}\r\nContent-Length: {len(data)}\r\n\r\n").encode())
        s.sendall(data[: len(data) // 2])
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while list((srv.data_dir / "blobs").rglob(".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list((srv.data_dir / "blobs").rglob(".tmp-*"))
    assert srv.client.post("/handoff/api/blobs/missing", json={"shas": [h]}).json()["missing"] == [h]
    assert srv.client.put(f"/handoff/api/blobs/{h}", content=data).status_code == 201


def test_uploads_back_to_back_on_one_connection_in_uneven_bursts_are_stored_exactly(
        srv: JupyterServerProcess) -> None:
    """Bodies arrive in bursts of odd sizes with pauses (so the server reads them in pieces),
    one after another on one kept-alive socket, big then small (a reused receive buffer must
    not leak an earlier body's bytes), with a corrupted one among them: each is stored exactly
    as sent or refused, and the connection keeps working."""
    import http.client
    import os
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    auth = {"Authorization": f"token {srv.token}"}
    bodies = [os.urandom(n) for n in (MiB, 1, 4095, 4097, 300_001, MiB - 1)]
    pending_before = set((srv.data_dir / "blobs").rglob(".tmp-*"))   # earlier tests' unsettled uploads
    for i, data in enumerate(bodies):
        h = sha(data)
        bad = i == 3
        sent = data[:-1] + bytes([data[-1] ^ 1]) if bad else data
        conn.putrequest("PUT", f"/handoff/api/blobs/{h}")
        for k, v in {**auth, "Content-Length": str(len(sent))}.items():
            conn.putheader(k, v)
        conn.endheaders()
        for pos in range(0, len(sent), 77_777):
            conn.send(sent[pos: pos + 77_777])
            if pos % 3 == 0:
                time.sleep(0.002)
        reply = conn.getresponse()
        body = json.loads(reply.read())
        if bad:
            assert reply.status == 400 and h in body["error"]
            assert srv.client.head(f"/handoff/api/blobs/{h}").status_code == 404
        else:
            assert reply.status == 201 and body["size"] == len(data), body
            assert srv.client.get(f"/handoff/api/blobs/{h}").content == data
    conn.close()
    assert set((srv.data_dir / "blobs").rglob(".tmp-*")) == pending_before   # the refused one left nothing


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
        ("non-standard numbers", '{"manifest": {"kind": "handoff-bundle", "schema_version": NaN, '
                                 '"chunks": {"a": {"stored": Infinity}}}}', 400, "NaN"),
        ("deeply nested", '{"manifest": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "JSON"),
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


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20)
_FIELDS = ["schema_version", "kind", "chunks", "variables", "groups", "replays", "imports",
           "history", "files", "run"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_json, junk=_json)
def test_fuzzed_manifests_never_500_and_create_nothing(srv: JupyterServerProcess, field: str,
                                                       value: Any, junk: Any) -> None:
    """Property: any mutation of a manifest field, or any JSON at all, is a clean 4xx."""
    m, _ = manifest_for({"x.txt": b"fuzz"})  # its chunk is never uploaded
    m[field] = value
    before = len(run_ids(srv))
    for body in ({"manifest": m}, {"manifest": junk}, junk):
        r = srv.client.post("/handoff/api/runs", json=body)
        assert r.status_code in (400, 413), (body, r.status_code, r.text[:300])
        assert r.json()["error"] and r.json()["hint"]
    assert len(run_ids(srv)) == before


def test_declared_size_must_match_the_stored_chunk(srv: JupyterServerProcess) -> None:
    data = uuid.uuid4().bytes * 10
    m, blobs = manifest_for({"d.bin": data})
    upload(srv.client, blobs)
    h = next(iter(blobs))
    m["chunks"][h]["stored"] = len(data) - 1  # "chunk larger than declared"
    before = run_ids(srv)
    assert_error(_post_run(srv, {"manifest": m}), 400, "declares")
    assert run_ids(srv) == before


# ---------------------------------------------------------------------------------------------
# real runs (scripted model): idempotent create, long-poll, answer, status page, SIGKILL
# ---------------------------------------------------------------------------------------------
TERMINAL = ("completed", "failed", "cancelled", "pulled")


def _script(srv: JupyterServerProcess, name: str, turns: list[dict[str, Any]]) -> str:
    path = srv.data_dir.parent / f"{name}.json"
    path.write_text(json.dumps(turns))
    return f"scripted:{path}"


def _py(code: str, text: str = "") -> dict[str, Any]:
    return {"text": text, "tool_calls": [{"name": "run_python", "arguments": {"code": code}}]}


def _ask(question: str) -> dict[str, Any]:
    return {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": question}}]}


def _finish(summary: str) -> dict[str, Any]:
    return {"text": "", "tool_calls": [{"name": "finish", "arguments": {"summary": summary}}]}


def _hand_off(srv: JupyterServerProcess, model: str, key: str, goal: str) -> httpx.Response:
    state = RunState(goal=goal, model=model)
    m, blobs = manifest_for({"notes.txt": b"median beats mean for skewed sales\n"}, run=state.to_dict())
    upload(srv.client, blobs)
    return _post_run(srv, {"manifest": m, "idempotency_key": key})


def _wait(srv: JupyterServerProcess, rid: str, statuses: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    summary: dict[str, Any] = {}
    while time.monotonic() < deadline:
        summary = srv.client.get(f"/handoff/api/runs/{rid}").json()
        if summary["status"] in statuses:
            return summary
        if summary["status"] in TERMINAL:
            break
        time.sleep(0.1)
    raise AssertionError(f"run {rid} is {summary.get('status')}, wanted {statuses}: {summary.get('error')}\n"
                         f"{srv.log()[-8000:]}")


def _follow(srv: JupyterServerProcess, rid: str, after: int = 0, until: tuple[str, ...] = TERMINAL,
            timeout: float = 90) -> tuple[list[dict[str, Any]], list[float]]:
    """Long-poll like a reattached widget; returns events and how long each poll took."""
    events: list[dict[str, Any]] = []
    waits: list[float] = []
    deadline = time.monotonic() + timeout
    settled = False  # once the status is reached, drain with non-blocking polls
    with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=30) as c:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            r = c.get(f"/handoff/api/runs/{rid}/events",
                      params={"after": after, "timeout": 0 if settled else 5}).json()
            waits.append(time.monotonic() - t0)
            events.extend(r["events"])
            after = r["last_seq"]
            if settled and not r["events"]:
                return events, waits
            settled = r["status"] in until
    raise AssertionError(f"run {rid} did not reach {until}")


def test_run_with_question_answer_and_completion(srv: JupyterServerProcess, hook: Webhook) -> None:
    model = _script(srv, "qa", [
        _py("print(open('notes.txt').read().upper())", text="<b>Reading</b> the notes <script>alert(1)</script>"),
        _ask("Use the median or the mean?"),
        _py("print('using', 'median')"),
        _finish("Median chosen; report written."),
    ])
    key = uuid.uuid4().hex
    r = _hand_off(srv, model, key, "Summarise the notes & pick a statistic")
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    again = _hand_off(srv, model, key, "Summarise the notes & pick a statistic")
    assert again.status_code == 200 and again.json()["id"] == rid  # a retried create
    assert [x for x in run_ids(srv) if x == rid] == [rid]

    events, _ = _follow(srv, rid, until=("waiting_input",))
    summary = srv.client.get(f"/handoff/api/runs/{rid}").json()
    assert summary["status"] == "waiting_input" and summary["question"] == "Use the median or the mean?"
    assert summary["links"]["status_page"] == f"{srv.url}/handoff/runs/{rid}"
    assert summary["links"]["notebook"] == f"{srv.url}/lab/tree/handoff-runs/{rid}/result.ipynb"
    outputs = [e["data"]["content"] for e in events if e["type"] == "tool_result"]
    assert any("MEDIAN BEATS MEAN" in o for o in outputs), outputs

    page = srv.client.get(f"/handoff/runs/{rid}").text
    assert "Use the median or the mean?" in page and 'name="_xsrf"' in page
    assert "&lt;b&gt;Reading&lt;/b&gt;" in page and "<script>alert(1)" not in page
    assert "Summarise the notes &amp; pick a statistic" in page
    assert 'http-equiv="refresh"' not in page  # no refresh while the user may be typing
    listing = srv.client.get("/handoff/runs").text
    assert f'href="/handoff/runs/{rid}"' in listing and "Summarise the notes &amp; pick" in listing

    assert_error(srv.client.post(f"/handoff/api/runs/{rid}/answer", json={"answer": ""}), 400, "answer")
    assert srv.client.post(f"/handoff/api/runs/{rid}/answer", json={"answer": "median"}).status_code == 200
    more, _ = _follow(srv, rid, after=events[-1]["seq"])
    seqs = [e["seq"] for e in events + more]
    assert seqs == list(range(1, len(seqs) + 1)), "events lost or duplicated"
    done = _wait(srv, rid, ("completed",))
    assert done["summary"] == "Median chosen; report written."
    assert any(e["type"] == "answer" and e["data"]["answer"] == "median" for e in more)

    # ended runs refuse answers and cancels with 409; the bundle carries the final state
    assert_error(srv.client.post(f"/handoff/api/runs/{rid}/answer", json={"answer": "x"}), 409, "waiting")
    assert_error(srv.client.post(f"/handoff/api/runs/{rid}/cancel"), 409, "ended")
    bundle = srv.client.get(f"/handoff/api/runs/{rid}/bundle").json()
    assert bundle["kind"] == "handoff-bundle" and bundle["run"]["status"] == "completed"
    diff = srv.client.get(f"/handoff/api/runs/{rid}/diff")
    assert diff.status_code == 200 and isinstance(diff.json(), dict)
    assert srv.client.get(f"/handoff/runs/{rid}/diff").status_code == 200
    nb = srv.root_dir / "handoff-runs" / rid / "result.ipynb"
    assert nb.is_file()
    assert srv.client.get(f"/lab/tree/handoff-runs/{rid}/result.ipynb").status_code == 200

    deadline = time.monotonic() + 20
    mine: list[dict[str, Any]] = []
    while len(mine) < 2 and time.monotonic() < deadline:
        mine = [m for m in hook.received if rid in m["title"]]
        time.sleep(0.05)
    assert [("needs your input" in m["title"], "finished" in m["title"]) for m in mine] == \
        [(True, False), (False, True)], mine
    assert f"{srv.url}/handoff/runs/{rid}" in mine[1]["message"]
    assert "Median chosen" in mine[1]["message"]


def test_answer_form_on_the_status_page(srv: JupyterServerProcess) -> None:
    model = _script(srv, "form", [_ask("Which region first?"), _finish("North first.")])
    rid = _hand_off(srv, model, uuid.uuid4().hex, "Rank the regions").json()["id"]
    _wait(srv, rid, ("waiting_input",))
    browser = _login(srv)
    try:
        page = browser.get(f"/handoff/runs/{rid}")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
        r = browser.post(f"/handoff/runs/{rid}/answer", data={"_xsrf": xsrf, "answer": "north"})
        assert r.status_code == 302 and r.headers["location"].endswith(f"/handoff/runs/{rid}?message=Answer+sent")
    finally:
        browser.close()
    assert _wait(srv, rid, ("completed",))["summary"] == "North first."
    done = srv.client.get(f"/handoff/runs/{rid}?message=Answer+sent").text   # the redirect, reloaded later
    assert "Answer sent" not in done and "completed" in done
    answers = [e for e in _follow(srv, rid)[0] if e["type"] == "answer"]
    assert answers and answers[0]["data"]["answer"] == "north"


def test_cancel_a_waiting_run(srv: JupyterServerProcess) -> None:
    model = _script(srv, "cancel", [_ask("Shall I go on?"), _finish("never reached")])
    rid = _hand_off(srv, model, uuid.uuid4().hex, "Something to cancel").json()["id"]
    _wait(srv, rid, ("waiting_input",))
    r = srv.client.post(f"/handoff/api/runs/{rid}/cancel")
    assert r.status_code == 200, r.text
    assert _wait(srv, rid, ("cancelled",))["status"] == "cancelled"
    assert "Cancel run" not in srv.client.get(f"/handoff/runs/{rid}").text


def test_long_poll_waits_then_returns_promptly(srv: JupyterServerProcess) -> None:
    model = _script(srv, "poll", [_ask("Ready?"), _py("import time; time.sleep(0.5); print('ok')"),
                                  _finish("ok")])
    rid = _hand_off(srv, model, uuid.uuid4().hex, "Poll me").json()["id"]
    _wait(srv, rid, ("waiting_input",))
    last = srv.client.get(f"/handoff/api/runs/{rid}").json()["last_seq"]
    for _ in range(20):  # the runner may still checkpoint after asking: wait for a quiet poll
        t0 = time.monotonic()
        r = srv.client.get(f"/handoff/api/runs/{rid}/events", params={"after": last, "timeout": 1}).json()
        if not r["events"]:
            break
        last = r["last_seq"]
    assert r["events"] == [] and r["last_seq"] == last and 0.9 <= time.monotonic() - t0 < 3
    # the cap (max_events_wait=2) bounds a greedy timeout
    t0 = time.monotonic()
    srv.client.get(f"/handoff/api/runs/{rid}/events", params={"after": last, "timeout": 3600})
    assert 1.9 <= time.monotonic() - t0 < 5
    assert_error(srv.client.get(f"/handoff/api/runs/{rid}/events", params={"after": "x"}), 400, "integer")

    import threading
    box: dict[str, Any] = {}

    def poll() -> None:
        t = time.monotonic()
        box["r"] = srv.client.get(f"/handoff/api/runs/{rid}/events", params={"after": last, "timeout": 30}).json()
        box["t"] = time.monotonic() - t

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.5)
    t_answer = time.monotonic()
    srv.client.post(f"/handoff/api/runs/{rid}/answer", json={"answer": "yes"})
    th.join(30)
    assert box["r"]["events"] and box["r"]["events"][0]["seq"] == last + 1
    assert box["t"] < 10 and time.monotonic() - t_answer < 10
    _wait(srv, rid, ("completed",))


def test_an_upload_cut_off_by_a_server_crash_is_asked_for_again_and_the_run_then_created(
        srv: JupyterServerProcess) -> None:
    """Uploads are answered before their fsync; only creating the run makes them durable. A
    crash in between must cost a re-upload, never a run on a missing or torn chunk."""
    m, blobs = manifest_for({"notes.txt": uuid.uuid4().bytes * 500})
    upload(srv.client, blobs)
    h = next(iter(blobs))
    assert srv.client.post("/handoff/api/blobs/missing", json={"shas": [h]}).json()["missing"] == []
    srv.kill()
    srv.restart()
    assert srv.client.post("/handoff/api/blobs/missing", json={"shas": [h]}).json()["missing"] == [h]
    refused = assert_error(srv.client.post("/handoff/api/runs", json={"manifest": m}), 400, "upload")
    assert refused["missing"] == [h]
    upload(srv.client, blobs)
    r = srv.client.post("/handoff/api/runs", json={"manifest": m})
    assert r.status_code == 201, r.text
    assert (srv.data_dir / "blobs" / h[:2] / h).read_bytes() == blobs[h]


def test_waiting_run_survives_server_sigkill(srv: JupyterServerProcess, hook: Webhook) -> None:
    """Runs last here: SIGKILL the module's server; the run, its log and outbox survive."""
    model = _script(srv, "kill", [_ask("Proceed with the full dataset?"), _py("print(6 * 7)"),
                                  _finish("42 computed after restart.")])
    rid = _hand_off(srv, model, uuid.uuid4().hex, "Survive a crash").json()["id"]
    _wait(srv, rid, ("waiting_input",))
    before, _ = _follow(srv, rid, until=("waiting_input",))
    # kill once the question is checkpointed (a kill before that makes the runner redo the
    # cut-off step, which re-asks: the runner's tests cover that path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            e["type"] == "checkpoint" and e["seq"] > q for e in before
            for q in [max(x["seq"] for x in before if x["type"] == "question")]):
        more = srv.client.get(f"/handoff/api/runs/{rid}/events",
                              params={"after": before[-1]["seq"], "timeout": 2}).json()["events"]
        before.extend(more)
    srv.kill()
    srv.restart()
    summary = _wait(srv, rid, ("waiting_input",))
    assert summary["question"] == "Proceed with the full dataset?"
    after_restart, _ = _follow(srv, rid, until=("waiting_input",))
    assert after_restart[:len(before)] == before  # the log is durable, byte for byte
    assert srv.client.post(f"/handoff/api/runs/{rid}/answer", json={"answer": "yes"}).status_code == 200
    done = _wait(srv, rid, ("completed",))
    assert done["summary"] == "42 computed after restart."
    events, _ = _follow(srv, rid)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert any("42" in e["data"].get("content", "") for e in events if e["type"] == "tool_result")
    deadline = time.monotonic() + 20
    mine: list[str] = []
    while not any("finished" in t for t in mine) and time.monotonic() < deadline:
        mine = [m["title"] for m in hook.received if rid in m["title"]]
        time.sleep(0.05)
    # the question was announced once, although the restarted server asked it again
    assert [("needs your input" in t, "finished" in t) for t in mine] == [(True, False), (False, True)], mine
