"""Durable server-side storage: runs, events, answers, manifests and the notification outbox
in SQLite (WAL). Uploaded chunks live in ``blobs.py``.

Why one module: the runner (threads) and the handlers (the event loop) both write here, so the
locking and the "committed before return" guarantees live in one place. Over 400 lines for the
same reason: one table per section, each a few short methods over the same connection and lock.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from handoff_magic.state import TERMINAL_STATUSES, Event, RunState, Usage, check_run_id, new_run_id


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """Strict JSON (NaN/Infinity become null) so SQLite's json functions can always read it."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)


MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        goal TEXT NOT NULL,
        state TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE events (
        run_id TEXT NOT NULL REFERENCES runs(id),
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        data TEXT NOT NULL,
        time REAL NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs(id),
        text TEXT NOT NULL,
        created REAL NOT NULL,
        taken REAL
    );
    CREATE TABLE manifests (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs(id),
        kind TEXT NOT NULL,
        created REAL NOT NULL,
        manifest TEXT NOT NULL
    );
    CREATE INDEX manifests_run_kind ON manifests(run_id, kind, id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        delivered REAL,
        last_error TEXT
    );
    CREATE INDEX outbox_pending ON outbox(delivered, next_attempt);
    """,
]


# Summaries read only the fields they show (json_extract in C), never the whole message list:
# status and event calls stay fast while a run's state grows.
_SUMMARY_SQL = """
SELECT r.id, r.goal, r.status, r.created, r.updated,
       json_extract(r.state, '$.plan') AS plan, json_extract(r.state, '$.question') AS question,
       json_extract(r.state, '$.summary') AS summary, json_extract(r.state, '$.error') AS error,
       json_extract(r.state, '$.steps') AS steps, json_extract(r.state, '$.model') AS model,
       json_extract(r.state, '$.origin') AS origin, json_extract(r.state, '$.usage') AS usage,
       (SELECT MAX(seq) FROM events e WHERE e.run_id = r.id) AS last_seq
FROM runs r
"""


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "goal": row["goal"],
        "status": row["status"],
        "plan": json.loads(row["plan"]) if row["plan"] else [],
        "question": row["question"],
        "summary": row["summary"],
        "error": row["error"],
        "steps": row["steps"] or 0,
        "model": row["model"] or "",
        "origin": json.loads(row["origin"]) if row["origin"] else {},
        # tokens and cost so far
        "usage": Usage.from_dict(json.loads(row["usage"]) if row["usage"] else None).to_dict(),
        "created": row["created"],
        "updated": row["updated"],
        "last_seq": row["last_seq"] or 0,
    }


class RunStore:
    """``handoff.sqlite`` in WAL mode; every method is safe to call from any thread.

    One connection guarded by a lock: writes are short, and a single writer is what SQLite wants
    anyway. Long-polls wait on asyncio futures that ``append_event`` wakes thread-safely.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._waiters_lock = threading.Lock()
        self._migrate()

    # -- plumbing --------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} was written by a newer jupyter-handoff (schema {version}); "
                    "upgrade jupyter-handoff on this server or point HandoffApp.data_dir elsewhere")
            for i in range(version, len(MIGRATIONS)):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in MIGRATIONS[i].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version = {i + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def _tx(self) -> "_Tx":
        return _Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _last_seq(self, run_id: str) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events WHERE run_id=?", (run_id,)).fetchone()
        return row[0] or 0

    # -- runs ------------------------------------------------------------------------------
    def create_run(self, state: RunState, manifest: dict[str, Any],
                   idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        """Insert a run (status ``queued``), its past events and its handoff manifest.

        Same idempotency key → the existing run and ``False``. Keeps the client's run id when
        free so both sides talk about the same id; otherwise picks a new one.
        """
        check_run_id(state.id)  # it names a directory: never stored unless safe
        with self._tx() as db:
            if idempotency_key:
                row = db.execute("SELECT id FROM runs WHERE idempotency_key=?", (idempotency_key,)).fetchone()
                if row is not None:
                    return self.summary(row["id"]), False
            run_id = state.id
            while db.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is not None:
                run_id = new_run_id()
            state.id = run_id
            now = time.time()
            past = list(state.events)
            state.events = []
            state.status = "queued"
            state.updated = now
            db.execute(
                "INSERT INTO runs(id, status, goal, state, idempotency_key, created, updated) "
                "VALUES (?,?,?,?,?,?,?)",
                (run_id, state.status, state.goal, _dumps(state.to_dict()), idempotency_key, now, now))
            seq = 0
            for ev in past:
                seq += 1  # renumber densely: the server's log has no gaps whatever the client sent
                db.execute("INSERT INTO events(run_id, seq, type, data, time) VALUES (?,?,?,?,?)",
                           (run_id, seq, ev.type, _dumps(ev.data), ev.time))
            db.execute("INSERT INTO events(run_id, seq, type, data, time) VALUES (?,?,?,?,?)",
                       (run_id, seq + 1, "status",
                        json.dumps({"status": "queued", "reason": "handed off to this server"}), now))
            db.execute("INSERT INTO manifests(run_id, kind, created, manifest) VALUES (?,?,?,?)",
                       (run_id, "handoff", now, _dumps(manifest)))
        self._wake(run_id)
        return self.summary(run_id), True

    def run_by_key(self, idempotency_key: str) -> str | None:
        """The id of the run created with this idempotency key, if any."""
        rows = self._q("SELECT id FROM runs WHERE idempotency_key=?", (idempotency_key,))
        return rows[0]["id"] if rows else None

    def has_run(self, run_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM runs WHERE id=?", (run_id,)))

    def summary(self, run_id: str) -> dict[str, Any]:
        """The run summary of docs/internals.md without ``links`` (the handler adds those)."""
        with self._lock:
            row = self._db.execute(_SUMMARY_SQL + " WHERE r.id=?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(run_id)
        return _summary(row)

    def status(self, run_id: str) -> str:
        """Just the status (cheap); KeyError if unknown."""
        rows = self._q("SELECT status FROM runs WHERE id=?", (run_id,))
        if not rows:
            raise KeyError(run_id)
        return str(rows[0]["status"])

    def get_state(self, run_id: str) -> RunState:
        """The stored RunState with its full event log (``state.last_seq`` matches the store)."""
        with self._lock:
            row = self._db.execute("SELECT status, state FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            data = json.loads(row["state"])
            data["status"] = row["status"]
            data["events"] = []
            state = RunState.from_dict(data)
            state.events = self.events(run_id, 0, limit=None)
            return state

    def save_state(self, state: RunState) -> None:
        """Persist status, plan, messages... (events live in their own table)."""
        # without deep-copying the event log (asdict would, then drop it): O(events) per event
        data = dataclasses.replace(state, events=[]).to_dict()
        with self._tx() as db:
            cur = db.execute("UPDATE runs SET status=?, goal=?, state=?, updated=? WHERE id=?",
                             (state.status, state.goal, _dumps(data),
                              time.time(), state.id))
            if cur.rowcount == 0:
                raise KeyError(state.id)

    def list_runs(self) -> list[dict[str, Any]]:
        return [_summary(r) for r in self._q(_SUMMARY_SQL + " ORDER BY r.created DESC")]

    def unfinished_runs(self) -> list[str]:
        marks = ",".join("?" * len(TERMINAL_STATUSES))
        rows = self._q(f"SELECT id FROM runs WHERE status NOT IN ({marks}) ORDER BY created",
                       tuple(sorted(TERMINAL_STATUSES)))
        return [r["id"] for r in rows]

    def fail_unresumable(self, run_id: str, message: str, hint: str) -> None:
        """End a stored run that cannot even be loaded (bad id, damaged state): an ``error``
        event, then the ``failed`` status, written without parsing its state."""
        self.append_event(run_id, "error", {"error": message, "hint": hint})
        self.append_event(run_id, "status", {"status": "failed", "reason": message})

    # -- events ----------------------------------------------------------------------------
    def append_event(self, run_id: str, type: str, data: dict[str, Any]) -> Event:
        """Give the event the next seq, commit it, then wake long-polls; returns the Event.

        A ``status`` event also updates the run's status column so summaries never lag.
        """
        now = time.time()
        payload = _dumps(data or {})
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is None:
                raise KeyError(run_id)
            seq = self._last_seq(run_id) + 1
            db.execute("INSERT INTO events(run_id, seq, type, data, time) VALUES (?,?,?,?,?)",
                       (run_id, seq, type, payload, now))
            if type == "status" and isinstance((data or {}).get("status"), str):
                db.execute("UPDATE runs SET status=?, state=json_set(state, '$.status', ?), updated=? "
                           "WHERE id=?", (data["status"], data["status"], now, run_id))
            else:
                db.execute("UPDATE runs SET updated=? WHERE id=?", (now, run_id))
        self._wake(run_id)
        return Event(seq=seq, type=type, data=dict(data or {}), time=now)

    def events(self, run_id: str, after: int = 0, limit: int | None = 500) -> list[Event]:
        sql = "SELECT seq, type, data, time FROM events WHERE run_id=? AND seq>? ORDER BY seq"
        args: tuple[Any, ...] = (run_id, after)
        if limit is not None:
            sql += " LIMIT ?"
            args += (limit,)
        return [Event(seq=r["seq"], type=r["type"], data=json.loads(r["data"]), time=r["time"])
                for r in self._q(sql, args)]

    def last_seq(self, run_id: str) -> int:
        with self._lock:
            return self._last_seq(run_id)

    async def wait_events(self, run_id: str, after: int, timeout: float,
                          limit: int = 500) -> list[Event]:
        """Events with seq > ``after``, waiting up to ``timeout`` s for the first one.

        Always reads from SQLite after waking, so a wake-up can never lose or duplicate events.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            key = (loop, fut)
            with self._waiters_lock:
                self._waiters.setdefault(run_id, set()).add(key)
            try:
                found = self.events(run_id, after, limit)  # after registering: no missed wake-up
                remaining = deadline - loop.time()
                if found or remaining <= 0:
                    return found
                try:
                    await asyncio.wait_for(fut, remaining)
                except asyncio.TimeoutError:
                    pass
            finally:
                with self._waiters_lock:
                    waiters = self._waiters.get(run_id)
                    if waiters is not None:
                        waiters.discard(key)
                        if not waiters:
                            del self._waiters[run_id]

    def _wake(self, run_id: str) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters.get(run_id, ()))
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop is closed; its waiter is gone with it
                pass

    # -- answers ---------------------------------------------------------------------------
    def put_answer(self, run_id: str, text: str) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is None:
                raise KeyError(run_id)
            db.execute("INSERT INTO answers(run_id, text, created) VALUES (?,?,?)",
                       (run_id, text, time.time()))

    def take_answer(self, run_id: str) -> str | None:
        """The oldest unread answer, marked read in the same transaction."""
        with self._tx() as db:
            row = db.execute("SELECT id, text FROM answers WHERE run_id=? AND taken IS NULL "
                             "ORDER BY id LIMIT 1", (run_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE answers SET taken=? WHERE id=?", (time.time(), row["id"]))
            return row["text"]

    # -- manifests -------------------------------------------------------------------------
    def save_manifest(self, run_id: str, kind: str, manifest: dict[str, Any]) -> None:
        if kind not in ("handoff", "checkpoint"):
            raise ValueError(f"manifest kind {kind!r} is not 'handoff' or 'checkpoint'")
        with self._tx() as db:
            db.execute("INSERT INTO manifests(run_id, kind, created, manifest) VALUES (?,?,?,?)",
                       (run_id, kind, time.time(), _dumps(manifest)))

    def manifest(self, run_id: str, kind: str) -> dict[str, Any] | None:
        rows = self._q("SELECT manifest FROM manifests WHERE run_id=? AND kind=? ORDER BY id DESC LIMIT 1",
                       (run_id, kind))
        return json.loads(rows[0]["manifest"]) if rows else None

    def prune_checkpoints(self, run_id: str, keep: int) -> int:
        """Delete all but the newest ``keep`` (>= 1) checkpoint manifests of a run (the handoff
        manifest always stays), so blob GC can free chunks only old checkpoints named.
        Returns how many were deleted."""
        keep = max(1, int(keep))
        with self._tx() as db:
            cur = db.execute("DELETE FROM manifests WHERE run_id=? AND kind='checkpoint' AND id NOT IN "
                             "(SELECT id FROM manifests WHERE run_id=? AND kind='checkpoint' "
                             "ORDER BY id DESC LIMIT ?)", (run_id, run_id, keep))
            return int(cur.rowcount or 0)

    def referenced_chunks(self) -> set[str]:
        """Every chunk sha named by any stored manifest (for blob garbage collection)."""
        shas: set[str] = set()
        for r in self._q("SELECT manifest FROM manifests"):
            shas.update((json.loads(r["manifest"]).get("chunks") or {}).keys())
        return shas

    # -- notification outbox ---------------------------------------------------------------
    def add_notifications(self, run_id: str, kind: str, title: str, body: str,
                          targets: list[str]) -> list[int]:
        """One outbox row per target (a hash naming a configured URL); committed on return."""
        now = time.time()
        ids: list[int] = []
        with self._tx() as db:
            for target in targets:
                cur = db.execute(
                    "INSERT INTO outbox(run_id, kind, target, title, body, created, next_attempt) "
                    "VALUES (?,?,?,?,?,?,?)", (run_id, kind, target, title, body, now, now))
                ids.append(int(cur.lastrowid or 0))
        return ids

    def due_notifications(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        rows = self._q("SELECT * FROM outbox WHERE delivered IS NULL AND next_attempt<=? ORDER BY id",
                       (now,))
        return [dict(r) for r in rows]

    def next_notification_time(self) -> float | None:
        rows = self._q("SELECT MIN(next_attempt) FROM outbox WHERE delivered IS NULL")
        return rows[0][0] if rows else None

    def mark_delivered(self, outbox_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET delivered=?, attempts=attempts+1, last_error=NULL WHERE id=?",
                       (time.time(), outbox_id))

    def mark_failed(self, outbox_id: int, error: str, next_attempt: float | None) -> None:
        """Record a failed attempt; ``next_attempt=None`` gives up (delivered stays NULL)."""
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt=? WHERE id=?",
                       (error, float("inf") if next_attempt is None else next_attempt, outbox_id))

    def notifications(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return [dict(r) for r in self._q("SELECT * FROM outbox ORDER BY id")]
        return [dict(r) for r in self._q("SELECT * FROM outbox WHERE run_id=? ORDER BY id", (run_id,))]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Tx:
    """``with store._tx() as db``: lock + BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise
        return self.store._db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
