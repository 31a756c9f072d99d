"""Out-of-band notifications (apprise) through a persisted outbox.

Why an outbox: a run that finishes while the mail server or webhook is down, or just before the
Jupyter Server is killed, must still be announced. ``enqueue`` commits one row per configured URL
before returning; a background task delivers them with backoff and marks each delivered, and a
restarted server picks up whatever is still pending.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import apprise

from handoff_magic.state import describe_usage

from .store import RunStore
from .workspace import run_links

KINDS = ("completed", "failed", "cancelled", "waiting_input")
_HEADLINE = {
    "completed": "finished",
    "failed": "failed",
    "cancelled": "was cancelled",
    "waiting_input": "needs your input",
    "stuck": "is stuck",
}


def target_key(url: str) -> str:
    """Outbox rows name a URL by hash, so notification secrets (SMTP passwords) never hit disk."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def redact(url: str) -> str:
    """``scheme://…`` for logs and errors: apprise URLs carry credentials."""
    return url.split("://", 1)[0] + "://…" if "://" in url else "…"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def compose(summary: dict[str, Any], kind: str, public_url: str) -> tuple[str, str]:
    """Title and plain-text body: goal, status, one paragraph, links."""
    goal = " ".join(str(summary.get("goal") or "").split())
    short_goal = goal if len(goal) <= 60 else goal[:57] + "…"
    title = f"Handoff run {summary['id']} {_HEADLINE.get(kind, kind)}: {short_goal}"
    if kind == "waiting_input":
        para = f"The agent asks: {summary.get('question') or '(no question text)'}"
    elif kind == "completed":
        para = summary.get("summary") or "The agent finished without a summary."
    elif kind == "failed":
        para = f"Error: {summary.get('error') or 'unknown error'}"
    elif kind == "stuck":
        idle = max(0.0, time.time() - float(summary.get("updated") or time.time()))
        para = (f"No progress for {_duration(idle)} (since its last event); the run may be hanging. "
                "Open the status page to answer or cancel it, or pull it back to your notebook "
                f"(%pull {summary['id']}).")
    else:
        para = "The run was cancelled; its workspace and notebook are kept."
    plan = summary.get("plan") or []
    done = sum(1 for p in plan if p.get("status") == "done")
    link = run_links(public_url, summary["id"])
    body = "\n".join([
        f"Goal: {goal}",
        f"Status: {summary.get('status')} (plan {done}/{len(plan)} done, {summary.get('steps', 0)} steps)",
        *([f"Usage: {used}"] if (used := describe_usage(summary.get("usage"))) else []),
        "",
        para,
        "",
        f"Status page: {link['status_page']}",
        f"Result notebook: {link['notebook']}",
    ])
    return title, body


class Notifier:
    """Persists notifications and delivers them in the background with exponential backoff."""

    def __init__(self, store: RunStore, urls: list[str], public_url: Callable[[], str], *,
                 log: logging.Logger | None = None, retry_base: float = 2.0,
                 retry_max: float = 300.0, max_attempts: int = 100) -> None:
        self.store = store
        self.urls = list(urls)
        self._public_url = public_url
        self.log = log or logging.getLogger(__name__)
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self._by_key = {target_key(u): u for u in self.urls}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = threading.Lock()

    # -- producer side (any thread) ------------------------------------------------------
    def enqueue(self, run_id: str, kind: str) -> list[int]:
        """Record a notification for every configured URL; committed before returning."""
        if not self.urls:
            return []
        summary = self.store.summary(run_id)
        title, body = compose(summary, kind, self._public_url())
        if any(r["kind"] == kind and r["body"] == body for r in self.store.notifications(run_id)):
            # a resumed run re-entering the same state (e.g. the same question after a server
            # restart) must not notify twice
            self.log.info("jupyter-handoff: run %s %s already notified; not repeated", run_id, kind)
            return []
        ids = self.store.add_notifications(run_id, kind, title, body, list(self._by_key))
        self.log.info("jupyter-handoff: run %s %s; %d notification(s) queued", run_id, kind, len(ids))
        self.kick()
        return ids

    def kick(self) -> None:
        """Wake the delivery task (thread-safe)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    # -- delivery ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="handoff-notifier")

    async def stop(self, grace: float = 10.0) -> None:
        """End delivery, letting a message being sent finish first: cut off, it would stay unmarked
        and go out again at the next start. A send still hanging after ``grace`` s is cancelled."""
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        if self._wake is not None:
            self._wake.set()
        try:
            await asyncio.wait_for(task, grace)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass   # cancelled after the grace: its row stays pending and is sent at the next start

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await self.deliver_due()
            except Exception:  # a bug must not kill delivery forever; rows stay pending
                self.log.exception("jupyter-handoff: notification delivery pass failed; will retry")
            if self._stopping:
                break
            nxt = self.store.next_notification_time()
            delay = 60.0 if nxt is None else min(60.0, max(0.05, nxt - time.time()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def deliver_due(self) -> int:
        """Try every due row once; returns how many were delivered."""
        delivered = 0
        for row in self.store.due_notifications():
            if self._stopping:
                break   # the rest stay pending for the next start
            url = self._by_key.get(row["target"])
            if url is None:
                self.store.mark_failed(row["id"], "this notification URL is no longer in "
                                       "HandoffApp.notify_urls; not sent", None)
                continue
            ok, error = await asyncio.to_thread(self._send, url, row["title"], row["body"],
                                                row["kind"])
            if ok:
                self.store.mark_delivered(row["id"])
                delivered += 1
                continue
            attempts = row["attempts"] + 1
            if attempts >= self.max_attempts:
                self.log.error("jupyter-handoff: giving up on notification %s to %s after %d attempts: %s",
                               row["id"], redact(url), attempts, error)
                self.store.mark_failed(row["id"], error, None)
            else:
                wait = min(self.retry_max, self.retry_base * 2 ** (attempts - 1))
                self.log.warning("jupyter-handoff: notification %s to %s failed (%s); retry in %.0fs",
                                 row["id"], redact(url), error, wait)
                self.store.mark_failed(row["id"], error, time.time() + wait)
        return delivered

    @staticmethod
    def _send(url: str, title: str, body: str, kind: str) -> tuple[bool, str]:
        """One apprise delivery; returns (ok, what went wrong)."""
        ap = apprise.Apprise()
        if not ap.add(url):
            return False, f"apprise does not understand the URL {redact(url)}; fix HandoffApp.notify_urls"
        ntype = apprise.NotifyType.FAILURE if kind == "failed" else (
            apprise.NotifyType.WARNING if kind == "waiting_input" else apprise.NotifyType.INFO)
        with apprise.LogCapture(level=logging.WARNING) as captured:
            ok = ap.notify(title=title, body=body, notify_type=ntype)
            detail = captured.getvalue().strip().replace("\n", "; ")
        return bool(ok), ("" if ok else (detail or "apprise reported a failed delivery"))
