"""Tokens go only to their server: never stored by it, never sent to another one; and what a
remote run planted is left out of a pull back unless the user trusts it.

``%handoff --to URL --token T`` in a real kernel against a real server, then every byte the
server stores is searched for T; a handoff to something that is not a jupyter-handoff server
(an ordinary web server recording what it receives) gets no token and no manifest. A remote run
plants an object whose unpickling calls ``exec`` and a file handle whose reducer rebuild would
create a file on the laptop: ``%pull`` leaves both out and names them while the laptop's own
objects come back; ``%pull --again --trust`` loads them.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import start_new_kernel

from tests.harness.runner_helpers import wait_status
from tests.harness.server_process import JupyterServerProcess


class Recorder:
    """A plain web server (not Jupyter) that answers HTML and records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                rec.requests.append({"method": self.command, "path": self.path,
                                     "headers": dict(self.headers), "body": body})
                page = b"<html><body>Welcome to my blog</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            do_GET = do_POST = do_PUT = do_HEAD = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


class Kernel:
    """A real kernel with the magics loaded, in ``cwd``, with no HANDOFF_* settings."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.km, self.kc = start_new_kernel(kernel_name="python3", cwd=str(cwd), env=env)
        self.run("%load_ext handoff_magic")

    def run(self, code: str, timeout: float = 120) -> str:
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            c = msg["content"]
            out.append(c.get("text") or c.get("evalue") or json.dumps(c.get("data", {})))
        self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        return "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _env(**extra: str) -> dict[str, str]:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")}
    return {**env, **extra}


def _every_stored_byte(srv: JupyterServerProcess) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for base in (srv.data_dir, srv.root_dir) for p in base.rglob("*")
            if p.is_file()}


def _asking(tmp_path: Path) -> Path:
    """A scripted model whose run waits for the user: still there to hand off."""
    script = tmp_path / "ask.json"
    script.write_text(json.dumps([{"text": "", "tool_calls": [
        {"name": "ask_user", "arguments": {"question": "shall I go on?"}}]}]))
    return script


def test_a_token_given_to_handoff_is_in_no_byte_the_server_stores(
        handoff_server: JupyterServerProcess, tmp_path: Path) -> None:
    srv = handoff_server
    script = _asking(tmp_path)
    k = Kernel(tmp_path, env=_env())
    try:
        k.run("data = [1, 2, 3]")
        k.run(f"%agent --model scripted:{script} count the data")
        out = k.run(f"%handoff --to {srv.url} --token {srv.token}")
        runs = srv.client.get("/handoff/api/runs").json()["runs"]
        assert runs, out
    finally:
        k.close()
    leaks = [path for path, data in _every_stored_byte(srv).items() if srv.token.encode() in data]
    assert leaks == []


def test_a_handoff_to_a_server_that_is_not_jupyter_handoff_sends_no_token_and_no_manifest(
        recorder: Recorder, tmp_path: Path) -> None:
    k = Kernel(tmp_path, env=_env(HANDOFF_SERVER_URL="http://127.0.0.1:9", HANDOFF_TOKEN="the-real-token"))
    try:
        k.run("data = [1, 2, 3]")
        k.run(f"%agent --model scripted:{_asking(tmp_path)} count the data")
        out = k.run(f"%handoff --to {recorder.url} --token typed-token")
    finally:
        k.close()
    assert "does not answer like a jupyter-handoff server" in out, out
    sent = json.dumps([{**r, "body": r["body"].decode(errors="replace")} for r in recorder.requests])
    assert "typed-token" not in sent and "the-real-token" not in sent
    assert all(r["method"] == "GET" and not r["body"] for r in recorder.requests), recorder.requests


def test_handoff_token_is_bound_to_handoff_server_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from handoff_magic.remote.settings import server_settings
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("HANDOFF_SERVER_URL", "https://mine.example:8888/")
    monkeypatch.setenv("HANDOFF_TOKEN", "env-token")
    assert server_settings() == ("https://mine.example:8888", "env-token")
    assert server_settings("https://mine.example:8888") == ("https://mine.example:8888", "env-token")
    assert server_settings("https://elsewhere.example") == ("https://elsewhere.example", None)
    assert server_settings("https://elsewhere.example", "its-own") == ("https://elsewhere.example", "its-own")
    (tmp_path / "handoff.json").write_text('{"server_url": "http://file:1", "token": "file-token"}')
    assert server_settings("http://file:1") == ("http://file:1", "file-token")


PLANT = ("import os\nclass Planted:\n    def __reduce__(self):\n"
         "        return (exec, (\"open('PWNED-ON-LAPTOP', 'w').write('ran')\",))\n"
         "planted = Planted()\nmade_remotely = {'rows': 3}\n"
         # a handle to a file outside the workspace, deleted: reopening it (append mode) creates it
         "os.makedirs(os.path.dirname(TARGET), exist_ok=True)\nlog = open(TARGET, 'a')\nos.remove(TARGET)")


def test_pull_leaves_out_planted_objects_and_file_reopens_unless_trusted_and_keeps_what_the_laptop_sent(
        handoff_server: JupyterServerProcess, tmp_path: Path) -> None:
    srv = handoff_server
    script = tmp_path / "plant.json"
    target = tmp_path / "outside-the-run" / "created-by-remote.log"
    target.parent.mkdir()
    plant = f"TARGET = {str(target)!r}\n{PLANT}"
    script.write_text(json.dumps([
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "go?"}}]},
        {"text": "", "tool_calls": [{"name": "run_python", "arguments": {"code": plant}}]},
        {"text": "", "tool_calls": [{"name": "ask_user", "arguments": {"question": "pull me"}}]}]))
    (tmp_path / "shapes.py").write_text("class Point:\n    def __init__(self, x):\n        self.x = x\n")
    k = Kernel(tmp_path, env=_env(HANDOFF_SERVER_URL=srv.url, HANDOFF_TOKEN=srv.token))
    try:
        k.run("from shapes import Point\np = Point(7)")
        k.run(f"%agent --model scripted:{script} plant something")
        k.run("%handoff")
        run_id = srv.client.get("/handoff/api/runs").json()["runs"][0]["id"]
        wait_status(srv, run_id, ("waiting_input",))
        assert srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "go"}).status_code == 200
        deadline = time.monotonic() + 120
        while (summary := srv.client.get(f"/handoff/api/runs/{run_id}").json()).get("question") != "pull me":
            assert time.monotonic() < deadline, f"the remote run never planted its object: {summary}"
            time.sleep(0.5)
        report = k.run(f"%pull {run_id}")
        assert not (tmp_path / "PWNED-ON-LAPTOP").exists(), report
        assert not target.exists(), report
        assert "planted" in report and "builtins.exec" in report and "--trust" in report, report
        assert str(target) in report, report   # the report names the file the run asked to reopen
        assert "False False {'rows': 3} 7" in k.run("print('planted' in dir(), 'log' in dir(), made_remotely, p.x)")
        k.run(f"%pull {run_id} --again --trust")
        assert (tmp_path / "PWNED-ON-LAPTOP").exists()   # --trust: loaded, so its code ran
        assert target.exists()                           # and the handle was reopened
    finally:
        k.close()
