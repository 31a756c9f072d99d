"""Snapshot engine vs ``dill.dump_session``/``load_session``, measured fairly (issue 15).

    python benchmarks/capture.py                      # full scale, 3 runs each, medians
    python benchmarks/capture.py --scale 0.05 --repeat 1      # quick
    python benchmarks/capture.py --baseline 862efb9   # also this tree's save_state at that commit

Namespaces: ``numpy`` (10 float64 arrays, 400 MB at scale 1), ``pandas`` (5M rows: numbers,
dates, categories, repetitive text) and ``small`` (200k small dicts/lists: object-heavy).

Why it is fair:
- every save and every load runs in a fresh child process, and the variants alternate
  (ours, dill[, baseline], ours, dill, ...), so neither side always gets the cold machine;
- each save child first does one untimed warm-up save and deletes it, so the page cache and the
  allocator are warm for both sides alike; each timed save is of a namespace built afresh, so
  it is a first save (our change tracking only helps the re-captures, reported apart);
- two figures per save: "page cache" (fsync turned into a no-op, which is what dill does
  anyway) and "durable" (ours as shipped, with fsync; dill followed by an fsync of its file),
  and the speedup compares like with like;
- medians of ``--repeat`` runs; the load average is printed next to the figures.

Also printed: bytes written, peak extra RSS during the durable save, and for ``numpy`` the
re-capture into the same bundle after replacing 1 of the 10 arrays and after changing one
element (time, bytes new).
"""
from __future__ import annotations

import argparse
import gc
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


# -- namespaces (built identically in every child) -----------------------------------------
def make_numpy(scale: float) -> dict[str, Any]:
    import numpy as np
    rng = np.random.default_rng(1)
    n = max(1, int(40_000_000 * scale / 8))
    return {f"arr{i}": rng.random(n) for i in range(10)}


def make_pandas(scale: float) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    n = max(10, int(5_000_000 * scale))
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
    n = max(10, int(200_000 * scale))
    records = [{"id": i, "name": f"user{i}", "score": i * 0.5, "tags": ["a", "b"]} for i in range(n // 2)]
    rows = [[i, f"r{i}", i % 7] for i in range(n // 2)]
    return {"records": records, "rows": rows, "index": {r["id"]: r for r in records[:1000]}}


MAKERS: dict[str, Callable[[float], dict[str, Any]]] = {"numpy": make_numpy, "pandas": make_pandas,
                                                        "small": make_small}


def ns_bytes(ns: dict[str, Any]) -> int:
    import pickle

    import numpy as np
    total = 0
    for v in ns.values():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif hasattr(v, "memory_usage"):
            total += int(v.memory_usage(deep=True).sum())
        else:
            total += len(pickle.dumps(v, protocol=5))  # rough size of small-object graphs
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class PeakRSS:
    """Samples this process's RSS every 2 ms; ``extra`` is the peak above the starting RSS."""

    def __init__(self) -> None:
        import psutil
        self.proc = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_fsync() -> Callable[[], None]:
    """Turn os.fsync into a no-op (the "page cache" figure); returns the undo."""
    real = os.fsync
    os.fsync = lambda fd: None

    def undo() -> None:
        os.fsync = real
    return undo


# -- children ------------------------------------------------------------------------------
def child_save(variant: str, ns_name: str, scale: float, work: Path) -> dict[str, Any]:
    """Untimed warm-up save, then a page-cache save and a durable save, each of a namespace built
    afresh (new arrays, new memory): every timed save is a first save, nothing carried over from
    the one before but the warm page cache and allocator."""
    main = sys.modules["__main__"]
    if variant == "dill":
        import dill

        def save(ns: dict[str, Any], path: Path, durable: bool) -> None:
            for k, v in ns.items():
                setattr(main, k, v)
            dill.dump_session(str(path))
            for k in ns:
                delattr(main, k)
            if durable:
                _fsync_path(path)
                _fsync_path(path.parent)
    else:
        from handoff_magic import save_state

        def save(ns: dict[str, Any], path: Path, durable: bool) -> None:
            save_state(path, ns=ns, files=False, environ={})

    def fresh() -> dict[str, Any]:
        gc.collect()
        ns = MAKERS[ns_name](scale)
        gc.collect()
        return ns

    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()

    out: dict[str, Any] = {}
    warm, cache, durable = work / "warm", work / "cache", work / "durable"
    ns = fresh()
    out["bytes"] = ns_bytes(ns)
    undo = _no_fsync()
    try:
        save(ns, warm, False)
    finally:
        undo()
    remove(warm)
    del ns
    ns = fresh()
    undo = _no_fsync()
    try:
        t = time.perf_counter()
        save(ns, cache, False)
        out["save_cache"] = time.perf_counter() - t
    finally:
        undo()
    remove(cache)
    del ns
    ns = fresh()
    with PeakRSS() as mem:
        t = time.perf_counter()
        save(ns, durable, True)
        out["save_durable"] = time.perf_counter() - t
    out["peak_extra"] = mem.extra
    out["written"] = dir_bytes(durable)
    if ns_name == "numpy" and variant != "dill":
        import numpy as np
        from handoff_magic import save_state
        ns["arr3"] = np.random.default_rng(9).random(ns["arr3"].shape[0])
        t = time.perf_counter()
        again = save_state(durable, ns=ns, files=False, environ={})
        out["recapture_seconds"] = time.perf_counter() - t
        out["recapture_new"], out["recapture_total"] = again.bytes_new, again.bytes_total
        ns["arr5"][12345 % ns["arr5"].size] += 1.0
        t = time.perf_counter()
        again = save_state(durable, ns=ns, files=False, environ={})
        out["small_change_seconds"] = time.perf_counter() - t
        out["small_change_new"] = again.bytes_new
    return out


def child_load(variant: str, path: Path) -> dict[str, Any]:
    import numpy  # noqa: F401 - imported before the clock starts, for both sides
    import pandas  # noqa: F401
    if variant == "dill":
        import dill
        t = time.perf_counter()
        dill.load_session(str(path))
        return {"load": time.perf_counter() - t}
    import importlib
    try:   # the restore code is imported before the clock, as dill is
        importlib.import_module("handoff_magic.snapshot.restore")
    except ImportError:   # a baseline revision from before the snapshot/ package
        importlib.import_module("handoff_magic.restore")
    from handoff_magic import load_state
    ns: dict[str, Any] = {}
    t = time.perf_counter()
    load_state(path, ns=ns, files=False)
    return {"load": time.perf_counter() - t}


def run_child(args: list[str], pythonpath: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    env.pop("PYTHONDONTWRITEBYTECODE", None)   # as installed: modules are compiled once, not per process
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                          capture_output=True, text=True, env=env, cwd=str(pythonpath))
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def export_revision(rev: str, dest: Path) -> Path:
    """``git archive`` of ``rev`` into ``dest`` (read-only use of the repository)."""
    dest.mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], check=True,
                          capture_output=True).stdout
    tar = dest / "src.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    tar.unlink()
    return dest


def load_avg() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def fmt(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="size factor (0.05 = quick run)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant (medians reported)")
    ap.add_argument("--baseline", default=None, help="also measure save_state/load_state at this git revision")
    ap.add_argument("--out", type=Path, default=None, help="scratch dir (default: a temp dir on the same disk)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--only", choices=list(MAKERS), action="append", help="only these namespaces (repeatable)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, variant, *rest = args.child
        res = child_save(variant, rest[0], float(rest[1]), Path(rest[2])) if kind == "save" else \
            child_load(variant, Path(rest[0]))
        print(json.dumps(res))
        return

    work = Path(tempfile.mkdtemp(prefix="handoff-bench-", dir=args.out))
    variants: dict[str, Path] = {"ours": ROOT, "dill": ROOT}
    if args.baseline:
        variants[f"base {args.baseline}"] = export_revision(args.baseline, work / "baseline")
    results: list[dict[str, Any]] = []
    try:
        print(f"scale {args.scale}, {args.repeat} run(s) per variant, alternating {' / '.join(variants)}; "
              f"cpus {os.cpu_count()}; load average {load_avg()}")
        for ns_name in MAKERS:
            if args.only and ns_name not in args.only:
                continue
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for rep in range(args.repeat):
                for variant, tree in variants.items():
                    d = work / f"{ns_name}-{rep}-{variant.split()[0]}"
                    d.mkdir()
                    kind = "dill" if variant == "dill" else "ours"
                    r = run_child(["save", kind, ns_name, str(args.scale), str(d)], tree)
                    target = d / "durable"
                    r.update(run_child(["load", kind, str(target)], tree))
                    runs[variant].append(r)
                    shutil.rmtree(d, ignore_errors=True)
            print(f"\n{ns_name}: {fmt(runs['ours'][0]['bytes'])} in memory; medians of {args.repeat}; "
                  f"load average {load_avg()}")
            print(f"  {'variant':<16} | {'save: page cache':>16} {'durable':>8} | {'load':>6} | "
                  f"{'save+load: cache':>16} {'durable':>8} | {'vs dill: cache':>14} {'durable':>8} | "
                  f"{'written':>10} | peak extra")
            med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
                   for v, rs in runs.items()}
            dill_c = med["dill"]["save_cache"] + med["dill"]["load"]
            dill_d = med["dill"]["save_durable"] + med["dill"]["load"]
            for variant, m in med.items():
                tot_c, tot_d = m["save_cache"] + m["load"], m["save_durable"] + m["load"]
                print(f"  {variant:<16} | {m['save_cache']:15.3f}s {m['save_durable']:7.3f}s | {m['load']:5.3f}s | "
                      f"{tot_c:15.3f}s {tot_d:7.3f}s | {dill_c / tot_c:13.1f}x {dill_d / tot_d:7.1f}x | "
                      f"{fmt(m['written']):>10} | {fmt(m['peak_extra'])} ({100 * m['peak_extra'] / m['bytes']:.0f}%)")
                row = dict(m, namespace=ns_name, variant=variant, speedup_cache=dill_c / tot_c,
                           speedup_durable=dill_d / tot_d)
                results.append(row)
            for variant, m in med.items():
                if "recapture_new" in m:
                    print(f"  {variant}: re-capture after replacing 1 of 10 arrays: {fmt(m['recapture_new'])} new "
                          f"of {fmt(m['recapture_total'])} ({100 * m['recapture_new'] / m['recapture_total']:.1f}%) "
                          f"in {m['recapture_seconds']:.3f}s; after changing one element: "
                          f"{fmt(m['small_change_new'])} new in {m['small_change_seconds']:.3f}s")
            sys.stdout.flush()
        if args.json:
            ours = [dict(r) for r in results if r["variant"] == "ours"]
            args.json.write_text(json.dumps({"results": ours, "all": results}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
