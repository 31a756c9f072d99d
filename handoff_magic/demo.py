"""``python -m handoff_magic.demo`` (``make demo``): the whole journey, headless, on this machine.

A local Jupyter Server with the extension plays "the cloud" (127.0.0.1, free port, temp dirs,
a loopback webhook as its notification URL). notebooks/demo.ipynb is executed cell by cell in
real kernels: part 1 in kernel A (a few local agent steps, ``%handoff``), then kernel A is
killed like a closed laptop; the run finishes remotely and the webhook hears about it; part 2
runs in a brand-new kernel B (``%reattach``, diff, ``%pull``, ``%agent continue``).

(Over 400 lines: the whole journey is one script, meant to be read as a story.)
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import httpx

from .errors import DemoError

PACKAGE = Path(__file__).resolve().parent
JOURNEY_SCRIPT = PACKAGE / "demo_scripts" / "journey.json"
NOTEBOOK_CANDIDATES = (PACKAGE.parent / "notebooks" / "demo.ipynb",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the cloud: a real Jupyter Server with the extension ----------------------------------------
class Cloud:
    """A Jupyter Server subprocess with jupyter_server_ext on 127.0.0.1 (its own dirs and token)."""

    def __init__(self, base: Path, *, model: str = "", notify_urls: list[str] | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.root_dir = base / "cloud-root"
        self.data_dir = base / "cloud-data"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = os.urandom(16).hex()
        self.model = model
        self.notify_urls = list(notify_urls or [])
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.log_path = base / "cloud-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--ServerApp.jpserver_extensions={'jupyter_server_ext': True}",
               f"--HandoffApp.data_dir={self.data_dir}"]
        if self.model:
            cmd.append(f"--HandoffApp.model={self.model}")
        # one flag per URL: traitlets reads a JSON list given once as a single string
        cmd += [f"--HandoffApp.notify_urls={u}" for u in self.notify_urls]
        if shutil.which("bwrap") is None:  # make demo installs bubblewrap; say so when it could not
            print("demo: bubblewrap (bwrap) is not installed, so the demo server runs its kernel "
                  "UNSANDBOXED (--HandoffApp.sandbox=none); apt-get install bubblewrap to sandbox it")
            cmd.append("--HandoffApp.sandbox=none")
        return cmd + self.extra_args

    def start(self, timeout: float = 60.0) -> "Cloud":
        env = dict(os.environ)
        env.pop("JUPYTER_TOKEN", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(self.root_dir), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"the Jupyter Server exited with code {self.proc.returncode}; "
                                f"log {self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(f"{self.url}/handoff/api/runs",
                              headers={"Authorization": f"token {self.token}"}, timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise DemoError(f"the Jupyter Server did not serve /handoff/api within {timeout:.0f}s; "
                        f"log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the extension stops cleanly), then SIGKILL the group if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # kernels it did not shut down
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


# -- the webhook: what a phone would get ----------------------------------------------------------
class WebhookReceiver:
    """A loopback HTTP receiver for apprise ``json://`` notifications."""

    def __init__(self) -> None:
        self.received: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.all: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body or b"{}")
                except ValueError:
                    payload = {"raw": body.decode("utf-8", "replace")}
                item = {"path": self.path, "payload": payload, "time": time.time()}
                receiver.all.append(item)
                receiver.received.put(item)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def apprise_url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def wait(self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
             timeout: float = 60.0) -> dict[str, Any]:
        for item in self.all:
            if predicate(item):
                return item
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching notification within {timeout:.0f}s "
                                   f"(got {len(self.all)}: {[i['payload'] for i in self.all]})")
            try:
                item = self.received.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(item):
                return item

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a laptop kernel ------------------------------------------------------------------------------
class Kernel:
    """A real ipykernel (jupyter_client) that runs code and returns nbformat outputs."""

    def __init__(self, cwd: Path, env: dict[str, str], name: str = "python3",
                 log: Path | None = None) -> None:
        from jupyter_client.manager import KernelManager
        self.km = KernelManager(kernel_name=name)
        kw: dict[str, Any] = {}
        if log is not None:  # the kernel's own stderr (warnings, crashes) goes to a file
            self._log = open(log, "ab")
            kw = {"stdout": self._log, "stderr": self._log}
        self.km.start_kernel(cwd=str(cwd), env=env, **kw)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=60)
        except RuntimeError:
            self.shutdown()
            raise

    def run(self, code: str, timeout: float = 300.0, *, store_history: bool = True) -> tuple[str, list[dict[str, Any]]]:
        """Execute; returns (status, outputs) with outputs as nbformat v4 dicts."""
        from nbformat.v4 import output_from_msg
        outputs: list[dict[str, Any]] = []

        def hook(msg: dict[str, Any]) -> None:
            kind = msg["header"]["msg_type"]
            if kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append(output_from_msg(msg))
            elif kind == "clear_output":
                outputs.clear()

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False,
                                            store_history=store_history)
        return reply["content"]["status"], outputs

    def kill(self) -> None:
        """Like a laptop lid closing on a crashed kernel: no goodbye."""
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    shutdown = kill


def output_text(outputs: list[dict[str, Any]]) -> str:
    """The plain-text view of a cell's outputs (what a terminal user would read)."""
    parts = []
    for o in outputs:
        if o["output_type"] == "stream":
            parts.append(o["text"])
        elif o["output_type"] in ("display_data", "execute_result"):
            data = o.get("data", {})
            parts.append(str(data.get("text/plain", "")))
        elif o["output_type"] == "error":
            parts.append(f"{o['ename']}: {o['evalue']}")
    return "\n".join(p.rstrip("\n") for p in parts if p)


def find_notebook() -> Path:
    for p in NOTEBOOK_CANDIDATES:
        if p.is_file():
            return p
    raise DemoError("notebooks/demo.ipynb not found next to the package: run the demo from a "
                    "source checkout (git clone ...; make demo)")


# -- the journey --------------------------------------------------------------------------------
class Transcript:
    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.mark = self.t0
        self.stages: list[dict[str, Any]] = []

    def stage(self, name: str, text: str, **data: Any) -> None:
        now = time.perf_counter()
        took = now - self.mark
        self.mark = now
        self.stages.append({"stage": name, "seconds": round(took, 3), "text": text, **data})
        first, *rest = text.splitlines() or [""]
        self.out(f"[{took:6.2f}s] {name:<10} {first}")
        for line in rest:
            self.out(f"{'':20}{line}")

    def note(self, text: str) -> None:
        for line in text.splitlines():
            self.out(f"{'':20}{line}")


def _indent(text: str, limit: int = 12) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return "\n".join("  " + ln for ln in lines)


class Journey:
    """Runs notebooks/demo.ipynb's two parts in two kernels against the local cloud."""

    def __init__(self, base: Path, transcript: Transcript, *, verbose: bool = False) -> None:
        self.base = base
        self.t = transcript
        self.verbose = verbose
        self.laptop = base / "laptop"
        self.laptop.mkdir(parents=True, exist_ok=True)
        self.webhook: WebhookReceiver | None = None
        self.cloud: Cloud | None = None
        self.kernels: list[Kernel] = []
        self.executed_path = base / "demo-executed.ipynb"

    def kernel_env(self) -> dict[str, str]:
        assert self.cloud is not None
        env = dict(os.environ)
        env.update({"HANDOFF_SERVER_URL": self.cloud.url, "HANDOFF_TOKEN": self.cloud.token,
                    "HANDOFF_MODEL": f"scripted:{JOURNEY_SCRIPT}",
                    "HANDOFF_CACHE_DIR": str(self.base / "laptop-cache"), "MPLBACKEND": "Agg",
                    "PYTHONUNBUFFERED": "1"})
        return env

    def run_cells(self, kernel: Kernel, nb: Any, cells: list[int], label: str) -> None:
        for i in cells:
            cell = nb.cells[i]
            status, outputs = kernel.run(cell.source)
            cell.outputs = outputs
            text = output_text(outputs)
            if self.verbose:
                self.t.note(f"--- [{label}] {cell.source.strip().splitlines()[0][:70]}\n{_indent(text, 40)}")
            if status != "ok":
                raise DemoError(f"cell {i} ({cell.source.strip().splitlines()[0][:60]!r}) failed in {label}:\n"
                                f"{_indent(text, 30)}")

    def probe(self, kernel: Kernel, code: str) -> Any:
        """Ask a kernel for a JSON value (not part of the notebook)."""
        # No names and no history left behind: a probe must not end up in the user's snapshot.
        status, outputs = kernel.run(f"print(__import__('json').dumps({code}))", timeout=60,
                                     store_history=False)
        text = output_text(outputs)
        if status != "ok":
            raise DemoError(f"probing the kernel failed: {text}")
        return json.loads(text.strip().splitlines()[-1])

    def run(self) -> dict[str, Any]:
        import nbformat

        from .remote.http import HandoffClient

        nb_path = find_notebook()
        nb = nbformat.read(nb_path, as_version=4)
        code = [(i, c.metadata.get("tags", [])) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        part1 = [i for i, tags in code if "local" in tags]
        part2 = [i for i, tags in code if "new-kernel" in tags]
        params = [i for i in part2 if "parameters" in nb.cells[i].metadata.get("tags", [])]
        if not part1 or not part2 or len(params) != 1:
            raise DemoError(f"{nb_path} must tag code cells 'local' and 'new-kernel' (one 'parameters' cell)")

        self.webhook = WebhookReceiver()
        self.cloud = Cloud(self.base, model=f"scripted:{JOURNEY_SCRIPT}", notify_urls=[self.webhook.apprise_url])
        self.cloud.start()
        self.t.stage("cloud", f"Jupyter Server with the handoff extension at {self.cloud.url}\n"
                              f"workspace {self.cloud.root_dir}; notifications -> {self.webhook.apprise_url}")
        client = HandoffClient(self.cloud.url, self.cloud.token)

        # -- part 1: the laptop ------------------------------------------------------------
        a = Kernel(self.laptop, self.kernel_env(), log=self.base / "kernel-A.log")
        self.kernels.append(a)
        self.t.stage("laptop", f"kernel A started in {self.laptop}")
        handoff_cell = next(i for i in part1 if nb.cells[i].source.lstrip().startswith("%handoff"))
        before = [i for i in part1 if i < handoff_cell]
        self.run_cells(a, nb, before, "kernel A")
        local = self.probe(a, "(lambda r: {'id': r.id, 'status': r.status, 'steps': r.state.steps, "
                              "'plan': [(p.text, p.status) for p in r.state.plan]})"
                              "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")
        self.t.stage("local", f"agent ran {local['steps']} steps in kernel A, now {local['status']}; plan:\n"
                              + "\n".join(f"  [{s:7}] {t}" for t, s in local["plan"]))
        t0, wall0 = time.perf_counter(), time.time()
        self.run_cells(a, nb, [handoff_cell], "kernel A")
        prompt_back = time.perf_counter() - t0
        info = self.probe(a, "__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()")
        if not info:
            raise DemoError("%handoff returned but recorded no handoff")
        run_id, tm = info["run_id"], info["timings"]
        self.t.stage("handoff", f"%handoff -> remote run {run_id}; prompt back after {prompt_back:.2f}s\n"
                                f"capture {tm['capture']:.2f}s, upload {tm['upload']:.2f}s "
                                f"({tm['chunks_sent']}/{tm['chunks_total']} chunks, {tm['bytes_sent']:,} of "
                                f"{tm['bytes_total']:,} bytes), create {tm['create']:.2f}s",
                     run_id=run_id, prompt_back=prompt_back, **tm)
        rest1 = [i for i in part1 if i > handoff_cell]
        self.run_cells(a, nb, rest1, "kernel A")
        a.kill()
        self.kernels.remove(a)
        self.t.stage("disconnect", "kernel A killed (the laptop is closed); the run goes on remotely")

        # -- the cloud finishes; the phone buzzes --------------------------------------------
        first_step = None
        after, status, deadline = 0, "", time.monotonic() + 300
        while status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
            page = client.events(run_id, after=after, timeout=10)
            for ev in page["events"]:
                if first_step is None and ev["type"] == "tool_result" and float(ev["time"]) > wall0:
                    first_step = float(ev["time"]) - wall0  # server clock = this machine's
            after, status = page["last_seq"], page["status"]
        summary = client.get_run(run_id)
        if status != "completed":
            raise DemoError(f"remote run {run_id} ended {status or 'nowhere (timeout)'}: "
                            f"{summary.get('error')}\nserver log {self.cloud.log_path}:\n{self.cloud.log_tail()}")
        self.t.stage("remote", f"run {run_id} completed on the server after {summary.get('steps')} steps\n"
                               f"summary: {summary.get('summary')}")
        note = self.webhook.wait(timeout=60)
        payload = note["payload"]
        self.t.stage("notify", f"webhook got: {payload.get('title') or ''}\n"
                               f"{_indent(str(payload.get('message') or payload)[:600], 6)}")

        # -- part 2: a new kernel -----------------------------------------------------------
        nb.cells[params[0]].source = f'RUN_ID = "{run_id}"  # from the notification'
        b = Kernel(self.laptop, self.kernel_env(), log=self.base / "kernel-B.log")
        self.kernels.append(b)
        stage_cells: dict[str, list[int]] = {}
        for i in part2:
            src = nb.cells[i].source.lstrip()
            key = ("pull" if src.startswith("%pull") else "continue" if src.startswith("%agent continue")
                   else "diff" if "review_diff" in src else None)
            if key:
                stage_cells.setdefault(key, []).append(i)
        done: set[int] = set()

        def upto(i_max: int, label: str) -> None:
            cells = [i for i in part2 if i <= i_max and i not in done]
            self.run_cells(b, nb, cells, label)
            done.update(cells)

        upto(stage_cells["diff"][0] - 1, "kernel B")
        journey = "__import__('handoff_magic.remote.journey', fromlist=['x'])"
        events = self.probe(b, f"len({journey}.LAST_REATTACH.state.events)"
                               f" if getattr({journey}, 'LAST_REATTACH', None) else None")
        self.t.stage("reattach", f"kernel B (new): %reattach listed the server's runs and rebuilt run {run_id}"
                                 + (f" from {events} events" if events else ""))
        upto(stage_cells["diff"][-1], "kernel B")
        diff = client.diff(run_id)
        files = ", ".join(f"{f.get('change')} {f.get('path')}" for f in diff.get("files") or []) or "none"
        variables = ", ".join(f"{v.get('change')} {v.get('name')}" for v in diff.get("variables") or []) or "none"
        self.t.stage("diff", f"files: {files}\nvariables: {variables}")
        upto(stage_cells["pull"][-1], "kernel B")
        pulled = self.probe(b, "(lambda r: {'id': r.id, 'status': r.status, 'steps': r.state.steps, "
                               "'messages': len(r.state.messages), 'r2': globals().get('r2')})"
                               "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")
        self.t.stage("pull", f"%pull restored the run into kernel B: {pulled['steps']} steps, "
                             f"{pulled['messages']} messages, status {pulled['status']}; r2 = {pulled['r2']}")
        upto(part2[-1], "kernel B")
        final = self.probe(b, "(lambda r: {'status': r.status, 'steps': r.state.steps, 'summary': r.state.summary})"
                              "(__import__('handoff_magic.local.run', fromlist=['x']).current_run())")
        self.t.stage("continue", f"%agent continue ran locally: {final['status']} after {final['steps']} steps\n"
                                 f"{final['summary']}")
        b.kill()
        self.kernels.remove(b)
        nbformat.write(nb, str(self.executed_path))
        result = self.cloud.root_dir / "handoff-runs" / run_id / "result.ipynb"
        if not result.is_file():
            raise DemoError(f"the run's result notebook {result} is missing")
        nbformat.validate(nbformat.read(result, as_version=4))
        return {"run_id": run_id, "result": str(result), "executed": str(self.executed_path),
                "prompt_back": prompt_back,
                "first_remote_step": first_step}

    def cleanup(self) -> None:
        for k in list(self.kernels):
            try:
                k.kill()
            except Exception as exc:  # noqa: BLE001 - keep cleaning the rest; say what was left
                print(f"warning: could not stop a kernel: {exc}", file=sys.stderr)
        self.kernels.clear()
        if self.cloud is not None:
            self.cloud.stop()
        if self.webhook is not None:
            self.webhook.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m handoff_magic.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="keep everything here (default: a new temp dir)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every cell's output")
    p.add_argument("--clean", action="store_true", help="delete the work dir afterwards")
    args = p.parse_args(argv)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="handoff-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    # isolate Jupyter's config/runtime dirs so a developer's settings don't leak in
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR"):
        d = base / name.lower()
        d.mkdir(exist_ok=True)
        os.environ[name] = str(d)
    for name in ("HANDOFF_SERVER_URL", "HANDOFF_TOKEN", "HANDOFF_MODEL", "JUPYTER_TOKEN"):
        os.environ.pop(name, None)
    t = Transcript()
    print("jupyter-handoff demo: run an agent locally, hand it off, close the laptop, come back, pull it back")
    journey = Journey(base, t, verbose=args.verbose)
    try:
        out = journey.run()
    except (DemoError, TimeoutError) as exc:
        print(f"\nDEMO FAILED: {exc}\n(work dir kept: {base})", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - reported with its traceback just below
        import traceback
        traceback.print_exc()
        print(f"\nDEMO FAILED with an unexpected {type(exc).__name__}: {exc}\n(work dir kept: {base})",
              file=sys.stderr)
        return 1
    finally:
        journey.cleanup()
    total = time.perf_counter() - t.t0
    print(f"\nOK in {total:.1f}s. %handoff gave the prompt back in {out['prompt_back']:.2f}s"
          + (f"; first remote step {out['first_remote_step']:.2f}s after %handoff" if out["first_remote_step"] else ""))
    print(f"result notebook (remote run): {out['result']}")
    print(f"executed demo notebook:       {out['executed']}")
    if args.clean:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
