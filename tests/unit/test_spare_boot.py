"""A spare kernel's boot (about a CPU-second) waits for the server's chunk transfers to pause, so
a pull back's downloads do not share the CPU with it; a run that wants the spare starts it at once."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_server_ext.blobs import BlobStore
from jupyter_server_ext.run import kernels
from jupyter_server_ext.run.kernels import KernelPool
from jupyter_server_ext.settings import HandoffSettings
from jupyter_server_ext.workspace import Workspace


def pool(tmp_path: Path, idle: Any) -> KernelPool:
    async def in_thread(fn: Any) -> Any:
        return fn()
    return KernelPool(HandoffSettings(warm_kernels=1), None, Workspace(tmp_path), in_thread=in_thread,
                      transfers_idle=idle)


def test_chunk_traffic_is_what_the_blob_store_saw_last(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    assert blobs.idle_for() > 60   # nothing moved yet
    blobs.moved()
    assert blobs.idle_for() < 1


def test_the_boot_waits_while_chunks_move_and_starts_once_they_pause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "BOOT_QUIET", 0.2)
    busy_until = time.monotonic() + 0.6   # a pull back downloading for 0.6 s more

    def idle() -> float:
        now = time.monotonic()
        return now - min(now, busy_until)

    async def go() -> float:
        t0 = time.monotonic()
        await pool(tmp_path, idle)._until_transfers_pause()
        return time.monotonic() - t0
    waited = asyncio.run(go())
    assert 0.6 + 0.2 - 0.05 <= waited < 3.0


def test_a_quiet_server_boots_at_once_and_a_run_that_wants_the_spare_does_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def quiet() -> float:
        t0 = time.monotonic()
        await pool(tmp_path, lambda: 100.0)._until_transfers_pause()
        return time.monotonic() - t0
    assert asyncio.run(quiet()) < 0.1

    monkeypatch.setattr(kernels, "BOOT_DEFER_MAX", 20.0)

    async def wanted() -> float:
        p = pool(tmp_path, lambda: 0.0)   # chunks move all the time
        t0 = time.monotonic()
        boot = asyncio.ensure_future(p._until_transfers_pause())
        await asyncio.sleep(0.2)
        assert not boot.done()
        assert p._wanted is not None
        p._wanted.set()                   # what _adopt does when a run takes the spare
        await asyncio.wait_for(boot, 2)
        return time.monotonic() - t0
    assert asyncio.run(wanted()) < 1.5
