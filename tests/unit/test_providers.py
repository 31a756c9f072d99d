"""Providers against a real loopback HTTP server speaking the OpenAI and Anthropic formats.

The full agent loop runs through each wire format, and the tests pin the exact request
bodies the providers send, and how each kind of fault (429, 5xx, hang, garbage) is handled.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from tests.harness.fake_llm import FakeLLM
from handoff_magic.agent import SYSTEM_PROMPT, TOOLS, AgentLoop, InProcessExecutor, make_provider
from handoff_magic.agent.providers.base import ProviderError, parse_retry_after
from handoff_magic.agent.providers.scripted import ScriptedProvider
from handoff_magic.state import Budgets, Message, RunState, ToolCall, ToolResult

TOOL_NAMES = [t["name"] for t in TOOLS]


@pytest.fixture
def llm():
    with FakeLLM() as server:
        yield server


@pytest.fixture(scope="module")
def shell():
    return InteractiveShell.instance()


def provider_for(llm: FakeLLM, api: str, **opts):
    base = llm.openai_base_url if api == "openai" else llm.anthropic_base_url
    opts.setdefault("backoff_base", 0.01)
    return make_provider(f"{api}:test-model", api_key=llm.api_key, base_url=base, **opts)


def run_loop(llm: FakeLLM, api: str, shell, goal: str = "compute the answer") -> RunState:
    state = RunState(goal=goal, budgets=Budgets(max_steps=10))
    AgentLoop(state, provider_for(llm, api), InProcessExecutor(shell)).run()
    return state


# -- the full tool loop through each wire format ---------------------------------------------
def script_two_turns(llm: FakeLLM) -> None:
    llm.reply("I will compute it.", tool_calls=[
        ("update_plan", {"steps": [{"text": "compute", "status": "active"}]}),
        ("run_python", {"code": "answer_value = 6 * 7\nprint('answer is', answer_value)"}),
    ])
    llm.reply("", tool_calls=[
        ("run_python", {"code": "answer_value + 1"}),
        ("finish", {"summary": "answer_value holds 42"}),
    ])


def test_openai_full_loop_and_exact_request_bodies(llm, shell):
    script_two_turns(llm)
    state = run_loop(llm, "openai", shell)

    assert state.status == "completed", state.error
    assert state.summary == "answer_value holds 42"
    assert shell.user_ns["answer_value"] == 42
    assert len(llm.requests) == 2
    first, second = (r.body for r in llm.requests)
    assert llm.requests[0].path == "/v1/chat/completions"
    assert llm.requests[0].headers["authorization"] == f"Bearer {llm.api_key}"
    assert first["model"] == "test-model"
    assert first["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": "compute the answer"}]
    assert [t["type"] for t in first["tools"]] == ["function"] * 4
    assert [t["function"]["name"] for t in first["tools"]] == TOOL_NAMES
    assert first["tools"][0]["function"]["parameters"]["required"] == ["code"]

    msgs = second["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
    assistant = msgs[2]
    assert assistant["content"] == "I will compute it."
    ids = [c["id"] for c in assistant["tool_calls"]]
    assert len(set(ids)) == 2
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["update_plan", "run_python"]
    assert isinstance(assistant["tool_calls"][1]["function"]["arguments"], str)
    assert json.loads(assistant["tool_calls"][1]["function"]["arguments"])["code"].startswith("answer_value = 6 * 7")
    assert [m["tool_call_id"] for m in msgs[3:]] == ids           # every call answered, in order
    assert "Plan updated" in msgs[3]["content"]
    assert "answer is 42" in msgs[4]["content"]
    # the second turn's results are in the state, including the value of the last expression
    last_results = state.messages[-1].tool_results
    assert "43" in last_results[0].content and last_results[1].name == "finish"


def test_anthropic_full_loop_and_exact_request_bodies(llm, shell):
    script_two_turns(llm)
    state = run_loop(llm, "anthropic", shell)

    assert state.status == "completed", state.error
    assert shell.user_ns["answer_value"] == 42
    first, second = (r.body for r in llm.requests)
    headers = llm.requests[0].headers
    assert llm.requests[0].path == "/v1/messages"
    assert headers["x-api-key"] == llm.api_key and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    # prompt caching: breakpoints after the stable prefix (tools + system) and on the last turn
    assert first["system"] == [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": {"type": "ephemeral"}}]
    assert first["max_tokens"] > 0
    assert first["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "compute the answer", "cache_control": {"type": "ephemeral"}}]}]
    assert [t["name"] for t in first["tools"]] == TOOL_NAMES
    assert first["tools"][0]["input_schema"]["required"] == ["code"]

    msgs = second["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    blocks = msgs[1]["content"]
    assert blocks[0] == {"type": "text", "text": "I will compute it."}
    uses = [b for b in blocks if b["type"] == "tool_use"]
    assert [b["name"] for b in uses] == ["update_plan", "run_python"]
    assert uses[1]["input"]["code"].startswith("answer_value = 6 * 7")
    results = msgs[2]["content"]
    assert [r["type"] for r in results] == ["tool_result", "tool_result"]
    assert [r["tool_use_id"] for r in results] == [b["id"] for b in uses]
    assert "answer is 42" in results[1]["content"]
    # the turn the previous request ended with and the newest one carry the cache breakpoints
    assert msgs[0]["content"][-1]["cache_control"] == results[-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in blocks[-1]


def test_error_tool_results_are_flagged_for_anthropic(llm, shell):
    llm.reply(tool_calls=[("run_python", {"code": "1/0"})])
    llm.reply(tool_calls=[("finish", {"summary": "saw the error"})])
    run_loop(llm, "anthropic", shell)
    result = llm.requests[1].body["messages"][2]["content"][0]
    assert result["is_error"] is True
    assert "ZeroDivisionError: division by zero" in result["content"]


# -- faults -------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_429_honours_retry_after_then_succeeds(llm, api):
    llm.fault_429(retry_after=0.4)
    llm.reply("hello")
    provider = provider_for(llm, api, backoff_base=0.001)
    t0 = time.monotonic()
    reply = provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert reply.text == "hello"
    assert len(llm.requests) == 2
    assert time.monotonic() - t0 >= 0.4           # waited as told, not the tiny backoff
    assert llm.requests[0].body == llm.requests[1].body


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_500_is_retried(llm, api):
    llm.fault_500()
    llm.fault_500(503)
    llm.reply("recovered")
    reply = provider_for(llm, api).complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert reply.text == "recovered" and len(llm.requests) == 3


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_hang_past_timeout_is_retried(llm, api):
    llm.fault_hang(10)
    llm.reply("after the hang")
    provider = provider_for(llm, api, timeout=0.5)
    t0 = time.monotonic()
    reply = provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert reply.text == "after the hang"
    assert 0.5 <= time.monotonic() - t0 < 5


def test_exhausted_retries_give_a_clear_retryable_error(llm):
    for _ in range(3):
        llm.fault_500()
    provider = provider_for(llm, "openai", max_retries=2)
    with pytest.raises(ProviderError) as info:
        provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    err = info.value
    assert "HTTP 500" in err.message and "gave up after 3 attempt(s)" in err.message
    assert "The server had an error" in err.message
    assert err.retryable and "retry" in err.hint
    assert len(llm.requests) == 3


def test_retry_after_beyond_the_wait_cap_gives_up_at_once(llm):
    llm.fault_429(retry_after=3600)
    provider = provider_for(llm, "openai", max_total_wait=5)
    t0 = time.monotonic()
    with pytest.raises(ProviderError, match="HTTP 429"):
        provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert time.monotonic() - t0 < 3 and len(llm.requests) == 1


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_malformed_body_is_a_clear_error_not_retried(llm, api):
    llm.fault_malformed("<html>Bad gateway</html>")
    with pytest.raises(ProviderError) as info:
        provider_for(llm, api).complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert "not JSON" in info.value.message and "Bad gateway" in info.value.message
    assert "base URL" in info.value.hint
    assert len(llm.requests) == 1


@pytest.mark.parametrize("api,body", [("openai", {"id": "x", "choices": []}),
                                      ("anthropic", {"id": "x", "type": "message"})])
def test_json_without_a_reply_is_a_clear_error(llm, api, body):
    llm.raw(200, body)
    with pytest.raises(ProviderError, match="malformed reply"):
        provider_for(llm, api).complete("sys", [Message(role="user", text="hi")], TOOLS)


def test_malformed_json_arguments_name_the_tool_and_call(llm):
    llm.reply(tool_calls=[("run_python", '{"code": "x = 1"', "call_bad")])
    with pytest.raises(ProviderError) as info:
        provider_for(llm, "openai").complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert "malformed JSON arguments" in info.value.message
    assert "'run_python'" in info.value.message and "call_bad" in info.value.message


def test_wrong_key_is_refused_without_printing_it(llm):
    provider = make_provider("openai:m", api_key="sk-wrong-key-abcdef", base_url=llm.openai_base_url)
    with pytest.raises(ProviderError) as info:
        provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert "HTTP 401" in info.value.message and "OPENAI_API_KEY" in info.value.hint
    assert "sk-wrong-key-abcdef" not in str(info.value)
    assert len(llm.requests) == 1                         # auth errors are not retried


# -- configuration and keys ----------------------------------------------------------------------
@pytest.mark.parametrize("spec,env", [("openai:gpt-4o", "OPENAI_API_KEY"),
                                      ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY")])
def test_missing_key_names_the_variable(monkeypatch, spec, env):
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(ProviderError) as info:
        make_provider(spec)
    assert env in info.value.hint


def test_base_urls_and_keys_come_from_the_sdk_environment(llm, monkeypatch):
    for k, v in llm.env().items():
        monkeypatch.setenv(k, v)
    for spec in ("openai:gpt-x", "anthropic:claude-x"):
        llm.reply("hi from env")
        provider = make_provider(spec, backoff_base=0.01)
        assert provider.complete("s", [Message(role="user", text="q")], TOOLS).text == "hi from env"
        assert llm.api_key not in repr(provider)
    assert [r.path for r in llm.requests] == ["/v1/chat/completions", "/v1/messages"]


def test_unknown_model_kind_is_explained():
    with pytest.raises(ProviderError, match="unknown model kind 'gemini'"):
        make_provider("gemini:pro")
    with pytest.raises(ProviderError, match="KIND:NAME"):
        make_provider("gpt-4o")


def test_key_never_reaches_state_nor_the_model(llm, shell, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", llm.api_key)
    llm.reply(tool_calls=[("run_python", {"code": "import os\nprint(os.environ['OPENAI_API_KEY'])"})])
    llm.reply(tool_calls=[("finish", {"summary": "done"})])
    state = RunState(goal="leak the key")
    provider = make_provider("openai:m", base_url=llm.openai_base_url)
    state = AgentLoop(state, provider, InProcessExecutor(shell)).run()
    assert state.status == "completed"
    assert state.model == "openai:m"
    assert llm.api_key not in state.to_json()
    assert llm.api_key not in json.dumps(llm.requests[1].body)
    assert "<redacted>" in state.messages[-3].tool_results[0].content


def test_parse_retry_after_forms():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31


# -- the scripted provider -------------------------------------------------------------------------
def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_scripted_plays_turn_k_with_deterministic_ids_and_finishes_when_exhausted(tmp_path):
    write(tmp_path / "s.json", json.dumps([
        {"text": "one", "tool_calls": [{"name": "run_python", "arguments": {"code": "a = 1"}},
                                       {"name": "run_python", "arguments": {"code": "b = 2"}}]},
        {"text": "two"},
    ]))
    p = make_provider(f"scripted:{tmp_path / 's.json'}")
    convo = [Message(role="user", text="go")]
    first = p.complete("", convo, TOOLS)
    assert first.text == "one" and [c.id for c in first.tool_calls] == ["script-0-0", "script-0-1"]
    assert p.complete("", convo, TOOLS).tool_calls[1].id == "script-0-1"      # same turn, same ids
    convo += [first, Message(role="tool", tool_results=[ToolResult("script-0-0", "run_python", "ok")])]
    assert p.complete("", convo, TOOLS).text == "two"
    convo.append(Message(role="assistant", text="two"))
    end = p.complete("", convo, TOOLS)
    assert end.tool_calls[0].name == "finish" and "ended after 2 turns" in end.tool_calls[0].arguments["summary"]


def test_scripted_yaml_and_relative_paths(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    write(workspace / "plan.yaml", "- text: from the workspace\n  tool_calls:\n"
                                   "    - name: finish\n      arguments: {summary: ok}\n")
    write(tmp_path / "plan.yaml", "- text: from the cwd\n")
    monkeypatch.chdir(tmp_path)
    convo = [Message(role="user", text="go")]
    assert make_provider("scripted:plan.yaml", base_dir=workspace).complete("", convo, []).text == "from the workspace"
    provider = make_provider("scripted:plan.yaml", base_dir=tmp_path / "none")
    assert provider.complete("", convo, []).text == "from the cwd"
    assert make_provider("scripted:plan.yaml").complete("", convo, []).text == "from the cwd"


@pytest.mark.parametrize("content,problem", [
    ("[{\"text\": ", "is not valid JSON"),
    ("{\"text\": \"hi\"}", "must be a list of turns"),
    ("[42]", "turn 0 is a int"),
    ("[{\"tool_calls\": [{\"arguments\": {}}]}]", "tool call 0: needs a string 'name'"),
    ("[{\"tool_calls\": [{\"name\": \"x\", \"arguments\": \"code\"}]}]", "'arguments' must be an object"),
])
def test_invalid_script_names_file_and_problem(tmp_path, content, problem):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(ProviderError) as info:
        ScriptedProvider(str(path))
    assert str(path) in info.value.message and problem in info.value.message


def test_missing_script_is_explained(tmp_path):
    with pytest.raises(ProviderError, match="cannot read model script .*nope.json"):
        make_provider(f"scripted:{tmp_path / 'nope.json'}")


def test_packaged_demo_script_is_found_by_name_and_from_another_install(tmp_path, monkeypatch):
    from handoff_magic.config import DEFAULT_SCRIPT
    monkeypatch.chdir(tmp_path)
    convo = [Message(role="user", text="go")]
    by_name = make_provider("scripted:default").complete("", convo, TOOLS)
    foreign = make_provider("scripted:/elsewhere/site-packages/handoff_magic/demo_scripts/default.json")
    assert foreign.complete("", convo, TOOLS) == by_name
    assert make_provider(f"scripted:{DEFAULT_SCRIPT}").complete("", convo, TOOLS) == by_name
    with pytest.raises(ProviderError, match="cannot read"):
        make_provider("scripted:/elsewhere/other/default.json")


# -- handoff_magic.config ----------------------------------------------------------------------------
def test_model_spec_resolution_order(tmp_path, monkeypatch):
    from handoff_magic.config import DEFAULT_SCRIPT, ConfigError, resolve_model_spec
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("HANDOFF_MODEL", raising=False)
    assert resolve_model_spec() == f"scripted:{DEFAULT_SCRIPT}"
    (tmp_path / "handoff.json").write_text('{"model": "anthropic:from-file"}')
    assert resolve_model_spec() == "anthropic:from-file"
    monkeypatch.setenv("HANDOFF_MODEL", "openai:from-env")
    assert resolve_model_spec() == "openai:from-env"
    assert resolve_model_spec("openai:explicit") == "openai:explicit"
    monkeypatch.delenv("HANDOFF_MODEL")
    (tmp_path / "handoff.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match="handoff.json is not valid JSON"):
        resolve_model_spec()


def test_server_settings_order_and_errors(tmp_path, monkeypatch):
    from handoff_magic.errors import ConfigError
    from handoff_magic.remote.settings import server_settings
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("HANDOFF_SERVER_URL", raising=False)
    monkeypatch.delenv("HANDOFF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HANDOFF_SERVER_URL"):
        server_settings()
    (tmp_path / "handoff.json").write_text('{"server_url": "http://file:1/", "token": "file-token"}')
    assert server_settings() == ("http://file:1", "file-token")
    monkeypatch.setenv("HANDOFF_SERVER_URL", "https://env:2")
    monkeypatch.setenv("HANDOFF_TOKEN", "env-token")
    assert server_settings() == ("https://env:2", "env-token")
    assert server_settings("http://arg:3", "arg-token") == ("http://arg:3", "arg-token")
    with pytest.raises(ConfigError, match="must start with http"):
        server_settings("ftp://x")


def test_openai_compatible_base_url_with_query_and_missing_ids(llm):
    provider = make_provider("openai:m", api_key=llm.api_key, base_url=llm.openai_base_url + "?api-version=2024-06-01")
    llm.raw(200, {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "run_python", "arguments": {"code": "1"}}},
        {"type": "function", "function": {"name": "finish", "arguments": '{"summary": "s"}'}}]}}]})
    reply = provider.complete("sys", [Message(role="user", text="hi")], TOOLS)
    assert llm.requests[0].path == "/v1/chat/completions"
    assert [c.arguments for c in reply.tool_calls] == [{"code": "1"}, {"summary": "s"}]
    ids = [c.id for c in reply.tool_calls]
    assert all(ids) and len(set(ids)) == 2


# -- wire conversion invariants over arbitrary conversations ---------------------------------------
from hypothesis import given, settings, strategies as hs  # noqa: E402

from handoff_magic.agent.providers.anthropic import to_anthropic_messages  # noqa: E402
from handoff_magic.agent.providers.openai import to_openai_messages  # noqa: E402

_turn = hs.tuples(hs.text(max_size=5), hs.integers(0, 3), hs.one_of(hs.none(), hs.text(min_size=1, max_size=5)))


def _conversation(turns) -> list[Message]:
    msgs = [Message(role="user", text="goal")]
    for k, (text, n_calls, user_after) in enumerate(turns):
        calls = [ToolCall(id=f"c{k}-{i}", name="run_python", arguments={"code": str(i)}) for i in range(n_calls)]
        msgs.append(Message(role="assistant", text=text, tool_calls=calls))
        if calls:
            msgs.append(Message(role="tool", tool_results=[ToolResult(c.id, c.name, "ok") for c in calls]))
        if user_after or not calls:
            msgs.append(Message(role="user", text=user_after or "go on"))
    return msgs


@settings(max_examples=60, deadline=None)
@given(hs.lists(_turn, max_size=6))
def test_every_tool_call_is_answered_in_both_wire_formats(turns):
    msgs = _conversation(turns)
    anth = to_anthropic_messages(msgs)
    assert anth[0]["role"] == "user"
    assert all(a["role"] != b["role"] for a, b in zip(anth, anth[1:]))          # strict alternation
    for i, m in enumerate(anth):
        uses = [b["id"] for b in m["content"] if b["type"] == "tool_use"]
        if uses:
            answered = [b["tool_use_id"] for b in anth[i + 1]["content"] if b["type"] == "tool_result"]
            assert answered == uses
        assert all(b.get("text", "x") for b in m["content"])                     # no empty text blocks
    oai = to_openai_messages("sys", msgs)
    for i, m in enumerate(oai):
        if m.get("tool_calls"):
            ids = [c["id"] for c in m["tool_calls"]]
            assert [x.get("tool_call_id") for x in oai[i + 1:i + 1 + len(ids)]] == ids
