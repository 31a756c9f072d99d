"""How long the journey takes, end to end, on this machine (issue 15).

For each namespace size, with a real Jupyter Server subprocess (the extension) and real kernels:
- ``%handoff`` -> "safe to close" (the prompt is back: every chunk on the server, run created),
  and the laptop kernel's peak extra RSS meanwhile;
- ``%handoff`` -> first remote step (kernel start, bundle, restore, one step);
- the server's checkpoint after that step (the state is unchanged but for one small variable);
- a second ``%handoff --fork`` after changing one small variable: prompt back and bytes sent;
- ``%pull`` of the first run into a NEW kernel with an empty cache (everything downloaded).

Fair: with ``--baseline REV`` the same steps run against this repository at ``REV`` (its own
server and kernels, via PYTHONPATH), alternating ours / baseline / ours / baseline; guest memory
and the page cache are warmed first, one untimed round per variant warms imports and the
server, every round starts once both servers are idle (what a round leaves running, such as a
spare kernel booting, would otherwise land on the next variant's), and medians of ``--repeat``
runs are printed next to the load average.

    python benchmarks/handoff.py                          # 10 MB and 1 GB, 3 runs each
    python benchmarks/handoff.py --sizes 10MB --repeat 1  # quick
    python benchmarks/handoff.py --baseline 862efb9       # before/after side by side
    python benchmarks/handoff.py --warm-kernels 0         # every handoff starts its kernel
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx
import psutil

from handoff_magic.demo import Cloud, Kernel, output_text

UNITS = {"KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, mult in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


SCRIPT = [
    {"text": "local step", "tool_calls": [{"name": "run_python", "arguments": {"code": "step_one = 1"}}]},
    {"text": "first remote step", "tool_calls": [{"name": "run_python", "arguments": {"code": "step_two = 2"}}]},
    {"text": "ask", "tool_calls": [{"name": "ask_user", "arguments": {"question": "pull me back?"}}]},
    {"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "benchmark run"}}]},
]


def namespace_code(size: int, seed: int) -> str:
    """About ``size`` bytes of numpy state (random, so compression does not flatter anything)
    in a few arrays, plus a few small objects."""
    n = max(1, size // 8 // 4)
    return f"""
import numpy as np
_rng = np.random.default_rng({seed})  # new data each run: the server dedups chunks it has
arrays = [_rng.random({n}) for _ in range(4)]
small = {{"name": "bench", "k": 1}}
notes = "x" * 1000
"""


class Variant:
    """One code tree (ours, or the baseline revision) with its own server."""

    def __init__(self, name: str, tree: Path, base: Path, script: Path, max_size: int, warm_kernels: int) -> None:
        self.name, self.tree, self.base, self.script = name, tree, base, script
        self.env = {"PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": ""}   # compiled once, as installed
        self.cloud = Cloud(base / "cloud", env=self.env,
                           extra_args=[f"--HandoffApp.max_bundle_bytes={4 * max_size + 2**30}",
                                       f"--HandoffApp.warm_kernels={warm_kernels}"])

    def start(self) -> None:
        t = time.perf_counter()
        self.cloud.start()
        print(f"{self.name}: server ready in {time.perf_counter() - t:.2f}s at {self.cloud.url}", flush=True)

    def kernel(self, workdir: Path, cache: Path) -> Kernel:
        env = dict(os.environ, **self.env)
        env.update({"HANDOFF_SERVER_URL": self.cloud.url, "HANDOFF_TOKEN": self.cloud.token,
                    "HANDOFF_MODEL": f"scripted:{self.script}", "HANDOFF_CACHE_DIR": str(cache),
                    "MPLBACKEND": "Agg"})
        workdir.mkdir(parents=True, exist_ok=True)
        return Kernel(workdir, env, log=workdir.parent / "kernel.log")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.cloud.url}/handoff/api", timeout=60,
                            headers={"Authorization": f"token {self.cloud.token}"})


def run_cell(k: Kernel, code: str, timeout: float = 3600) -> str:
    status, outputs = k.run(code, timeout=timeout)
    text = output_text(outputs)
    if status != "ok":
        raise RuntimeError(f"{code!r} failed:\n{text}")
    return text


def value(k: Kernel, expr: str) -> Any:
    out = run_cell(k, f"import json as _j\nprint('@@' + _j.dumps({expr}))", timeout=60)
    return json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("@@"))[2:])


LAST = "__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()"


class PeakRSS:
    """Samples a process's RSS (kernel process, not the benchmark) every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def quiet(variants: list[Variant], busy: float = 0.2, longest: float = 10.0) -> None:
    """Wait until every server, with its kernels, has used under ``busy`` of a CPU for half a
    second (at most ``longest`` s): what one variant's round leaves running (a spare kernel
    booting after a pull, a cancelled run's clean-up) must not land on the next variant's."""
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        procs: list[psutil.Process] = []
        for v in variants:
            try:
                root = psutil.Process(v.cloud.proc.pid)  # type: ignore[union-attr]
                procs += [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        before = cpu_seconds(procs)
        time.sleep(0.5)
        if cpu_seconds(procs) - before < busy * 0.5:
            return


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time of the processes still alive."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def kernel_pid(k: Kernel) -> int:
    return int(k.km.provisioner.pid)  # type: ignore[union-attr]


def follow(http: httpx.Client, run_id: str, wall0: float, until: str, timeout: float = 600) -> dict[str, Any]:
    """Events of ``run_id`` after ``wall0`` until ``until`` ('first_step' or a status)."""
    after, deadline = 0, time.monotonic() + timeout
    marks: dict[str, Any] = {}
    while time.monotonic() < deadline:
        page = http.get(f"/runs/{run_id}/events", params={"after": after, "timeout": 5}).json()
        for ev in page["events"]:
            t, typ, data = float(ev["time"]), ev["type"], ev["data"]
            if t < wall0:
                continue  # the local part of the run's history
            if typ == "tool_result" and "first_step" not in marks:
                marks["first_step"] = t
            elif typ == "checkpoint" and "first_step" in marks and "checkpoint" not in marks:
                marks["checkpoint"] = t
                marks["checkpoint_seconds"] = data.get("seconds")
                marks["checkpoint_new"] = data.get("bytes_new")
            elif typ == "status":
                marks.setdefault(data.get("status"), t)
        after = page["last_seq"]
        if until in marks and (until != "first_step" or "checkpoint" in marks):
            return marks
        if page["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"remote run {run_id} {page['status']}: "
                               f"{http.get(f'/runs/{run_id}').json().get('error')}")
    raise RuntimeError(f"remote run {run_id} did not reach {until} within {timeout:.0f}s")


def one_round(v: Variant, size: int, work: Path) -> dict[str, Any]:
    http = v.http()
    k = v.kernel(work / "laptop", work / "cache")
    k2: Kernel | None = None
    try:
        run_cell(k, namespace_code(size, time.time_ns()))
        run_cell(k, "%load_ext handoff_magic")
        run_cell(k, "%agent --max-steps 1 benchmark")

        wall0, t0 = time.time(), time.perf_counter()
        with PeakRSS(kernel_pid(k)) as mem:
            run_cell(k, "%handoff")   # as a user hands off: the run's own widget follows it
            safe = time.perf_counter() - t0
        first = value(k, LAST)
        marks = follow(http, first["run_id"], wall0, "first_step")
        ckpt = marks["checkpoint_seconds"] if marks.get("checkpoint_seconds") is not None else \
            marks["checkpoint"] - marks["first_step"]

        run_cell(k, f"small['k'] = {time.time_ns()}")  # a value no earlier run uploaded
        t1 = time.perf_counter()
        run_cell(k, "%handoff --fork")
        again = time.perf_counter() - t1
        second = value(k, LAST)
        http.post(f"/runs/{second['run_id']}/cancel", json={})  # it only measured bytes

        follow(http, first["run_id"], wall0, "waiting_input")
        k2 = v.kernel(work / "laptop2", work / "cache2")
        run_cell(k2, "%load_ext handoff_magic")
        t2 = time.perf_counter()
        run_cell(k2, f"%pull {first['run_id']}")
        pull = time.perf_counter() - t2
        ok = value(k2, "[len(a) for a in arrays]")
        if ok != [max(1, size // 8 // 4)] * 4:
            raise RuntimeError(f"pulled namespace is wrong: {ok}")
        return {"size": size, "safe_to_close": safe, "first_remote_step": marks["first_step"] - wall0,
                "checkpoint": ckpt, "checkpoint_new": marks.get("checkpoint_new"), "rehandoff": again,
                "pull": pull, "peak_extra": mem.extra, "sent": first["timings"]["bytes_sent"],
                "sent_again": second["timings"]["bytes_sent"], "timings": first["timings"],
                "timings_again": second["timings"]}
    finally:
        for kern in (k, k2):
            if kern is not None:
                kern.kill()
        http.close()


def export_revision(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], check=True,
                          capture_output=True).stdout
    (dest / "src.tar").write_bytes(data)
    with tarfile.open(dest / "src.tar") as t:
        t.extractall(dest, filter="data")
    (dest / "src.tar").unlink()
    return dest


def warm_memory(nbytes: int, where: Path) -> None:
    """Touch and free ``nbytes`` of memory and write, fsync and delete a file that big on the
    disk the servers use: the first touch of a fresh VM's memory, and the first durable write to
    never-written disk blocks (234 MB/s here, against 1.4 GB/s the second time: `dd
    if=/dev/zero of=F bs=4M count=256 conv=fsync` twice), are several times slower than later
    ones, and whoever comes first would pay them."""
    import numpy as np
    a = np.ones(max(1, nbytes // 8))
    with tempfile.NamedTemporaryFile(prefix="handoff-warm-", dir=where) as f:
        f.write(memoryview(a).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
        f.flush()
        os.fsync(f.fileno())
    del a


def load_avg() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def print_medians(name: str, size: int, rs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("safe_to_close", "first_remote_step", "checkpoint", "rehandoff", "pull", "peak_extra", "sent",
            "sent_again")
    m = {k: statistics.median(float(r[k]) for r in rs) for k in keys}
    print(f"  {name:<16} {fmt_bytes(size):>8} | {m['safe_to_close']:13.3f}s {m['first_remote_step']:11.3f}s "
          f"{m['checkpoint']:10.3f}s {m['rehandoff']:10.3f}s {m['pull']:9.3f}s | "
          f"{fmt_bytes(m['peak_extra']):>9} ({100 * m['peak_extra'] / size:.0f}%) | "
          f"{fmt_bytes(m['sent']):>9} {fmt_bytes(m['sent_again']):>9}", flush=True)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10MB,1GB", help="comma-separated namespace sizes (default 10MB,1GB)")
    p.add_argument("--repeat", type=int, default=3, help="runs per size and variant (medians printed)")
    p.add_argument("--baseline", default=None, help="also run this git revision, alternating with ours")
    p.add_argument("--warm-kernels", type=int, default=1,
                   help="the servers' c.HandoffApp.warm_kernels (default 1, as a server that takes "
                        "runs should set it; 0 measures kernel start-up in every handoff)")
    p.add_argument("--json", help="also write the raw numbers here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    base = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR"):
        (base / name.lower()).mkdir()
        os.environ[name] = str(base / name.lower())
    script = base / "bench-script.json"
    script.write_text(json.dumps(SCRIPT))
    trees = {"ours": ROOT}
    if args.baseline:
        trees[f"base {args.baseline}"] = export_revision(args.baseline, base / "baseline-src")
    variants = [Variant(n, t, base / n.split()[0], script, max(sizes), args.warm_kernels) for n, t in trees.items()]
    results: dict[str, dict[int, list[dict[str, Any]]]] = {v.name: {s: [] for s in sizes} for v in variants}
    try:
        warm_memory(2 * max(sizes), base)
        for v in variants:
            v.start()
        for v in variants:  # untimed: imports, kernel spec, server code paths
            one_round(v, min(sizes), base / f"warmup-{v.name.split()[0]}")
        print(f"load average {load_avg()} on {os.cpu_count()} CPUs; {args.repeat} run(s) per size and variant, "
              f"alternating {' / '.join(trees)}; warm_kernels={args.warm_kernels}", flush=True)
        n = 0
        for size in sizes:
            for rep in range(args.repeat):
                for v in variants:
                    n += 1
                    quiet(variants)
                    r = one_round(v, size, base / f"r{n}")
                    results[v.name][size].append(r)
                    print(f"  [{v.name} {fmt_bytes(size)} run {rep + 1}] safe to close {r['safe_to_close']:.3f}s, "
                          f"first remote step {r['first_remote_step']:.3f}s, checkpoint {r['checkpoint']:.3f}s, "
                          f"re-handoff {r['rehandoff']:.3f}s, pull {r['pull']:.3f}s "
                          f"(capture {r['timings']['capture']:.3f}, upload {r['timings']['upload']:.3f}, "
                          f"create {r['timings']['create']:.3f}); load {load_avg()}", flush=True)
        print(f"\nmedians of {args.repeat}; load average {load_avg()}")
        print(f"  {'variant':<16} {'size':>8} | {'safe to close':>14} {'1st remote':>11} {'checkpoint':>11} "
              f"{'re-handoff':>11} {'pull back':>10} | {'peak extra':>15} | {'sent':>9} {'re-sent':>9}")
        for size in sizes:
            for v in variants:
                print_medians(v.name, size, results[v.name][size])
    finally:
        for v in variants:
            v.cloud.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
