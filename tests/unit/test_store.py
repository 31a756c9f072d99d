"""The server's durable store: real SQLite files and a real blob directory, several threads."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff_magic.state import RunState
from jupyter_server_ext import blobs as blobs_module
from jupyter_server_ext.blobs import BlobStore
from jupyter_server_ext.errors import BlobError
from jupyter_server_ext.store import RunStore


def _state(goal: str = "clean the data") -> RunState:
    st = RunState(goal=goal, status="running", model="scripted:demo")
    st.emit("status", status="running")
    st.emit("assistant", text="I will load the CSV first.")
    return st


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "handoff.sqlite")
    yield s
    s.close()


def test_create_run_queues_keeps_history_and_is_idempotent(store: RunStore) -> None:
    st = _state()
    summary, created = store.create_run(st, {"chunks": {}}, "key-1")
    assert created and summary["status"] == "queued" and summary["goal"] == "clean the data"
    events = store.events(summary["id"])
    assert [e.seq for e in events] == [1, 2, 3]
    assert [e.type for e in events] == ["status", "assistant", "status"]
    assert events[-1].data["status"] == "queued"
    again, created2 = store.create_run(_state("other"), {"chunks": {}}, "key-1")
    assert not created2 and again["id"] == summary["id"]
    assert len(store.list_runs()) == 1
    # the same client run id handed off twice (no key) gets a fresh server id
    twin = RunState.from_dict({**st.to_dict(), "id": summary["id"]})
    other, _ = store.create_run(twin, {"chunks": {}}, None)
    assert other["id"] != summary["id"]
    assert store.manifest(summary["id"], "handoff") == {"chunks": {}}


def test_state_round_trip_and_status_events(store: RunStore) -> None:
    summary, _ = store.create_run(_state(), {}, None)
    rid = summary["id"]
    st = store.get_state(rid)
    assert st.last_seq == 3 and st.status == "queued"
    st.plan = []
    st.question = "Which column is the target?"
    store.save_state(st)
    store.append_event(rid, "status", {"status": "waiting_input"})
    got = store.summary(rid)
    assert got["status"] == "waiting_input" and got["question"] == "Which column is the target?"
    assert store.get_state(rid).status == "waiting_input"
    assert rid in store.unfinished_runs()
    store.append_event(rid, "status", {"status": "completed"})
    assert rid not in store.unfinished_runs()
    with pytest.raises(KeyError):
        store.get_state("nope")
    with pytest.raises(KeyError):
        store.append_event("nope", "status", {"status": "running"})


def test_concurrent_appends_are_dense_and_unique(store: RunStore) -> None:
    rid = store.create_run(_state(), {}, None)[0]["id"]

    def writer(n: int) -> None:
        for i in range(50):
            store.append_event(rid, "assistant", {"text": f"{n}-{i}"})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e.seq for e in store.events(rid, 0, limit=None)]
    assert seqs == list(range(1, 3 + 200 + 1))
    texts = [e.data["text"] for e in store.events(rid, 3, limit=None)]
    assert len(set(texts)) == 200


async def test_long_poll_wakes_on_append_from_a_thread(store: RunStore) -> None:
    rid = store.create_run(_state(), {}, None)[0]["id"]
    t0 = time.monotonic()
    assert await store.wait_events(rid, 3, 0.2) == []
    assert time.monotonic() - t0 >= 0.19

    def later() -> None:
        time.sleep(0.3)
        store.append_event(rid, "assistant", {"text": "done loading"})

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    got = await store.wait_events(rid, 3, 10)
    waited = time.monotonic() - t0
    assert [e.seq for e in got] == [4] and got[0].data["text"] == "done loading"
    assert waited < 2, f"long-poll was not woken, waited {waited:.2f}s"


async def test_many_pollers_see_every_event_once(store: RunStore) -> None:
    rid = store.create_run(_state(), {}, None)[0]["id"]

    async def follow() -> list[int]:
        seen: list[int] = []
        after = 3
        while after < 3 + 40:
            for e in await store.wait_events(rid, after, 5, limit=7):
                seen.append(e.seq)
                after = e.seq
        return seen

    def produce() -> None:
        for i in range(40):
            store.append_event(rid, "assistant", {"text": str(i)})
            if i % 5 == 0:
                time.sleep(0.01)

    pollers = [asyncio.create_task(follow()) for _ in range(20)]
    await asyncio.sleep(0.05)
    await asyncio.to_thread(produce)
    results = await asyncio.wait_for(asyncio.gather(*pollers), 20)
    for seen in results:
        assert seen == list(range(4, 44))


def test_persists_across_reopen_and_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sqlite"
    s = RunStore(path)
    rid = s.create_run(_state(), {"chunks": {}}, "k")[0]["id"]
    s.put_answer(rid, "first")
    s.put_answer(rid, "second")
    s.save_manifest(rid, "checkpoint", {"n": 1})
    s.save_manifest(rid, "checkpoint", {"n": 2})
    s.close()
    s = RunStore(path)
    assert s.run_by_key("k") == rid and s.get_state(rid).goal == "clean the data"
    assert s.take_answer(rid) == "first" and s.take_answer(rid) == "second" and s.take_answer(rid) is None
    assert s.manifest(rid, "checkpoint") == {"n": 2}
    assert s.manifest(rid, "nothing") is None
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RuntimeError, match="newer jupyter-handoff"):
        RunStore(path)


def test_outbox_rows_retry_and_deliver(store: RunStore) -> None:
    ids = store.add_notifications("r1", "completed", "t", "b", ["a", "b"])
    assert len(ids) == 2 and len(store.due_notifications()) == 2
    store.mark_failed(ids[0], "receiver down", time.time() + 60)
    store.mark_delivered(ids[1])
    assert store.due_notifications() == []
    due = store.due_notifications(time.time() + 61)
    assert [r["id"] for r in due] == [ids[0]] and due[0]["attempts"] == 1
    assert due[0]["last_error"] == "receiver down"


# -- blobs -------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_blob_put_verifies_and_is_idempotent(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(100_000)
    sha = _sha(data)
    with pytest.raises(BlobError, match="hash"):
        blobs.put(sha, data[:-1])
    assert not blobs.has(sha)
    assert blobs.put(sha, data) is True
    assert blobs.put(sha, data) is False
    assert blobs.read(sha) == data and blobs.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert blobs.missing([sha, "0" * 64, sha]) == ["0" * 64]
    assert not [p for p in (tmp_path / "blobs").rglob(".tmp-*")]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "A" * 64, "0" * 63, "", "..", "0" * 64 + "/x"])
def test_blob_addresses_cannot_be_paths(tmp_path: Path, bad: str) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    with pytest.raises(BlobError):
        blobs.path(bad)
    with pytest.raises(BlobError):
        blobs.put(bad, b"x")


def test_concurrent_puts_of_one_chunk(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(2 * 1024 * 1024)
    sha = _sha(data)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            blobs.put(sha, data)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert blobs.read(sha) == data
    assert [p.name for p in (tmp_path / "blobs" / sha[:2]).iterdir()] == [sha]


def test_streamed_writer_caps_size_and_aborts_cleanly(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", max_chunk_bytes=1000)
    data = b"x" * 1500
    w = blobs.writer(_sha(data))
    w.write(data[:800])
    with pytest.raises(BlobError, match="limit"):
        w.write(data[800:])
    assert not blobs.has(_sha(data))
    w2 = blobs.writer(_sha(b"abc"))
    w2.write(b"ab")
    w2.abort()
    assert not list((tmp_path / "blobs").rglob("*")) or all(p.is_dir() for p in (tmp_path / "blobs").rglob("*"))


def _upload(blobs: BlobStore, data: bytes) -> tuple[str, bool]:
    """What PUT /blobs/{sha} does: stream, verify, leave it pending until a run needs it."""
    sha = _sha(data)
    w = blobs.writer(sha)
    w.write(data)
    return sha, w.commit(durable=False)


def test_an_upload_is_known_at_once_but_published_under_its_address_only_when_settled(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(300_000)
    sha, created = _upload(blobs, data)
    assert created and blobs.has(sha) and blobs.missing([sha]) == []
    assert not blobs.final_path(sha).exists()      # a crash now leaves a temp file, never a torn chunk
    assert _upload(blobs, data) == (sha, False)     # a second upload of it is a no-op
    blobs.settle([sha, "0" * 64])
    assert blobs.final_path(sha).read_bytes() == data
    assert [p.name for p in (tmp_path / "blobs" / sha[:2]).iterdir()] == [sha]


def test_reading_a_pending_upload_settles_it(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(10_000)
    sha, _ = _upload(blobs, data)
    assert blobs.read(sha) == data and blobs.final_path(sha).is_file()
    sha2, _ = _upload(blobs, b"checkpointed later")
    assert blobs.put(sha2, b"checkpointed later") is False and blobs.final_path(sha2).is_file()


def _stream(blobs: BlobStore, data: bytes, piece_sizes: list[int]) -> str:
    """Upload ``data`` as tornado hands it over: pieces of uneven sizes, offered without waiting."""
    sha = _sha(data)
    w = blobs.writer(sha)
    pos, i = 0, 0
    while pos < len(data):
        piece = data[pos: pos + piece_sizes[i % len(piece_sizes)]]
        if not w.offer(piece):
            w.write(piece)
        pos, i = pos + len(piece), i + 1
    assert w.commit(durable=False)
    blobs.settle([sha])
    return sha


SIZES = [0, 1, 4095, 4096, 4097, 1024 * 1024 + 123, 5 * 1024 * 1024 + 7]
PIECES = [1, 65536, 4096 * 3 + 5, 1024 * 1024, 300_000]


@pytest.mark.parametrize("refuse", ["nothing", "direct open", "direct write"])
def test_uploads_in_uneven_pieces_are_stored_byte_for_byte_whatever_the_file_system_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: str) -> None:
    """Direct (O_DIRECT) writes where the file system takes them, the page cache where it refuses
    them at open (tmpfs on older kernels) or at the first write: the same bytes either way."""
    direct = getattr(os, "O_DIRECT", 0)
    real_open, real_write = os.open, os.write

    def open_(path: str, flags: int, mode: int = 0o777) -> int:
        if refuse == "direct open" and flags & direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def write(fd: int, data: bytes) -> int:
        if refuse == "direct write" and fcntl.fcntl(fd, fcntl.F_GETFL) & direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", open_)   # the os module blobs.py uses
    monkeypatch.setattr(os, "write", write)
    blobs = BlobStore(tmp_path / "blobs")
    for size in SIZES:
        data = os.urandom(size)
        sha = _stream(blobs, data, PIECES[size % len(PIECES):] + PIECES[: size % len(PIECES)])
        assert blobs.final_path(sha).read_bytes() == data, size
    assert not [p for p in (tmp_path / "blobs").rglob(".tmp-*")]


def test_many_uploads_share_a_few_writer_threads_and_a_cut_one_leaves_nothing(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    before = threading.active_count()
    datas = [os.urandom(200_000 + i) for i in range(24)]
    writers = [blobs.writer(_sha(d)) for d in datas]
    for w, d in zip(writers, datas):   # all in flight at once, as concurrent PUTs are
        w.write(d[:100_000])
    cut = writers.pop(5)
    cut.abort()                        # the client went away mid-body
    del datas[5]
    for w, d in zip(writers, datas):
        w.write(d[100_000:])
        assert w.commit(durable=False)
    assert threading.active_count() - before <= blobs_module.LANES + blobs_module.FLUSHERS
    blobs.settle([_sha(d) for d in datas])
    assert all(blobs.read(_sha(d)) == d for d in datas)
    assert not [p for p in (tmp_path / "blobs").rglob(".tmp-*")]


def test_gc_frees_a_stale_upload_no_run_claimed_and_spares_a_fresh_one(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    old, _ = _upload(blobs, b"uploaded, then the laptop never created the run")
    tmp = next((tmp_path / "blobs").rglob(".tmp-*"))
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    fresh, _ = _upload(blobs, b"a handoff in progress")
    out = blobs.collect(set(), min_age=600)
    assert out["deleted"] == 1 and not blobs.has(old) and not tmp.exists()
    assert blobs.has(fresh)
    blobs.settle([fresh])
    assert blobs.read(fresh) == b"a handoff in progress"


def test_non_finite_numbers_are_stored_as_null(store: RunStore) -> None:
    st = _state()
    st.budgets.max_seconds = float("nan")
    rid = store.create_run(st, {"x": float("inf")}, None)[0]["id"]
    store.append_event(rid, "tool_result", {"value": float("nan")})
    store.append_event(rid, "status", {"status": "running"})  # json_set on the state column
    assert store.summary(rid)["status"] == "running"
    assert store.events(rid, 3)[0].data == {"value": None}
    assert store.manifest(rid, "handoff") == {"x": None}


def test_prefetch_is_advice_that_tolerates_missing_and_bad_addresses(tmp_path: Path) -> None:
    """A pull back asks the store to read its chunks ahead; a chunk collected meanwhile, or an
    address that is no address, must neither raise nor stop the others being read."""
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(64 * 1024)
    sha = "blake3-" + __import__("blake3").blake3(data).hexdigest()
    blobs.put(sha, data)
    before = threading.active_count()
    blobs.prefetch(["blake3-" + "0" * 64, "not-an-address", sha])
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before and blobs.read(sha) == data
