"""`jupyter handoff mcp` driven by the MCP SDK's own stdio client against a real Jupyter Server.

The client starts the real command as a subprocess in a project directory (as Claude Code or
Cursor would), lists the tools, delegates a task with a file (start_run), follows it to its
question, answers, follows it to completion and reads the diff. The server's model is the
loopback FakeLLM, reached with the key in the server's environment only.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from tests.harness.fake_llm import FakeLLM, Turn
from tests.harness.server_process import JupyterServerProcess

TOOLS = {"list_runs", "show_run", "follow_run", "answer_run", "cancel_run", "diff_run", "start_run"}


@pytest.fixture(scope="module")
def server(llm: FakeLLM) -> Iterator[JupyterServerProcess]:
    srv = JupyterServerProcess(env=llm.env(), extra_args=["--HandoffApp.model=openai:fake-model"]).start()
    try:
        yield srv
    finally:
        srv.cleanup()


@asynccontextmanager
async def session(server: JupyterServerProcess, project: Path) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "handoff_magic.cli", "mcp"], cwd=str(project),
        env={"HANDOFF_SERVER_URL": server.url, "HANDOFF_TOKEN": server.token,
             "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
             "JUPYTER_CONFIG_DIR": os.environ["JUPYTER_CONFIG_DIR"]})
    with open(project.parent / "mcp-stderr.log", "w") as errlog:  # noqa: ASYNC230 - opened once, before any await
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s


async def call(s: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    result = await s.call_tool(tool, args)
    assert not result.is_error, result.content
    data = result.structured_content
    assert isinstance(data, dict)
    return data


async def test_an_agent_delegates_a_task_with_a_file_and_sees_it_through(
        server: JupyterServerProcess, llm: FakeLLM, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "sales.csv").write_text("region,amount\nnorth,10\nsouth,32\n")
    (project / "data" / ".env").write_text("OPENAI_API_KEY=sk-do-not-send\n")
    (tmp_path / "elsewhere.txt").write_text("not part of the project")
    code = ("import csv\nrows = list(csv.DictReader(open('data/sales.csv')))\n"
            "print('total', sum(int(r['amount']) for r in rows))")
    llm.push(Turn("reading the sales", [("run_python", {"code": code})]),
             Turn("", [("ask_user", {"question": "Write the total to total.txt?"})]),
             Turn("", [("run_python", {"code": "open('total.txt', 'w').write('42')"})]),
             Turn("", [("finish", {"summary": "total is 42, in total.txt"})]))

    async with session(server, project) as s:
        listed = await s.list_tools()
        names = {t.name for t in listed.tools}
        assert TOOLS <= names
        for tool in listed.tools:   # written for a model: each says what it does and returns
            assert tool.description and len(tool.description) > 80

        outside = await s.call_tool("start_run", {"goal": "x", "files": [str(tmp_path / "elsewhere.txt")]})
        assert outside.is_error and "outside" in outside.content[0].text

        started = await call(s, "start_run", goal="Sum the sales in data/sales.csv",
                             files=["data"], model="openai:whatever-the-agent-likes")
        run_id = started["id"]
        assert started["files_sent"] == ["data/sales.csv"]
        assert [f["path"] for f in started["files_left_out"]] == ["data/.env"]

        followed = await call(s, "follow_run", run_id=run_id, after=0, wait_seconds=60)
        assert followed["status"] == "waiting_input"
        assert followed["question"] == "Write the total to total.txt?"
        texts = "\n".join(e["text"] for e in followed["events"])
        assert "total 42" in texts
        seqs = [e["seq"] for e in followed["events"]]
        assert seqs == sorted(seqs) and followed["last_seq"] == seqs[-1]

        shown = await call(s, "show_run", run_id=run_id)
        assert shown["status"] == "waiting_input" and "answer_run" in shown["next"]

        await call(s, "answer_run", run_id=run_id, answer="yes please")
        done = await call(s, "follow_run", run_id=run_id, after=followed["last_seq"], wait_seconds=60)
        assert done["status"] == "completed", done
        assert done["summary"] == "total is 42, in total.txt"
        assert all(e["seq"] > followed["last_seq"] for e in done["events"])

        diff = await call(s, "diff_run", run_id=run_id)
        assert [f["path"] for f in diff["files"] if f.get("change") == "added"] == ["total.txt"]
        assert "total.txt" in diff["text"]

        runs = await call(s, "list_runs")
        assert run_id in [r["id"] for r in runs["runs"]]

        again = await s.call_tool("cancel_run", {"run_id": run_id})
        assert again.is_error and "already ended" in again.content[0].text

    # the server's model and key did the work; the agent's preference and no key travelled
    bodies = [r for r in llm.requests if r.api == "openai"]
    assert bodies and all(r.headers["authorization"] == f"Bearer {llm.api_key}" for r in bodies)
    assert all(r.body["model"] == "fake-model" for r in bodies)
    assert "sk-do-not-send" not in json.dumps([r.body for r in bodies])


async def test_inline_files_and_cancel(server: JupyterServerProcess, llm: FakeLLM, tmp_path: Path) -> None:
    llm.push(Turn("", [("ask_user", {"question": "Which column?"})]))
    async with session(server, tmp_path) as s:
        started = await call(s, "start_run", goal="look at notes.md", files={"docs/notes.md": "# notes\n"})
        assert started["files_sent"] == ["docs/notes.md"]
        waiting = await call(s, "follow_run", run_id=started["id"], wait_seconds=60)
        assert waiting["status"] == "waiting_input"
        await call(s, "cancel_run", run_id=started["id"])
        ended = await call(s, "follow_run", run_id=started["id"], after=waiting["last_seq"], wait_seconds=60)
        assert ended["status"] == "cancelled"
        bad = await s.call_tool("start_run", {"goal": "x", "files": {"../escape.txt": "no"}})
        assert bad.is_error and "outside" in bad.content[0].text
