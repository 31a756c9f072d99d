"""A run's bundles on the server: the handoff bundle checked and materialised, checkpoints taken
in the kernel and ingested by hash, which checkpoints are kept, and blob garbage collection.

Retention lives here and only here (``keep_for``): an unfinished run keeps its newest
``c.HandoffApp.keep_checkpoints`` checkpoint manifests, a finished run its last one, the handoff
manifest always; chunks only dropped manifests named are then collected (``gc_blobs``, also
``python -m jupyter_server_ext.run.checkpoints gc --data-dir DIR``).

The server never unpickles: it moves stored chunk bytes and reads JSON manifests.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handoff_magic.errors import BundleError
from handoff_magic.manifest import Manifest
from handoff_magic.state import TERMINAL_STATUSES, RunState

from ..blobs import BlobStore
from ..errors import RunFailure
from ..settings import HandoffSettings
from ..store import RunStore
from ..workspace import Workspace, remove_tree
from .executor import KernelExecutor
from .transport import BundleTransport

log = logging.getLogger(__name__)

DEFAULT_KEEP = HandoffSettings.keep_checkpoints.default_value


def keep_for(finished: bool, keep: int) -> int:
    """How many checkpoint manifests a run keeps."""
    return 1 if finished else keep


@dataclass(frozen=True)
class Taken:
    """A checkpoint stored in the RunStore, not yet announced as an event."""
    manifest: dict[str, Any]
    bytes_new: int      # bytes ingested into the BlobStore
    bytes_total: int    # stored bytes the manifest references


class Checkpoints:
    """One-way collaborator of the run manager: it never emits events (the journal does)."""

    def __init__(self, settings: HandoffSettings, store: RunStore, blobs: BlobStore, workspace: Workspace,
                 transport: BundleTransport) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.workspace = workspace
        self.transport = transport

    def latest(self, run_id: str) -> tuple[dict[str, Any], str]:
        """The newest checkpoint manifest, else the handoff one; and which kind it is."""
        m = self.store.manifest(run_id, "checkpoint")
        if m is not None:
            return m, "checkpoint"
        m = self.store.manifest(run_id, "handoff")
        if m is None:
            raise RunFailure(f"run {run_id} has no handoff manifest", "hand the run off again")
        return m, "handoff"

    def materialise(self, run_id: str, manifest: dict[str, Any]) -> None:
        """Check that every chunk the manifest names is here before a kernel is given it (the
        kernel's own copy of the bundle is the transport's job, ``send_bundle``)."""
        try:
            shas = Manifest.parse(manifest).shas
        except BundleError as exc:
            raise RunFailure(f"the stored manifest of run {run_id} is invalid: {exc}",
                             "hand the run off again") from exc
        missing = self.blobs.missing(shas)
        if missing:
            raise RunFailure(f"{len(missing)} chunk(s) of run {run_id} are missing on this server "
                             f"(first: {missing[0]})", "hand the run off again to re-upload them")

    def take(self, executor: KernelExecutor, state: RunState, *, full: bool) -> Taken:
        """``save_state`` inside the kernel (only new chunks are written), the new chunks
        ingested by hash, the manifest stored and old ones pruned. ``full`` keeps the event log
        in the run state (a pull); per-step checkpoints leave it to SQLite. Raises
        ``TransportError`` (``KernelGone`` if the kernel died)."""
        data = state.to_dict()
        if not full:
            data["events"] = []
        ck = self.transport.fetch_checkpoint(executor, state.id, data, self.blobs,
                                             max_bytes=self.settings.max_bundle_bytes,
                                             base=self.store.manifest(state.id, "handoff"))
        self.store.save_manifest(state.id, "checkpoint", ck.manifest)
        self.prune(state.id, finished=False)
        return Taken(ck.manifest, ck.bytes_new, ck.bytes_total)

    def prune(self, run_id: str, *, finished: bool) -> None:
        """Old checkpoint manifests go (the handoff one stays), so blob GC frees their chunks."""
        try:
            self.store.prune_checkpoints(run_id, keep_for(finished, self.settings.keep_checkpoints))
        except Exception:  # space is reclaimed on the next try; the run must not stop for it
            log.exception("jupyter-handoff: pruning old checkpoints of run %s failed", run_id)

    def finished(self, run_id: str) -> None:
        """A run ended: keep its last checkpoint only, and drop the kernel-side checkpoint dir,
        whose copies of every chunk it ever saved would keep the run's state on disk."""
        self.prune(run_id, finished=True)
        remove_tree(self.workspace.ckpt_dir(run_id), "its chunks")


def gc_blobs(store: RunStore, blobs: BlobStore, *, min_age: float = 3600.0, keep: int = DEFAULT_KEEP) -> dict[str, int]:
    """Remove chunks no manifest references (and stale upload temp files), sparing anything
    younger than ``min_age`` seconds: an upload in progress is not referenced yet. Retention is
    applied first (runs from before checkpoints were pruned as they went)."""
    for r in store.list_runs():
        store.prune_checkpoints(r["id"], keep_for(r.get("status") in TERMINAL_STATUSES, keep))
    return blobs.collect(store.referenced_chunks(), min_age=min_age)


def main(argv: list[str] | None = None) -> int:
    """``python -m jupyter_server_ext.run.checkpoints gc --data-dir DIR [--min-age SECONDS]``
    (the old path ``python -m jupyter_server_ext.runner gc ...`` still works)."""
    p = argparse.ArgumentParser(prog="python -m jupyter_server_ext.run.checkpoints",
                                description="jupyter-handoff server maintenance")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gc", help="delete uploaded chunks no run references")
    g.add_argument("--data-dir", required=True, help="the server's c.HandoffApp.data_dir")
    g.add_argument("--min-age", type=float, default=3600.0, help="spare chunks younger than this (s)")
    g.add_argument("--keep-checkpoints", type=int, default=DEFAULT_KEEP,
                   help="checkpoints kept per unfinished run (the server's c.HandoffApp.keep_checkpoints)")
    args = p.parse_args(argv)
    data = Path(args.data_dir).expanduser()
    if not (data / "handoff.sqlite").exists():
        p.error(f"{data} holds no handoff.sqlite; pass the server's HandoffApp.data_dir")
    store = RunStore(data / "handoff.sqlite")
    try:
        print(json.dumps(gc_blobs(store, BlobStore(data / "blobs"), min_age=args.min_age,
                                  keep=args.keep_checkpoints)))
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
