"""Load on one server: many concurrent runs, hundreds of long-poll followers, status calls timed.

One real Jupyter Server with the extension (loopback). ``--runs`` runs are handed off at once
(scripted model, small namespaces captured with ``save_state(ns=...)`` and uploaded through
``HandoffClient``); every run takes ``--steps`` steps that each sleep ``--sleep`` s in the kernel
(so the runs overlap instead of queueing behind the CPU). ``--pollers`` async followers long-poll
the runs' events; a separate probe process times status GETs and event GETs while the runs
execute. At the end every follower's event seqs must be exactly 1..N and equal the server's log.

Target (issue 6): p99 < 100 ms for status and event calls while 20 runs execute.

    python benchmarks/load.py                      # 20 runs, 200 pollers
    python benchmarks/load.py --runs 4 --pollers 20 --steps 3
    python benchmarks/load.py --json out.json

Exit status 1 if a run did not complete, an event was lost or duplicated, or the time cap hit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx

from handoff_magic import save_state
from handoff_magic.demo import Cloud
from handoff_magic.remote.http import HandoffClient
from handoff_magic.state import TERMINAL_STATUSES, RunState

API = "/handoff/api"
ACTIVE = ("restoring", "running")
SETTLE_S = 3.0


# -- the runs ------------------------------------------------------------------------------------
def model_script(steps: int, sleep: float) -> list[dict[str, Any]]:
    """Steps that wait (not burn CPU) so runs overlap, touch the restored namespace, then finish."""
    turns = []
    for k in range(steps):
        code = (f"import time as _t\n_t.sleep({sleep})\n"
                f"total_{k} = sum(data) + len(name) + int(arr.sum())\nprint(total_{k})")
        turns.append({"text": f"step {k + 1}", "tool_calls": [{"name": "run_python", "arguments": {"code": code}}]})
    turns.append({"text": "done", "tool_calls": [{"name": "finish", "arguments": {"summary": "load benchmark run"}}]})
    return turns


def make_bundle(base: Path, i: int, script: Path) -> Path:
    """A small namespace and a paused run, captured the way %handoff does (minus the kernel)."""
    import numpy as np
    ns = {"data": list(range(2000)), "name": f"run{i}", "arr": np.arange(1000.0) * i,
          "cfg": {"i": i, "tags": ["load", "bench"]}}
    state = RunState(goal=f"load benchmark run {i}", model=f"scripted:{script}")
    state.budgets.max_steps = 1000
    state.set_status("paused")
    bundle = base / f"bundle-{i}"
    save_state(bundle, ns=ns, run=state, files=False, environ={})
    return bundle


def hand_off(url: str, token: str, bundle: Path) -> tuple[str, float]:
    """Upload only missing chunks, then create the run (idempotency key as %handoff uses)."""
    t = time.perf_counter()
    with HandoffClient(url, token) as client:
        client.upload_bundle(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        summary = client.create_run(manifest, idempotency_key=uuid.uuid4().hex)
    return str(summary["id"]), time.perf_counter() - t


# -- the probe (its own process: the pollers' event loop must not skew its clock) ----------------
def probe_main(url: str, token: str, inbox: Any, ready: Any, interval: float, cap: float, out: Any) -> None:
    """Round-robin over the runs: GET /runs/{id} and GET /runs/{id}/events?timeout=0, timed.

    Started (and imported) before the runs exist; it says ``ready`` and then takes the run ids
    from ``inbox``. Every ~0.5 s also lists runs to know how many are executing at that moment.
    Stops when all runs are finished (or at ``cap``); sends the samples back through ``out``.
    """
    ready.put("probe")
    run_ids: list[str] = inbox.get()
    samples: list[tuple[str, float, float, int]] = []   # (kind, wall time, seconds, runs active)
    active_timeline: list[tuple[float, int]] = []
    seen: dict[str, int] = {r: 0 for r in run_ids}
    deadline = time.monotonic() + cap
    active, next_list, k = len(run_ids), 0.0, 0
    with httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=30) as c:
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_list:
                t = time.perf_counter()
                runs = c.get(f"{API}/runs").json()["runs"]
                samples.append(("list", time.time(), time.perf_counter() - t, active))
                mine = [r for r in runs if r["id"] in seen]
                active = sum(r["status"] in ACTIVE for r in mine)
                active_timeline.append((time.time(), active))
                if all(r["status"] in TERMINAL_STATUSES for r in mine) and len(mine) == len(run_ids):
                    break
                next_list = now + 0.5
            rid = run_ids[k % len(run_ids)]
            k += 1
            t = time.perf_counter()
            r = c.get(f"{API}/runs/{rid}")
            samples.append(("status", time.time(), time.perf_counter() - t, active))
            r.raise_for_status()
            t = time.perf_counter()
            r = c.get(f"{API}/runs/{rid}/events", params={"after": max(0, seen[rid] - 5), "timeout": 0})
            samples.append(("events", time.time(), time.perf_counter() - t, active))
            r.raise_for_status()
            seen[rid] = max(seen[rid], int(r.json()["last_seq"]))
            time.sleep(interval)
    out.put({"samples": samples, "active": active_timeline, "cpu_s": time.process_time()})


# -- the followers -------------------------------------------------------------------------------
@dataclass
class Follower:
    run_id: str
    seqs: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    calls: int = 0
    lags: list[float] = field(default_factory=list)       # event committed -> this follower has it
    call_seconds: list[float] = field(default_factory=list)
    immediate_seconds: list[float] = field(default_factory=list)  # polls answered from the log at once
    done: bool = False
    error: str | None = None


async def follow(client: httpx.AsyncClient, f: Follower, poll_timeout: float, deadline: float,
                 max_calls: int) -> None:
    """Long-poll one run until it is finished and a settle poll (``SETTLE_S``) brings nothing new.

    The settle poll matters: the runner appends a final ``checkpoint`` event after the terminal
    ``status`` event, so a follower that stops at the terminal status misses it (counted apart).
    """
    after, terminal = 0, False
    while f.calls < max_calls and time.monotonic() < deadline:
        t0, w0 = time.perf_counter(), time.time()
        try:
            r = await client.get(f"{API}/runs/{f.run_id}/events",
                                 params={"after": after, "timeout": SETTLE_S if terminal else poll_timeout})
            r.raise_for_status()
            page = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            f.error = f"{type(exc).__name__}: {exc}"
            return
        dt = time.perf_counter() - t0
        f.calls += 1
        f.call_seconds.append(dt)
        now = time.time()
        events = page["events"]
        if events and events[0]["time"] < w0:
            f.immediate_seconds.append(dt)   # news was already there: this is pure API latency
        for ev in events:
            f.seqs.append(int(ev["seq"]))
            f.types.append(str(ev["type"]))
            if ev["time"] >= w0:
                f.lags.append(max(0.0, now - float(ev["time"])))
        after = int(page["last_seq"])
        if terminal and not events:
            f.done = True
            return
        terminal = page["status"] in TERMINAL_STATUSES


async def loop_lag(stop: asyncio.Event, lags: list[float], tick: float = 0.05) -> None:
    """How late this process's event loop wakes up: if it is seconds late, the client (not the
    server) is the bottleneck and the latency figures say nothing about the server."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(tick)
        lags.append(max(0.0, loop.time() - t - tick))


async def run_followers(url: str, token: str, followers: list[Follower], poll_timeout: float,
                        deadline: float, max_calls: int) -> list[float]:
    limits = httpx.Limits(max_connections=len(followers) + 10, max_keepalive_connections=len(followers) + 10)
    lags: list[float] = []
    stop = asyncio.Event()
    monitor = asyncio.create_task(loop_lag(stop, lags))
    # one shared pool per process: a client per follower is worse (each httpx client builds an
    # SSL context, ~10 ms of CPU, and that stalls this loop for seconds at 50 followers)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"token {token}"},
                                 timeout=httpx.Timeout(poll_timeout + 30, connect=30), limits=limits) as c:
        await asyncio.gather(*(follow(c, f, poll_timeout, deadline, max_calls) for f in followers))
    stop.set()
    await monitor
    return lags


def sentinel_main(url: str, token: str, inbox: Any, ready: Any, poll_timeout: float, cap: float,
                  out: Any) -> None:
    """One lone long-poll follower in its own quiet process (sync httpx, one connection): its
    wake-up lag is the server's, without the client-side queueing of 200 pollers in a few processes."""
    ready.put("sentinel")
    run_ids: list[str] = inbox.get()
    lags: list[float] = []
    deadline = time.monotonic() + cap
    with httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=poll_timeout + 30) as c:
        for rid in run_ids[:3]:
            after = 0
            while time.monotonic() < deadline:
                w0 = time.time()
                page = c.get(f"{API}/runs/{rid}/events", params={"after": after, "timeout": poll_timeout}).json()
                now = time.time()
                lags += [max(0.0, now - e["time"]) for e in page["events"] if e["time"] >= w0]
                after = page["last_seq"]
                if page["status"] in TERMINAL_STATUSES:
                    break
    out.put({"sentinel_lags": lags})


def poller_main(url: str, token: str, inbox: Any, ready: Any, poll_timeout: float, cap: float,
                max_calls: int, out: Any) -> None:
    """One follower process (several share the pollers so one client loop does not saturate)."""
    ready.put("poller")
    run_ids: list[str] = inbox.get()
    followers = [Follower(rid) for rid in run_ids]
    cpu0 = time.process_time()
    lags = asyncio.run(run_followers(url, token, followers, poll_timeout, time.monotonic() + cap, max_calls))
    out.put({"followers": [asdict(f) for f in followers], "loop_lag": lags,
             "cpu_s": time.process_time() - cpu0})


# -- checks and report ---------------------------------------------------------------------------
def server_log(client: httpx.Client, run_id: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    while True:
        page = client.get(f"{API}/runs/{run_id}/events",
                          params={"after": out[-1][0] if out else 0, "timeout": 0, "limit": 5000}).json()
        if not page["events"]:
            return out
        out += [(int(e["seq"]), str(e["type"])) for e in page["events"]]


def server_histogram(client: httpx.Client, handler: str) -> list[tuple[float, int]]:
    """Jupyter Server's own ``http_request_duration_seconds`` buckets for one handler (GET 200):
    time inside the server, from the request's headers being read to its response finishing."""
    text = client.get("/metrics").text
    out: dict[float, int] = {}
    for line in text.splitlines():
        if line.startswith("http_request_duration_seconds_bucket{") and f'handler="{handler}"' in line \
                and 'method="GET"' in line and 'status_code="200"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = int(float(line.rsplit(" ", 1)[1]))
    return sorted(out.items())


def hist_pct(buckets: list[tuple[float, int]], q: float) -> float:
    """Upper bound of the bucket holding the q-th percentile."""
    total = buckets[-1][1] if buckets else 0
    for le, n in buckets:
        if total and n >= q / 100 * total:
            return le
    return float("nan")


def hist_line(buckets: list[tuple[float, int]], target_s: float) -> str:
    if not buckets or not buckets[-1][1]:
        return "no samples"
    total = buckets[-1][1]
    under = max((n for le, n in buckets if le <= target_s), default=0)
    return (f"p50 <= {hist_pct(buckets, 50) * 1000:g} ms  p99 <= {hist_pct(buckets, 99) * 1000:g} ms  "
            f"{under / total * 100:.1f}% within {target_s * 1000:g} ms  (n={total})")


def box_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used (from /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)   # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(own CPU s, CPU s of its reaped children) of a live process, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    f = stat.rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tck, (int(f[13]) + int(f[14])) / tck


def print_slow_callbacks(log_path: Path, top: int = 12) -> None:
    """Summarise asyncio's 'Executing <Handle ...> took N seconds' warnings from the server log."""
    import re
    from collections import defaultdict
    total: dict[str, list[float]] = defaultdict(list)
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.search(r"Executing (.*) took (\d+\.\d+) seconds", line)
        if m:
            where = re.sub(r" at 0x[0-9a-f]+| created at .*|name='[^']+' ", "", m.group(1))[:200]
            total[where].append(float(m.group(2)))
    rows = sorted(total.items(), key=lambda kv: -sum(kv[1]))
    print(f"event-loop callbacks over 100 ms in the server: {sum(len(v) for v in total.values())}, "
          f"{sum(sum(v) for v in total.values()):.1f}s in all")
    for where, secs in rows[:top]:
        print(f"  {len(secs):4d} x, {sum(secs):6.2f}s total, max {max(secs) * 1000:6.0f} ms  {where}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"p50 {pct(values, 50) * 1000:6.1f} ms  p99 {pct(values, 99) * 1000:6.1f} ms  "
            f"max {max(values) * 1000:6.1f} ms  (n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="concurrent runs (default 20)")
    p.add_argument("--pollers", type=int, default=200, help="concurrent long-poll followers (default 200)")
    p.add_argument("--steps", type=int, default=6, help="run_python steps per run (default 6)")
    p.add_argument("--sleep", type=float, default=2.0, help="seconds each step waits in its kernel (default 2)")
    p.add_argument("--poller-procs", type=int, default=8,
                   help="processes the pollers are spread over (default 8: one Python process cannot "
                        "drive 200 httpx long-polls on a busy 2-core box without lagging itself)")
    p.add_argument("--poll-timeout", type=float, default=20.0, help="long-poll timeout sent (default 20 s)")
    p.add_argument("--probe-interval", type=float, default=0.02, help="pause between probe rounds (s)")
    p.add_argument("--time-cap", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--target-ms", type=float, default=100.0, help="p99 target for status/event calls")
    p.add_argument("--asyncio-debug", action="store_true",
                   help="run the server with PYTHONASYNCIODEBUG=1 and list what blocked its event loop "
                        "for over 100 ms (slows the server: diagnosis only, not for the figures)")
    p.add_argument("--json", help="also write the raw numbers here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server log, bundles)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.pollers < 1:
        p.error("--runs and --pollers must be at least 1")

    base = Path(tempfile.mkdtemp(prefix="handoff-load-"))
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR"):
        (base / name.lower()).mkdir()
        os.environ[name] = str(base / name.lower())
    script = base / "load-script.json"
    script.write_text(json.dumps(model_script(args.steps, args.sleep)))
    cloud = Cloud(base, extra_args=[f"--HandoffApp.max_concurrent_runs={args.runs}",
                                    f"--HandoffApp.max_events_wait={max(args.poll_timeout, 1.0)}"])
    if args.asyncio_debug:
        cloud.extra_env["PYTHONASYNCIODEBUG"] = "1"
    ok = True
    wall0 = time.perf_counter()
    try:
        t = time.perf_counter()
        cloud.start()
        print(f"server ready in {time.perf_counter() - t:.2f}s at {cloud.url} "
              f"({args.runs} runs x {args.steps} steps of {args.sleep:g}s sleep, {args.pollers} pollers)", flush=True)

        # the probe and the poller processes start (and import) first, then wait for run ids
        ctx = mp.get_context("spawn")
        out, pout, ready = ctx.Queue(), ctx.Queue(), ctx.Queue()
        max_calls = int(args.time_cap * 50) + 100   # bounded even if the server answered instantly forever
        procs = max(1, min(args.poller_procs, args.pollers))
        inboxes = [ctx.Queue() for _ in range(procs + 2)]
        probe = ctx.Process(target=probe_main, daemon=True, args=(
            cloud.url, cloud.token, inboxes[-1], ready, args.probe_interval, args.time_cap, out))
        pollers = [ctx.Process(target=poller_main, daemon=True, args=(
            cloud.url, cloud.token, inboxes[k], ready, args.poll_timeout, args.time_cap, max_calls, pout))
            for k in range(procs)]
        sentinel = ctx.Process(target=sentinel_main, daemon=True, args=(
            cloud.url, cloud.token, inboxes[-2], ready, args.poll_timeout, args.time_cap, pout))
        for pr in [probe, sentinel, *pollers]:
            pr.start()
        for _ in range(procs + 2):
            ready.get(timeout=120)

        assert cloud.proc is not None  # started above
        busy0, server0, self0 = box_busy_seconds(), process_cpu(cloud.proc.pid), time.process_time()
        t = time.perf_counter()
        bundles = [make_bundle(base, i, script) for i in range(args.runs)]
        capture_s = time.perf_counter() - t
        t_create0 = time.time()
        with ThreadPoolExecutor(max_workers=min(args.runs, 20)) as pool:
            created = list(pool.map(lambda b: hand_off(cloud.url, cloud.token, b), bundles))
        run_ids = [rid for rid, _ in created]
        create_s = [s for _, s in created]
        print(f"captured {args.runs} bundles in {capture_s:.2f}s; handed off concurrently in "
              f"{time.time() - t_create0:.2f}s (upload+create per run: {ms(create_s)})", flush=True)

        targets = [run_ids[i % len(run_ids)] for i in range(args.pollers)]
        for k in range(procs):
            inboxes[k].put(targets[k::procs])
        inboxes[-1].put(run_ids)
        inboxes[-2].put(run_ids)
        results = [pout.get(timeout=args.time_cap + 120) for _ in range(procs + 1)]
        sentinel_lags = next(r["sentinel_lags"] for r in results if "sentinel_lags" in r)
        results = [r for r in results if "followers" in r]
        for pr in [sentinel, *pollers]:
            pr.join(30)
        followers = [Follower(**d) for r in results for d in r["followers"]]
        client_lag = [x for r in results for x in r["loop_lag"]]
        client_cpu = sum(r["cpu_s"] for r in results)
        probe_data = out.get(timeout=args.time_cap + 60)
        probe.join(30)
        server1, busy1 = process_cpu(cloud.proc.pid), box_busy_seconds()
        t_end = time.time()

        with httpx.Client(base_url=cloud.url, headers={"Authorization": f"token {cloud.token}"}, timeout=60) as c:
            status_hist = server_histogram(c, "jupyter_server_ext.handlers.RunHandler")
            summaries = {rid: c.get(f"{API}/runs/{rid}").json() for rid in run_ids}
            logs = {rid: server_log(c, rid) for rid in run_ids}
        wall = time.perf_counter() - wall0

        # -- correctness --------------------------------------------------------------------
        problems: list[str] = []
        completed = [rid for rid, s in summaries.items() if s["status"] == "completed"]
        for rid, s in summaries.items():
            if s["status"] != "completed":
                problems.append(f"run {rid} ended {s['status']}: {s.get('error')}")
        for rid, log in logs.items():
            if [q for q, _ in log] != list(range(1, len(log) + 1)):
                problems.append(f"server log of {rid} is not 1..{len(log)}")
        lost = dup = 0
        for f in followers:
            want = logs[f.run_id]
            if f.error or not f.done:
                problems.append(f"follower of {f.run_id} did not finish: {f.error or 'time cap'}")
            if f.seqs != list(range(1, len(f.seqs) + 1)) or list(zip(f.seqs, f.types)) != want:
                lost += len(set(q for q, _ in want) - set(f.seqs))
                dup += len(f.seqs) - len(set(f.seqs))
                problems.append(f"follower of {f.run_id} saw seqs {f.seqs[:5]}..{f.seqs[-5:]} "
                                f"({len(f.seqs)}), server has 1..{len(want)}")

        # -- figures ------------------------------------------------------------------------
        samples = probe_data["samples"]
        peak = max((n for _, n in probe_data["active"]), default=0)
        busy = max(1, int(0.5 * args.runs))  # "while the runs execute": at least half of them running
        status_busy = [s for k, _, s, n in samples if k == "status" and n >= busy]
        events_busy = [s for k, _, s, n in samples if k == "events" and n >= busy]
        status_all = [s for k, _, s, _ in samples if k == "status"]
        events_all = [s for k, _, s, _ in samples if k == "events"]
        lags = [x for f in followers for x in f.lags]
        immediate = [x for f in followers for x in f.immediate_seconds]
        with httpx.Client(base_url=cloud.url, headers={"Authorization": f"token {cloud.token}"}, timeout=60) as c:
            done_times: list[float] = []
            after_terminal = 0   # events a follower that stops at the terminal status would miss
            for rid in completed:
                evs = c.get(f"{API}/runs/{rid}/events", params={"after": 0, "timeout": 0, "limit": 5000}).json()
                ends = [i for i, e in enumerate(evs["events"])
                        if e["type"] == "status" and e["data"].get("status") == "completed"]
                done_times += [evs["events"][i]["time"] for i in ends]
                after_terminal += len(evs["events"]) - 1 - ends[-1] if ends else 0
        span = (max(done_times) - t_create0) if done_times else float("nan")
        per_min = len(completed) / span * 60 if done_times else 0.0
        p99_status = pct(status_busy or status_all, 99)
        p99_events = pct(events_busy or events_all, 99)
        meets = p99_status * 1000 < args.target_ms and p99_events * 1000 < args.target_ms

        print(f"runs: {len(completed)}/{args.runs} completed; peak {peak} executing at once; "
              f"first handoff -> last completion {span:.1f}s = {per_min:.1f} runs/min")
        print(f"events: {sum(len(v) for v in logs.values())} in the server logs; {args.pollers} followers "
              f"received {sum(len(f.seqs) for f in followers)} in {sum(f.calls for f in followers)} long-polls; "
              f"lost {lost}, duplicated {dup}")
        if after_terminal:
            print(f"note: {after_terminal} event(s) came after a run's terminal status (the final checkpoint); "
                  f"followers here settle {SETTLE_S:g}s to get them, RemoteRun.follow() stops at the status")
        print(f"status  GET /runs/{{id}} while >= {busy} runs execute:          {ms(status_busy)}")
        print(f"events  GET /runs/{{id}}/events?timeout=0 while >= {busy} execute: {ms(events_busy)}")
        print(f"status  GET inside the server (its own histogram):      "
              f"{hist_line(status_hist, args.target_ms / 1000)}")
        print(f"status  GET (whole benchmark):                           {ms(status_all)}")
        print(f"events  GET (whole benchmark):                           {ms(events_all)}")
        print(f"long-poll answered from the log at once ({args.pollers} pollers): {ms(immediate)}")
        print(f"long-poll wake-up: event committed -> follower has it:    {ms(lags)}")
        print(f"long-poll wake-up, one lone follower in a quiet process: {ms(sentinel_lags)}")
        print(f"follower processes' event-loop lag (client saturation):  {ms(client_lag)}; "
              f"client CPU {client_cpu:.1f}s")
        print(f"target p99 < {args.target_ms:g} ms for status and event calls: "
              f"{'MET' if meets else 'MISSED'} (status {p99_status * 1000:.1f} ms, events {p99_events * 1000:.1f} ms)")
        print(f"wall time {wall:.1f}s (load average now: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs)")
        # where the CPU went between the first capture and the last follower finishing
        span_cpu = t_end - t_create0
        server_cpu, kernels_cpu = server1[0] - server0[0], server1[1] - server0[1]
        clients_cpu = client_cpu + probe_data.get("cpu_s", 0.0) + (time.process_time() - self0)
        others = max(0.0, (busy1 - busy0) - server_cpu - kernels_cpu - clients_cpu)
        print(f"CPU over those {span_cpu:.1f}s ({os.cpu_count()} CPUs = {span_cpu * (os.cpu_count() or 1):.0f} "
              f"CPU-s): server {server_cpu:.1f}s, its kernels {kernels_cpu:.1f}s, benchmark clients "
              f"{clients_cpu:.1f}s, everything else on the machine {others:.1f}s")
        if args.asyncio_debug:
            print_slow_callbacks(cloud.log_path)
        if problems:
            ok = False
            print(f"PROBLEMS ({len(problems)}):")
            for line in problems[:20]:
                print("  " + line)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "runs": args.runs, "pollers": args.pollers, "steps": args.steps, "sleep": args.sleep,
                "completed": len(completed), "peak_executing": peak, "runs_per_minute": per_min,
                "wall_s": wall, "lost": lost, "duplicated": dup, "problems": problems,
                "status_ms": {"p50": pct(status_busy, 50) * 1000, "p99": pct(status_busy, 99) * 1000},
                "events_ms": {"p50": pct(events_busy, 50) * 1000, "p99": pct(events_busy, 99) * 1000},
                "wakeup_ms": {"p50": pct(lags, 50) * 1000, "p99": pct(lags, 99) * 1000},
                "target_met": meets}, indent=1))
    finally:
        cloud.stop()
        if args.keep:
            print(f"kept {base} (server log: {cloud.log_path})")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
