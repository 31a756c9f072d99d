"""Start-up cost of the run sandbox: kernel start to kernel_info reply, with and without bwrap.

Alternates plain / sandboxed (A B A B) after one warm-up each, through jupyter_client's
AsyncMultiKernelManager as the server uses it; prints each median of ``--rounds`` starts.

    python benchmarks/sandbox_startup.py --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.multikernelmanager import AsyncMultiKernelManager

from jupyter_server_ext.run.sandbox import install_kernelspec


async def start_once(mkm: AsyncMultiKernelManager, name: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    kid = await mkm.start_kernel(kernel_name=name, cwd=str(cwd))
    kc = mkm.get_kernel(kid).client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)  # type: ignore[misc]  # an AsyncKernelClient
        return time.perf_counter() - t0
    finally:
        kc.stop_channels()
        await mkm.shutdown_kernel(kid, now=True)


async def main(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    ws = tmp / "root" / "handoff-runs" / "bench"
    ws.mkdir(parents=True)
    ksm = KernelSpecManager()
    sandboxed = install_kernelspec(ksm, "python3", tmp / "specs", {
        "workspaces": str(tmp / "root" / "handoff-runs"), "hidden": [str(tmp / "root"), str(Path.home())],
        "memory_limit": 8 * 1024**3, "max_processes": 512})
    mkm = AsyncMultiKernelManager(kernel_spec_manager=ksm)
    times: dict[str, list[float]] = {"python3": [], sandboxed: []}
    for name in times:  # warm-up: page cache, bytecode
        await start_once(mkm, name, ws)
    for _ in range(rounds):
        for name in times:
            times[name].append(await start_once(mkm, name, ws))
    for name, ts in times.items():
        label = "sandboxed (bwrap)" if name == sandboxed else "plain"
        print(f"{label:18} median {statistics.median(ts):.3f} s  runs {' '.join(f'{t:.3f}' for t in ts)}")
    cost = statistics.median(times[sandboxed]) - statistics.median(times["python3"])
    print(f"sandbox cost: {cost:+.3f} s per kernel")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(ap.parse_args().rounds))
