"""Notifications: a real loopback webhook and a real SMTP server (aiosmtpd), through apprise.

A receiver that is down at first, and a server that is killed before it could deliver, must
lose nothing.
"""
from __future__ import annotations

import asyncio
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from handoff_magic.state import RunState
from jupyter_server_ext.notify import Notifier, compose, target_key
from jupyter_server_ext.store import RunStore
from tests.harness.server_process import JupyterServerProcess, Mailbox, Webhook, free_port

PUBLIC = "https://jupyter.example.org/user/ada"


@pytest.fixture
def webhook() -> Any:
    hook = Webhook()
    yield hook
    hook.stop()


def _run(store: RunStore, status: str = "completed", **fields: Any) -> str:
    st = RunState(goal="Clean sales.csv and fit a model", model="scripted:demo")
    rid = store.create_run(st, {"chunks": {}}, None)[0]["id"]
    st = store.get_state(rid)
    for k, v in fields.items():
        setattr(st, k, v)
    st.status = status
    store.save_state(st)
    return rid


def test_message_names_goal_status_summary_and_links(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "h.sqlite")
    rid = _run(store, "waiting_input", question="Drop rows with a negative price?")
    title, body = compose(store.summary(rid), "waiting_input", PUBLIC)
    assert "needs your input" in title and "Clean sales.csv" in title
    assert "Drop rows with a negative price?" in body and "Status: waiting_input" in body
    assert f"{PUBLIC}/handoff/runs/{rid}" in body
    assert f"{PUBLIC}/lab/tree/handoff-runs/{rid}/result.ipynb" in body
    rid2 = _run(store, "completed", summary="R² = 0.93 on the held-out set.")
    assert "R² = 0.93" in compose(store.summary(rid2), "completed", PUBLIC)[1]


async def test_receiver_down_at_first_gets_it_later(tmp_path: Path, webhook: Webhook) -> None:
    store = RunStore(tmp_path / "h.sqlite")
    notifier = Notifier(store, [webhook.url], lambda: PUBLIC, retry_base=0.2)
    rid = _run(store, "completed", summary="All done.")
    notifier.enqueue(rid, "completed")
    assert await notifier.deliver_due() == 0   # the first attempt fails: nobody listens yet
    row = store.notifications(rid)[0]
    assert row["delivered"] is None and row["attempts"] == 1 and "127.0.0.1" in row["last_error"]
    webhook.start()
    notifier.start()   # the delivery task retries on its own once the retry is due
    try:
        got = await asyncio.to_thread(webhook.wait, 1)
    finally:
        await notifier.stop()
    assert len(got) == 1
    msg = got[0]
    assert "finished" in msg["title"] and "All done." in msg["message"]
    assert store.notifications(rid)[0]["delivered"] is not None


async def test_a_message_being_sent_when_the_server_stops_is_marked_and_not_sent_again(
        tmp_path: Path, webhook: Webhook) -> None:
    """Stopping while the receiver has the message but has not answered yet: the send finishes and
    is recorded, so the next start does not notify the user a second time."""
    store = RunStore(tmp_path / "h.sqlite")
    notifier = Notifier(store, [webhook.url], lambda: PUBLIC)
    rid = _run(store, "completed", summary="All done.")
    webhook.answer.clear()
    webhook.start()
    notifier.start()
    notifier.enqueue(rid, "completed")
    assert len(await asyncio.to_thread(webhook.wait, 1)) == 1   # arrived; its reply is held back
    asyncio.get_running_loop().call_soon(webhook.answer.set)   # the receiver answers once stop() began
    await notifier.stop()
    assert store.notifications(rid)[0]["delivered"] is not None
    assert store.due_notifications() == []


async def test_mail_through_smtp(tmp_path: Path) -> None:
    box = Mailbox()
    port = free_port()
    smtp = Controller(box, hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        store = RunStore(tmp_path / "h.sqlite")
        url = f"mailto://127.0.0.1:{port}?from=handoff@example.org&to=ada@example.org"
        notifier = Notifier(store, [url], lambda: PUBLIC, retry_base=0.2)
        rid = _run(store, "failed", error="kernel died twice in step 3; see the notebook")
        notifier.enqueue(rid, "failed")
        assert await notifier.deliver_due() == 1
    finally:
        smtp.stop()
    assert len(box.messages) == 1
    env = box.messages[0]
    assert env.rcpt_tos == ["ada@example.org"]
    mail = message_from_bytes(env.content)
    assert "failed" in mail["Subject"]
    text = "".join(p.get_payload(decode=True).decode() for p in mail.walk() if p.get_content_type() == "text/plain")
    assert "kernel died twice" in text and f"/handoff/runs/{rid}" in text
    # the SMTP URL (it may hold a password) is never written to the database
    assert url not in (tmp_path / "h.sqlite").read_bytes().decode(errors="replace")
    assert store.notifications(rid)[0]["target"] == target_key(url)


def test_pending_notifications_survive_a_killed_server(webhook: Webhook) -> None:
    """Queued while the receiver was down, then the server was SIGKILLed: the next start sends it."""
    srv = JupyterServerProcess(extra_args=[f"--HandoffApp.notify_urls={webhook.url}",
                                           "--HandoffApp.notify_retry_seconds=0.2"])
    try:
        srv.start()
        store = RunStore(srv.data_dir / "handoff.sqlite")  # a second writer, like the runner thread
        rid = _run(store, "completed", summary="RMSE 3.1 on the held-out month.")
        notifier = Notifier(store, [webhook.url], lambda: srv.url)
        notifier.enqueue(rid, "completed")  # committed; never delivered by this process
        store.close()
        srv.kill()
        webhook.start()
        assert webhook.received == []
        srv.restart()
        got = webhook.wait(1)
        assert len(got) == 1, srv.log()[-3000:]
        assert "RMSE 3.1" in got[0]["message"] and f"/handoff/runs/{rid}" in got[0]["message"]
        time.sleep(0.5)
        assert len(webhook.received) == 1  # delivered once, marked, not repeated
        rows = RunStore(srv.data_dir / "handoff.sqlite").notifications(rid)
        assert rows[0]["delivered"] is not None
    finally:
        srv.cleanup()


def test_same_state_twice_notifies_once(tmp_path: Path, webhook: Webhook) -> None:
    """A run resumed after a restart re-enters waiting_input with the same question: one message."""
    store = RunStore(tmp_path / "h.sqlite")
    notifier = Notifier(store, [webhook.url], lambda: PUBLIC)
    rid = _run(store, "waiting_input", question="Keep the outliers?")
    assert len(notifier.enqueue(rid, "waiting_input")) == 1
    assert notifier.enqueue(rid, "waiting_input") == []
    st = store.get_state(rid)
    st.question = "And the duplicates?"
    store.save_state(st)
    assert len(notifier.enqueue(rid, "waiting_input")) == 1  # a new question is news


@pytest.mark.parametrize("argv", [
    ['--HandoffApp.notify_urls=["json://127.0.0.1:9/a", "mailto://u:pw@127.0.0.1?to=a@x.org,b@x.org"]'],
    ["--HandoffApp.notify_urls=json://127.0.0.1:9/a,mailto://u:pw@127.0.0.1?to=a@x.org,b@x.org"],
    ["--HandoffApp.notify_urls=json://127.0.0.1:9/a  mailto://u:pw@127.0.0.1?to=a@x.org,b@x.org"],
    ["--HandoffApp.notify_urls=json://127.0.0.1:9/a", "--HandoffApp.notify_urls=mailto://u:pw@127.0.0.1?to=a@x.org,b@x.org"],
])
def test_notify_urls_given_once_on_the_command_line_keep_every_target(argv: list[str], caplog: Any) -> None:
    """One --HandoffApp.notify_urls holding a JSON list or several URLs is not read as one URL;
    a comma inside a URL (several mail recipients) stays; each target's scheme is logged."""
    import logging

    from traitlets.config.loader import KVArgParseConfigLoader

    from jupyter_server_ext.app import HandoffApp
    app = HandoffApp(config=KVArgParseConfigLoader(argv).load_config())
    assert app.notify_urls == ["json://127.0.0.1:9/a", "mailto://u:pw@127.0.0.1?to=a@x.org,b@x.org"]
    app.log = logging.getLogger("handoff-test")
    with caplog.at_level(logging.INFO, logger="handoff-test"):
        app._log_notify_targets()
    assert "target 1 of 2: json://" in caplog.text and "target 2 of 2: mailto://" in caplog.text
    assert "pw" not in caplog.text     # schemes only: a URL may hold a password


def test_notify_urls_bad_json_says_how_to_write_it() -> None:
    from traitlets import TraitError

    from jupyter_server_ext.app import HandoffApp
    app = HandoffApp()
    with pytest.raises(TraitError, match="not valid JSON.*comma-separated"):
        app.notify_urls = '["json://a",'  # type: ignore[assignment]  # the trait parses strings
    app.notify_urls = "json://a, json://b"  # type: ignore[assignment]  # a plain string (config file) works too
    assert app.notify_urls == ["json://a", "json://b"]
