"""Snapshot engine vs dill.dump_session/load_session on three namespaces (issue 2, item 6).

    python benchmarks/capture.py [--scale 0.1] [--out DIR]

For each namespace (numpy-heavy ~1 GB, pandas ~5M rows, 200k small dicts/lists): save here,
load in a fresh process, side by side with dill's session; prints the ratio, bytes written,
our capture GB/s next to np.copyto bandwidth, peak extra RSS during capture, and the bytes a
re-capture writes after one of ten arrays changed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from handoff_magic.capture import save_state  # noqa: E402

GB = 1e9


class PeakRSS:
    """Samples this process's RSS every 2 ms; .extra is the peak above the starting RSS."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def copyto_bandwidth(nbytes: int) -> float:
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault pages in
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / GB


def make_numpy(scale: float) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    n = int(100_000_000 * scale / 8)
    return {f"arr{i}": rng.random(n) for i in range(10)}


def make_pandas(scale: float) -> dict[str, Any]:
    import pandas as pd
    n = int(5_000_000 * scale)
    rng = np.random.default_rng(2)
    df = pd.DataFrame({
        "id": np.arange(n, dtype=np.int64),
        "price": rng.random(n) * 100,
        "qty": rng.integers(0, 1000, n, dtype=np.int32),
        "city": pd.Categorical.from_codes(rng.integers(0, 5, n), ["Paris", "Lyon", "Nice", "Lille", "Metz"]),
        "when": pd.date_range("2020-01-01", periods=n, freq="s", tz="UTC"),
        "label": pd.Series([f"item-{i % 100_000}" for i in range(n)], dtype=object),
    })
    return {"df": df}


def make_small(scale: float) -> dict[str, Any]:
    n = int(200_000 * scale)
    records = [{"id": i, "name": f"user{i}", "score": i * 0.5, "tags": ["a", "b"]} for i in range(n // 2)]
    rows = [[i, f"r{i}", i % 7] for i in range(n // 2)]
    return {"records": records, "rows": rows, "index": {r["id"]: r for r in records[:1000]}}


def ns_bytes(ns: dict[str, Any]) -> int:
    total = 0
    for v in ns.values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif hasattr(v, "memory_usage"):
            total += int(v.memory_usage(deep=True).sum())
        else:
            import pickle
            total += len(pickle.dumps(v, protocol=5))  # rough size of small-object graphs
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


LOAD_OURS = """
import time, sys
import numpy, pandas
from handoff_magic.restore import load_state
ns = {}
t = time.perf_counter()
load_state(sys.argv[1], ns=ns, files=False)
print(time.perf_counter() - t)
"""

LOAD_DILL = """
import time, sys
import numpy, pandas, dill
t = time.perf_counter()
dill.load_session(sys.argv[1])
print(time.perf_counter() - t)
"""


def child(code: str, path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def bench(name: str, make: Callable[[float], dict[str, Any]], scale: float, work: Path,
          results: list[dict[str, Any]]) -> dict[str, Any]:
    import dill
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    ns = make(scale)
    gc.collect()
    # in-memory size: the data's own bytes, or the RSS the namespace added (object graphs)
    size = max(ns_bytes(ns), psutil.Process().memory_info().rss - rss0)
    ours_dir = work / f"{name}-ours"
    with PeakRSS() as mem:
        t = time.perf_counter()
        report = save_state(ours_dir, ns=ns, files=False, environ={})
        ours_save = time.perf_counter() - t
    ours_load = child(LOAD_OURS, ours_dir)
    main = sys.modules["__main__"]
    for k, v in ns.items():
        setattr(main, k, v)
    dill_file = work / f"{name}.dill"
    t = time.perf_counter()
    dill.dump_session(str(dill_file))
    dill_save = time.perf_counter() - t
    for k in ns:
        delattr(main, k)
    dill_load = child(LOAD_DILL, dill_file)
    row = {"namespace": name, "bytes": size, "ours_save": ours_save, "ours_load": ours_load,
           "dill_save": dill_save, "dill_load": dill_load,
           "speedup": (dill_save + dill_load) / (ours_save + ours_load),
           "ours_written": report.bytes_total, "dill_written": dir_bytes(dill_file),
           "capture_gbps": size / ours_save / GB, "peak_extra": mem.extra, "peak_extra_pct": 100 * mem.extra / size,
           "methods": sorted({v.method for v in report.variables})}
    if name == "numpy":
        # change 1 of 10 arrays completely and re-capture into the same bundle
        ns["arr3"] = np.random.default_rng(9).random(ns["arr3"].shape[0])
        t = time.perf_counter()
        again = save_state(ours_dir, ns=ns, files=False, environ={})
        row["recapture_seconds"] = time.perf_counter() - t
        row["recapture_new"] = again.bytes_new
        row["recapture_total"] = again.bytes_total
    results.append(row)
    del ns
    gc.collect()
    shutil.rmtree(ours_dir, ignore_errors=True)
    dill_file.unlink(missing_ok=True)
    return row


def fmt(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="size factor (0.1 = quick run)")
    ap.add_argument("--out", type=Path, default=None, help="scratch dir (default: a temp dir on the same disk)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--only", choices=["numpy", "pandas", "small"], action="append",
                    help="run only these namespaces (repeatable)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="handoff-bench-", dir=args.out))
    results: list[dict[str, Any]] = []
    try:
        bw = copyto_bandwidth(int(512e6 * max(args.scale, 0.05)))
        print(f"scale {args.scale}   np.copyto bandwidth {bw:.1f} GB/s   cpus {os.cpu_count()}")
        print(f"{'namespace':<8} {'size':>11} | {'ours save':>9} {'load':>7} | {'dill save':>9} {'load':>7} | "
              f"{'speedup':>7} | {'ours bytes':>11} {'dill bytes':>11} | {'GB/s':>5} | peak extra")
        for name, make in (("numpy", make_numpy), ("pandas", make_pandas), ("small", make_small)):
            if args.only and name not in args.only:
                continue
            r = bench(name, make, args.scale, work, results)
            print(f"{name:<8} {fmt(r['bytes']):>11} | {r['ours_save']:8.2f}s {r['ours_load']:6.2f}s | "
                  f"{r['dill_save']:8.2f}s {r['dill_load']:6.2f}s | {r['speedup']:6.1f}x | "
                  f"{fmt(r['ours_written']):>11} {fmt(r['dill_written']):>11} | {r['capture_gbps']:5.2f} | "
                  f"{fmt(r['peak_extra'])} ({r['peak_extra_pct']:.0f}%)", flush=True)
        n = next((r for r in results if r["namespace"] == "numpy"), None)
        if n is None:
            return
        print(f"re-capture after replacing 1 of 10 arrays: {fmt(n['recapture_new'])} new of "
              f"{fmt(n['recapture_total'])} ({100 * n['recapture_new'] / n['recapture_total']:.1f}%) "
              f"in {n['recapture_seconds']:.2f}s")
        print(f"numpy capture {n['capture_gbps']:.2f} GB/s vs np.copyto {bw:.1f} GB/s "
              f"({100 * n['capture_gbps'] / bw:.0f}% of memory bandwidth)")
        if args.json:
            args.json.write_text(json.dumps({"copyto_gbps": bw, "results": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
