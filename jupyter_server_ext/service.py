"""The rules of the run API, apart from HTTP: what creating, answering, cancelling, pulling and
diffing a run require, and what each returns. Handlers parse a request, call one method here and
send its result; every refusal is a ``ServerError`` with a hint (errors.py).

The server never unpickles: a manifest is checked as JSON and its chunks only by hash and size.
"""
from __future__ import annotations

import asyncio
from typing import Any

from handoff_magic.errors import BundleError
from handoff_magic.manifest import Manifest
from handoff_magic.state import TERMINAL_STATUSES, RunState, StateError, check_run_id

from .api import CreateRun, EventsQuery, events_page
from .blobs import BlobStore
from handoff_magic.diff import diff_manifests
from .errors import BadRequest, Conflict, NotFound, TooLarge, Unavailable
from .run.manager import RunManager
from .run.sandbox import SandboxState
from .settings import HandoffSettings
from .store import RunStore
from .workspace import Workspace

NOT_FOUND_HINT = "list runs with GET /handoff/api/runs or %reattach"


def bundle_size(manifest: dict[str, Any]) -> int:
    """The stored bytes a manifest references (checked before anything else is read)."""
    total = 0
    chunks = manifest.get("chunks")
    if isinstance(chunks, dict):
        for meta in chunks.values():
            if isinstance(meta, dict):
                stored = meta.get("stored", meta.get("size", 0))
                if isinstance(stored, int) and stored > 0:
                    total += stored
    return total


class RunService:
    """Runs as the API sees them; the manager executes them."""

    def __init__(self, settings: HandoffSettings, store: RunStore, blobs: BlobStore, workspace: Workspace,
                 manager: RunManager, *, sandbox: SandboxState | None = None) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.workspace = workspace
        self.manager = manager
        self.sandbox = sandbox

    # -- reads -----------------------------------------------------------------------------------
    def summary(self, run_id: str) -> dict[str, Any]:
        """The run summary with its links; NotFound if there is no such run."""
        try:
            summary = self.store.summary(run_id)
        except KeyError:
            raise NotFound(f"no run with id {run_id!r} on this server", NOT_FOUND_HINT) from None
        summary["links"] = self.workspace.links(run_id)
        return summary

    def list_runs(self) -> list[dict[str, Any]]:
        runs = self.store.list_runs()
        for r in runs:
            r["links"] = self.workspace.links(r["id"])
        return runs

    async def events(self, run_id: str, query: EventsQuery) -> dict[str, Any]:
        """A long-poll page of events: waits up to ``query.timeout`` for the first new one."""
        if not self.store.has_run(run_id):
            raise NotFound(f"no run with id {run_id!r} on this server", NOT_FOUND_HINT)
        events = await self.store.wait_events(run_id, query.after, query.timeout, limit=query.limit)
        return events_page(events, query.after, self.store.last_seq(run_id), self.store.status(run_id))

    def bundle(self, run_id: str) -> dict[str, Any]:
        """Latest checkpoint (else the handoff manifest) with ``run`` = the server's current RunState."""
        self.summary(run_id)
        manifest = self.store.manifest(run_id, "checkpoint") or self.store.manifest(run_id, "handoff")
        if manifest is None:
            raise NotFound(f"run {run_id} has no bundle", NOT_FOUND_HINT)
        manifest["run"] = self.store.get_state(run_id).to_dict()
        return manifest

    async def diff(self, run_id: str) -> dict[str, Any]:
        """Files and variables changed since the handoff (JSON manifests and chunk bytes only)."""
        self.summary(run_id)
        before = self.store.manifest(run_id, "handoff")
        if before is None:
            raise NotFound(f"run {run_id} has no handoff bundle", NOT_FOUND_HINT)
        after = self.store.manifest(run_id, "checkpoint") or before
        return await asyncio.to_thread(diff_manifests, before, after, self.blobs.read)

    # -- changes ---------------------------------------------------------------------------------
    async def create(self, request: CreateRun) -> tuple[dict[str, Any], bool]:
        """A new queued run (summary, True), or the one a retried request made (summary, False)."""
        if self.sandbox is not None and self.sandbox.problem:  # refuse before anything is stored
            raise Unavailable(self.sandbox.problem, self.sandbox.hint)
        if request.idempotency_key:
            existing = self.store.run_by_key(request.idempotency_key)
            if existing is not None:
                return self.summary(existing), False
        # a manifest may list 100k entries and chunks: check it off the event loop
        state = await asyncio.to_thread(self.check_manifest, request.manifest)
        row, created = self.store.create_run(state, request.manifest, request.idempotency_key)
        if created:
            self.manager.submit(row["id"])
        return self.summary(row["id"]), created

    def check_manifest(self, manifest: dict[str, Any]) -> RunState:
        """JSON-only checks, then every chunk present with its declared size; the RunState."""
        size = bundle_size(manifest)
        limit = self.settings.max_bundle_bytes
        if size > limit:
            raise TooLarge(f"bundle is {size} bytes, over this server's limit of {limit} bytes",
                           "hand off fewer or smaller variables (del big ones, or use files), "
                           "or ask the admin to raise HandoffApp.max_bundle_bytes")
        try:
            shas = Manifest.parse(manifest, max_bytes=limit).shas
        except (BundleError, StateError, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BadRequest(f"manifest rejected: {exc}",
                             "capture the bundle again with %handoff; hand-made manifests must "
                             "follow docs/internals.md") from None
        run = manifest.get("run")
        if not isinstance(run, dict):
            raise BadRequest("manifest has no 'run': there is no agent run to resume",
                             "start a run with %agent, then %handoff it")
        try:
            state = RunState.from_dict(run)
            check_run_id(state.id)
        except StateError as exc:
            raise BadRequest(f"run state rejected: {exc}", "capture the run again with %handoff") from None
        chunks = manifest.get("chunks") or {}
        shas = sorted(set(shas) | set(chunks))
        missing = self.blobs.missing(shas)
        if missing:
            raise BadRequest(f"manifest references {len(missing)} chunk(s) this server does not have",
                             "upload them with PUT /handoff/api/blobs/<sha> first (%handoff does "
                             "this), then create the run again", missing=missing)
        self.blobs.settle(shas)   # durable before the run exists and the laptop may close
        for sha in shas:
            declared = (chunks.get(sha) or {}).get("stored")
            actual = self.blobs.size(sha)
            if isinstance(declared, int) and actual != declared:
                raise BadRequest(f"chunk {sha} is {actual} bytes on the server but the "
                                 f"manifest declares {declared}", "capture the bundle again")
        return state

    async def answer(self, run_id: str, text: str) -> dict[str, Any]:
        status = self.summary(run_id)["status"]
        if status != "waiting_input":
            raise Conflict(f"run {run_id} is {status}, not waiting for input",
                           "answer only when the run asks a question (status waiting_input)")
        await self.manager.answer(run_id, text)
        return self.summary(run_id)

    async def cancel(self, run_id: str) -> dict[str, Any]:
        status = self.summary(run_id)["status"]
        if status in TERMINAL_STATUSES:
            raise Conflict(f"run {run_id} already ended ({status})", "nothing to cancel")
        await self.manager.cancel(run_id)
        return self.summary(run_id)

    async def pull(self, run_id: str, timeout: float) -> dict[str, Any]:
        """Pause at the next step boundary and checkpoint: the summary plus ``manifest``."""
        status = self.summary(run_id)["status"]
        if status in TERMINAL_STATUSES and status != "pulled":
            raise Conflict(f"run {run_id} ended ({status}); it can no longer be pulled as a live run",
                           "fetch its last state with GET /handoff/api/runs/<id>/bundle")
        if status == "pulled":
            manifest = self.bundle(run_id)
        else:
            manifest = await self.manager.pull(run_id, timeout=timeout)
        chunks = manifest.get("chunks")
        if isinstance(chunks, dict):   # the laptop GETs every one of them next
            self.blobs.prefetch(list(chunks))
        out = self.summary(run_id)
        out["manifest"] = manifest
        return out
