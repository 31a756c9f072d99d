"""How fast one real server takes chunk uploads, and whose CPU it costs (issue 15).

A Jupyter Server subprocess with the extension; a few client threads PUT ``--chunks`` random
chunks of ``--chunk-mb`` MiB each through ``HandoffClient.put_blob`` (the upload path a handoff
uses). Per round it prints the wall time, MiB/s, and the user and system CPU seconds of the
server and of this client. Rounds are repeated because on a VM the system time of page-cache
writes changes from round to round: compare rounds, not single figures.

    python benchmarks/ingest.py                        # 1 GiB in 4 MiB chunks, 3 rounds
    python benchmarks/ingest.py --chunk-mb 1 --chunks 1024   # per-request overhead shows
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil

from handoff_magic.chunks import address_of
from handoff_magic.demo import Cloud
from handoff_magic.remote.http import HandoffClient


def upload_round(client: HandoffClient, blobs: list[bytes], threads: int) -> float:
    """PUT every blob from ``threads`` threads; returns the wall time."""
    todo = iter([(address_of(b), b) for b in blobs])
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            try:
                client.put_blob(*item)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                return

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=256)
    p.add_argument("--chunk-mb", type=int, default=4)
    p.add_argument("--threads", type=int, default=3, help="concurrent uploads (a handoff uses 3)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="handoff-ingest-"))
    cloud = Cloud(base, env={"PYTHONPATH": str(ROOT)})
    try:
        cloud.start()
        assert cloud.proc is not None
        server, me = psutil.Process(cloud.proc.pid), psutil.Process()
        with HandoffClient(cloud.url, cloud.token) as client:
            for rnd in range(args.rounds):
                blobs = [os.urandom(args.chunk_mb << 20) for _ in range(args.chunks)]  # new: no dedup
                s0, c0 = server.cpu_times(), me.cpu_times()
                wall = upload_round(client, blobs, args.threads)
                s1, c1 = server.cpu_times(), me.cpu_times()
                mib = args.chunks * args.chunk_mb
                print(f"round {rnd}: {mib} MiB in {args.chunks} PUTs, {wall:.2f}s = {mib / wall:.0f} MiB/s; "
                      f"server user {s1.user - s0.user:.2f}s sys {s1.system - s0.system:.2f}s; "
                      f"client user {c1.user - c0.user:.2f}s sys {c1.system - c0.system:.2f}s", flush=True)
    finally:
        cloud.stop()
        shutil.rmtree(base, ignore_errors=True)   # a round leaves its GiB of blobs behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
