"""A long run that starts in the notebook and finishes on a real Jupyter Server, switching wire
format on the way, against the loopback model with a small window (see tests/harness/long_run_model.py).

Locally (OpenAI format, say) the run compacts and is refused once by the window it did not know;
on the server (``c.HandoffApp.context_tokens`` names the window, the model speaks the other
format) it goes on from the summary it brought and finishes knowing every fact. Usage travels
with the state: the server's total is the sum of every reply, local and remote.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from handoff_magic.agent import AgentLoop, InProcessExecutor, make_provider
from handoff_magic.state import Budgets, RunState, describe_usage
from jupyter_server_ext.store import RunStore
from tests.harness.fake_llm import FakeLLM
from tests.harness.long_run_model import fact_value, facts_in, long_run_model, step_code
from tests.harness.runner_helpers import all_events, capture_bundle, hand_off, wait_event, wait_status, write_script
from tests.harness.server_process import JupyterServerProcess, Webhook

pytestmark = pytest.mark.timeout(600)

WINDOW = 12_000
STEPS = 62
LOCAL_STEPS = 30
OTHER = {"openai": "anthropic", "anthropic": "openai"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return capture_bundle(tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook().start()
    yield hook
    hook.stop()


def _server(llm: FakeLLM, webhook: Webhook, *extra: str) -> JupyterServerProcess:
    return JupyterServerProcess(extra_args=[f"--HandoffApp.context_tokens={WINDOW}",
                                            f"--HandoffApp.notify_urls={webhook.url}", *extra],
                                env={**llm.env(), "HANDOFF_MODEL_BACKOFF": "0.05"}).start()


TOKEN_CAP = 2000


@pytest.fixture(scope="module")
def watched(webhook: Webhook) -> Iterator[JupyterServerProcess]:
    """A server that calls a run stuck after 2 s without progress and caps a run's tokens."""
    with FakeLLM() as llm:
        srv = _server(llm, webhook, "--HandoffApp.stuck_after=2", f"--HandoffApp.max_tokens_per_run={TOKEN_CAP}")
        try:
            yield srv
        finally:
            srv.cleanup()


def _notice(webhook: Webhook, run_id: str, word: str) -> dict[str, Any]:
    return webhook.wait_for(lambda m: run_id in m.get("title", "") and word in m.get("title", ""),
                            f"{word!r} for run {run_id}")


@pytest.mark.parametrize("local_api", ["openai", "anthropic"])
def test_long_run_compacts_locally_and_finishes_after_a_handoff_in_the_other_format(
        local_api: str, bundle: tuple[Path, dict[str, Any]], webhook: Webhook) -> None:
    # an OpenAI-compatible server minting ids Anthropic would refuse
    ids = (lambda n: f"functions.run_python:{n}") if local_api == "openai" else (lambda n: None)
    with FakeLLM(window=WINDOW, responder=long_run_model(STEPS, ids)) as llm:
        base = llm.openai_base_url if local_api == "openai" else llm.anthropic_base_url
        provider = make_provider(f"{local_api}:fake-model", api_key=llm.api_key, base_url=base, backoff_base=0.01)
        state = RunState(goal="collect the facts", budgets=Budgets(max_steps=LOCAL_STEPS))
        AgentLoop(state, provider, InProcessExecutor(InteractiveShell.instance())).run()
        assert state.status == "paused" and state.steps == LOCAL_STEPS
        assert any(e.type == "compacted" for e in state.events)
        refused = [i for i, r in enumerate(llm.requests) if r.over_window]
        assert refused, "the local part never met the window"
        local_requests = len(llm.requests)

        srv = _server(llm, webhook, f"--HandoffApp.model={OTHER[local_api]}:fake-model")
        try:
            bdir, manifest = bundle
            manifest = json.loads(json.dumps(manifest))
            state.budgets.max_steps = 100
            manifest["run"] = {**state.to_dict(), "id": uuid.uuid4().hex[:12]}
            run_id = hand_off(srv, bdir, manifest)
            summary = wait_status(srv, run_id, timeout=400)
            assert summary["status"] == "completed", (summary, srv.log()[-3000:])
            remote = llm.requests[local_requests:]
            assert {r.api for r in remote} == {OTHER[local_api]}
            # no request went over the window after the first refusal, here or there
            assert not any(r.over_window for r in llm.requests[refused[0] + 1:])
            assert max(r.tokens for r in llm.requests[refused[0] + 1:]) <= WINDOW
            events = all_events(srv, run_id)
            assert any(e["type"] == "compacted" for e in events)      # the server compacted too
            # the final answer knows facts from turns compacted on the laptop and on the server
            final = facts_in(summary["summary"])
            assert set(range(1, STEPS + 1)) <= set(final), sorted(set(range(1, STEPS + 1)) - set(final))
            assert final[1] == str(fact_value(1))
            # usage: the server's total is every reply's usage, local and remote
            total = llm.reported_usage()
            used = summary["usage"]
            assert {k: used[k] for k in total} == total
            assert used["cached_tokens"] > 0
            notice = _notice(webhook, run_id, "finished")
            assert f"Usage: {describe_usage(used)}" in notice["message"]
            page = srv.client.get(f"/handoff/runs/{run_id}").text
            assert describe_usage(used) in page
            nb = (srv.root_dir / "handoff-runs" / run_id / "result.ipynb").read_text()
            assert "Context compacted" in nb and "Summary the model continues from" in nb
        finally:
            srv.cleanup()


def test_a_run_without_progress_notifies_stuck_with_links_to_act(
        bundle: tuple[Path, dict[str, Any]], webhook: Webhook, watched: JupyterServerProcess, tmp_path: Path) -> None:
    script = write_script(tmp_path / "slow.json", [
        {"tool_calls": [{"name": "run_python", "arguments": {"code": "print('quick')"}}]},
        {"tool_calls": [{"name": "run_python", "arguments": {"code": "import time; time.sleep(60)"}}]},
        {"tool_calls": [{"name": "finish", "arguments": {"summary": "never"}}]}])
    srv = watched
    bdir, manifest = bundle
    run_id = hand_off(srv, bdir, manifest, model=f"scripted:{script}")

    def stuck() -> list[dict[str, Any]]:
        return [m for m in webhook.received if run_id in m["title"] and "is stuck" in m["title"]]

    store = RunStore(srv.data_dir / "handoff.sqlite")   # notices are committed there when queued

    def queued() -> int:
        return sum(r["kind"] == "stuck" for r in store.notifications(run_id))
    wait_event(srv, run_id, lambda e: "time.sleep(60)" in str(e["data"].get("arguments")), "the hanging step")
    before = queued()   # a slow kernel start may have been a stall of its own, queued but maybe not yet sent
    webhook.wait_for(lambda _msg: len(stuck()) > before, "stuck notice for the hanging step")
    notice = stuck()[-1]
    assert "No progress for" in notice["message"]
    assert f"/handoff/runs/{run_id}" in notice["message"]          # status page: answer or cancel
    assert f"%pull {run_id}" in notice["message"]
    time.sleep(3)                                                    # once per stall
    assert queued() == len(stuck()) == before + 1
    summary = srv.client.get(f"/handoff/api/runs/{run_id}").json()
    assert summary["status"] == "running" and summary["usage"]["estimated"] is True
    assert srv.client.post(f"/handoff/api/runs/{run_id}/cancel").status_code in (200, 202)
    assert wait_status(srv, run_id, timeout=60)["status"] == "cancelled"


def test_max_tokens_per_run_pauses_at_the_step_that_reaches_it_and_asks(
        bundle: tuple[Path, dict[str, Any]], webhook: Webhook, watched: JupyterServerProcess, tmp_path: Path) -> None:
    script = write_script(tmp_path / "many.json", [
        {"tool_calls": [{"name": "run_python", "arguments": {"code": step_code(n)}}]} for n in range(1, 7)]
        + [{"tool_calls": [{"name": "finish", "arguments": {"summary": "six facts"}}]}])
    srv = watched
    bdir, manifest = bundle
    run_id = hand_off(srv, bdir, manifest, model=f"scripted:{script}")
    summary = wait_status(srv, run_id, statuses=("waiting_input", "completed", "failed"), timeout=120)
    assert summary["status"] == "waiting_input", summary
    assert f"of {TOKEN_CAP:,} tokens" in summary["question"] and "continue" in summary["question"]
    totals = [e["data"]["total"]["total_tokens"] for e in all_events(srv, run_id) if e["type"] == "usage"]
    # paused at the first step whose running total reached the cap, not one step later
    assert totals[-1] >= TOKEN_CAP and all(t < TOKEN_CAP for t in totals[:-1])
    assert summary["steps"] == len(totals)
    notice = _notice(webhook, run_id, "needs your input")
    assert "token budget reached" in notice["message"]
    assert srv.client.post(f"/handoff/api/runs/{run_id}/answer", json={"answer": "continue"}).status_code in (200, 202)
    deadline = time.monotonic() + 60
    while srv.client.get(f"/handoff/api/runs/{run_id}").json()["steps"] <= len(totals):
        assert time.monotonic() < deadline, "the answer did not resume the run"
        time.sleep(0.2)
    srv.client.post(f"/handoff/api/runs/{run_id}/cancel")
