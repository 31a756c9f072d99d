"""How long %handoff takes, end to end, on this machine.

For each namespace size: time from ``%handoff`` to the prompt coming back (pause, capture,
upload, create) and to the first remote step (server restoring: kernel start + bundle transfer,
restore inside the kernel), with a real Jupyter Server subprocess (the extension) and a real
local kernel. Then a second ``%handoff --fork`` after changing one small variable: bytes sent vs
the first. Targets (issue 5): prompt back < 1 s for 10 MB; first remote step < 1.5 s; second
handoff < 5% of the first's bytes.

    python benchmarks/handoff.py                 # 10 MB and 1 GB
    python benchmarks/handoff.py --sizes 10MB,100MB
    python benchmarks/handoff.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handoff_magic.client import HandoffClient  # noqa: E402
from handoff_magic.demo import Cloud, Kernel, output_text  # noqa: E402

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
    {"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "benchmark run"}}]},
]


def namespace_code(size: int, seed: int) -> str:
    """About ``size`` bytes of realistic data: a DataFrame (half) and a float array (half),
    random so compression does not flatter the numbers, plus a few small objects."""
    rows = max(1, size // 2 // 8 // 4)
    return f"""
import numpy as np, pandas as pd
_rng = np.random.default_rng({seed})  # new data each run: the server dedups chunks it has
df = pd.DataFrame(_rng.random(({rows}, 4)), columns=list("abcd"))
arr = _rng.random({max(1, size // 2 // 8)})
small = {{"name": "bench", "k": 1}}
notes = "x" * 1000
"""


def laptop_kernel(cloud: Cloud, workdir: Path, script: Path) -> Kernel:
    env = dict(os.environ)
    env.update({"HANDOFF_SERVER_URL": cloud.url, "HANDOFF_TOKEN": cloud.token,
                "HANDOFF_MODEL": f"scripted:{script}", "HANDOFF_CACHE_DIR": str(workdir.parent / "cache"),
                "MPLBACKEND": "Agg"})
    workdir.mkdir(parents=True, exist_ok=True)
    return Kernel(workdir, env, log=workdir.parent / "kernel.log")


def run_cell(k: Kernel, code: str, timeout: float = 3600) -> str:
    status, outputs = k.run(code, timeout=timeout)
    text = output_text(outputs)
    if status != "ok":
        raise RuntimeError(f"{code!r} failed:\n{text}")
    return text


def value(k: Kernel, expr: str) -> Any:
    out = run_cell(k, f"import json as _j\nprint('@@' + _j.dumps({expr}))")
    return json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("@@"))[2:])


def remote_breakdown(client: HandoffClient, run_id: str, wall0: float, timeout: float = 3600) -> dict[str, Any]:
    """Follow the remote run to its first step after the handoff; derive the phases from events."""
    after, deadline = 0, time.monotonic() + timeout
    restoring = restore = first_step = None
    report: dict[str, Any] = {}
    while time.monotonic() < deadline and first_step is None:
        page = client.events(run_id, after=after, timeout=10)
        for ev in page["events"]:
            t = float(ev["time"])
            if t < wall0:
                continue  # the local part of the run's history
            if ev["type"] == "status" and ev["data"].get("status") == "restoring" and restoring is None:
                restoring = t
            elif ev["type"] == "restore" and restore is None:
                restore, report = t, ev["data"].get("report") or {}
            elif ev["type"] == "tool_result" and first_step is None:
                first_step = t
        after = page["last_seq"]
        if page["status"] in ("failed", "cancelled") and first_step is None:
            raise RuntimeError(f"remote run {run_id} {page['status']}: {client.get_run(run_id).get('error')}")
    if first_step is None:
        raise RuntimeError(f"remote run {run_id} took no step within {timeout:.0f}s")
    restore_in_kernel = float(report.get("seconds") or 0.0)
    out = {"first_remote_step": first_step - wall0, "restore_in_kernel": restore_in_kernel}
    if restoring is not None and restore is not None:
        out["queue"] = restoring - wall0
        out["kernel_start_and_transfer"] = max(0.0, (restore - restoring) - restore_in_kernel)
        out["after_restore_to_step"] = first_step - restore
    return out


def bench_size(size: int, base: Path, script: Path, cloud: Cloud) -> dict[str, Any]:
    client = HandoffClient(cloud.url, cloud.token)
    k = laptop_kernel(cloud, base / f"laptop-{size}", script)
    try:
        t = time.perf_counter()
        run_cell(k, namespace_code(size, time.time_ns()))
        build = time.perf_counter() - t
        run_cell(k, "%load_ext handoff_magic")
        run_cell(k, "%agent --max-steps 1 benchmark")

        wall0, t0 = time.time(), time.perf_counter()
        run_cell(k, "%handoff --fork")
        prompt_back = time.perf_counter() - t0
        first = value(k, "__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()")
        remote = remote_breakdown(client, first["run_id"], wall0)

        run_cell(k, f"small['k'] = {time.time_ns()}")  # a value no earlier run uploaded
        t1 = time.perf_counter()
        run_cell(k, "%handoff --fork")
        second_prompt = time.perf_counter() - t1
        second = value(k, "__import__('handoff_magic.remote', fromlist=['x']).last_handoff_info()")
        try:  # the second run only measures bytes: do not let it restore a big namespace for nothing
            client.cancel(second["run_id"])
        except Exception as exc:  # it may already have finished; that is fine for a benchmark
            print(f"  (could not cancel {second['run_id']}: {exc})", file=sys.stderr)
        return {"size": size, "build_namespace_s": build, "prompt_back_s": prompt_back,
                "first": first["timings"], "remote": remote, "second_prompt_back_s": second_prompt,
                "second": second["timings"]}
    finally:
        k.kill()
        client.close()


def report(r: dict[str, Any]) -> str:
    f, s, rem = r["first"], r["second"], r["remote"]
    ratio = s["bytes_sent"] / f["bytes_sent"] if f["bytes_sent"] else 0.0
    lines = [
        f"namespace {fmt_bytes(r['size'])} (built in {r['build_namespace_s']:.1f}s)",
        f"  %handoff -> prompt back   {r['prompt_back_s']:7.3f} s   "
        f"(client+pause {f['pause']:.3f}, capture {f['capture']:.3f}, upload {f['upload']:.3f}, create {f['create']:.3f}; "
        f"kernel/magic overhead {r['prompt_back_s'] - f['total']:.3f})",
        f"  %handoff -> first remote step {rem['first_remote_step']:7.3f} s   "
        + (f"(until restoring {rem.get('queue', 0):.3f}, kernel start + bundle transfer {rem.get('kernel_start_and_transfer', 0):.3f}, "
           f"restore {rem['restore_in_kernel']:.3f}, restore -> step {rem.get('after_restore_to_step', 0):.3f})"),
        f"  first handoff sent        {fmt_bytes(f['bytes_sent'])} in {f['chunks_sent']} chunks "
        f"(bundle {fmt_bytes(f['bytes_total'])})",
        f"  second handoff (one small variable changed): sent {fmt_bytes(s['bytes_sent'])} in {s['chunks_sent']} "
        f"chunks = {ratio * 100:.2f}% of the first; prompt back {r['second_prompt_back_s']:.3f} s "
        f"(capture {s['capture']:.3f}, upload {s['upload']:.3f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10MB,1GB", help="comma-separated namespace sizes (default 10MB,1GB)")
    p.add_argument("--json", help="also write the raw numbers here")
    p.add_argument("--repeat", type=int, default=3, help="runs per size up to 100 MB (median reported)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    base = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR"):
        (base / name.lower()).mkdir()
        os.environ[name] = str(base / name.lower())
    script = base / "bench-script.json"
    script.write_text(json.dumps(SCRIPT))
    cloud = Cloud(base, extra_args=["--HandoffApp.max_bundle_bytes=" + str(4 * max(sizes) + 2**30)])
    results = []
    try:
        t = time.perf_counter()
        cloud.start()
        print(f"server ready in {time.perf_counter() - t:.2f}s at {cloud.url}")
        for size in sizes:
            reps = args.repeat if size <= 100 * UNITS["MB"] else 1
            mine = []
            for i in range(reps):
                r = bench_size(size, base / f"rep{i}", script, cloud)
                mine.append(r)
                print(report(r), flush=True)
            results.extend(mine)
            if reps > 1:
                pb = statistics.median(r["prompt_back_s"] for r in mine)
                fs = statistics.median(r["remote"]["first_remote_step"] for r in mine)
                print(f"  median of {reps} for {fmt_bytes(size)}: prompt back {pb:.3f} s, "
                      f"first remote step {fs:.3f} s", flush=True)
        print(f"(load average now: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")
    finally:
        cloud.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
