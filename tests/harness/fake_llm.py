"""A loopback model server that speaks the OpenAI and Anthropic wire formats, for tests.

    with FakeLLM() as llm:
        llm.reply("looking", tool_calls=[("run_python", {"code": "x = 1"})])
        llm.fault_429(retry_after=0.1)
        llm.reply(tool_calls=[("finish", {"summary": "done"})])
        provider = make_provider("openai:gpt-test", api_key=llm.api_key, base_url=llm.openai_base_url)
        ...
        llm.requests[0].body["messages"]

Replies are queued once and rendered in whichever format the request used: OpenAI for
``POST /v1/chat/completions``, Anthropic for ``POST /v1/messages``. Every request is recorded
(path, headers, parsed body). Faults: 429 with Retry-After, 5xx, a hang past the client's
timeout, a malformed body, any raw response. ``push(fn)`` queues a callable that gets the
Recorded request and returns a Turn or Raw, for replies that depend on what was sent. An empty queue answers HTTP 400, so a test that
under-scripts fails loudly. Runs on 127.0.0.1 on a free port, in a daemon thread.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]          # lower-cased names
    body: Any                        # parsed JSON, or the raw text if it was not JSON
    api: str                         # "openai" | "anthropic" | "unknown"
    time: float = field(default_factory=time.time)


@dataclass
class Turn:
    """A model turn in neutral form; ``tool_calls`` items are (name, args) or dicts."""
    text: str = ""
    tool_calls: list[Any] = field(default_factory=list)


@dataclass
class Raw:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0               # seconds to wait before answering (a hang when > timeout)


Item = Turn | Raw | Callable[[Recorded], "Turn | Raw"]


class FakeLLM:
    def __init__(self, api_key: str | None = "sk-fake-test-key-0123456789", model: str = "fake-model") -> None:
        self.api_key = api_key       # when set, requests without it get 401
        self.model = model
        self.requests: list[Recorded] = []
        self._queue: list[Item] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "FakeLLM":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                fake._handle(self)

            def do_GET(self) -> None:
                fake._send(self, Raw(404, b'{"error": {"message": "not found"}}'))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()            # releases hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeLLM is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def openai_base_url(self) -> str:      # what OPENAI_BASE_URL should be
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:   # what ANTHROPIC_BASE_URL should be
        return self.url

    def env(self) -> dict[str, str]:
        """Environment variables pointing both SDK conventions at this server."""
        env = {"OPENAI_BASE_URL": self.openai_base_url, "ANTHROPIC_BASE_URL": self.anthropic_base_url}
        if self.api_key:
            env.update(OPENAI_API_KEY=self.api_key, ANTHROPIC_API_KEY=self.api_key)
        return env

    # -- scripting ------------------------------------------------------------------------
    def push(self, *items: Item) -> "FakeLLM":
        with self._lock:
            self._queue.extend(items)
        return self

    def reply(self, text: str = "", tool_calls: Iterable[Any] = ()) -> "FakeLLM":
        """Queue one model turn; tool calls as (name, args), (name, args, id) or dicts."""
        return self.push(Turn(text, list(tool_calls)))

    def script(self, turns: list[dict[str, Any]]) -> "FakeLLM":
        """Queue turns in the scripted-provider file format."""
        for t in turns:
            self.reply(t.get("text", ""), t.get("tool_calls", []))
        return self

    def fault_429(self, retry_after: float | str | None = 1) -> "FakeLLM":
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return self.push(Raw(429, b'{"error": {"message": "Rate limit reached", "type": "rate_limit"}}', headers))

    def fault_500(self, status: int = 500) -> "FakeLLM":
        return self.push(Raw(status, b'{"error": {"message": "The server had an error"}}'))

    def fault_hang(self, seconds: float = 30.0) -> "FakeLLM":
        """Answer only after ``seconds`` (set the client timeout below it)."""
        return self.push(Raw(500, b'{"error": {"message": "too late"}}', delay=seconds))

    def fault_malformed(self, body: bytes | str = b"<html>Bad gateway</html>", status: int = 200) -> "FakeLLM":
        return self.push(Raw(status, body.encode() if isinstance(body, str) else body,
                             {"Content-Type": "text/html"}))

    def raw(self, status: int, body: Any, headers: dict[str, str] | None = None) -> "FakeLLM":
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.push(Raw(status, data, headers or {}))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def bodies(self, api: str | None = None) -> list[Any]:
        return [r.body for r in self.requests if api is None or r.api == api]

    # -- serving --------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")
        path = h.path.split("?")[0]
        api = "openai" if path.endswith("/chat/completions") else "anthropic" if path.endswith("/messages") else "unknown"
        rec = Recorded("POST", path, {k.lower(): v for k, v in h.headers.items()}, body, api)
        with self._lock:
            self.requests.append(rec)
        if api == "unknown":
            return self._send(h, Raw(404, json.dumps({"error": {"message": f"no route {path}"}}).encode()))
        if self.api_key and not self._authorised(rec):
            return self._send(h, Raw(401, b'{"error": {"message": "Incorrect API key provided"}}'))
        with self._lock:
            item = self._queue.pop(0) if self._queue else None
        if item is None:
            return self._send(h, Raw(400, b'{"error": {"message": "FakeLLM: no response queued for this request"}}'))
        if callable(item):
            item = item(rec)
        if isinstance(item, Turn):
            item = Raw(200, json.dumps(self._render(item, api, body)).encode())
        self._send(h, item)

    def _authorised(self, rec: Recorded) -> bool:
        if rec.api == "openai":
            return rec.headers.get("authorization") == f"Bearer {self.api_key}"
        return rec.headers.get("x-api-key") == self.api_key

    def _send(self, h: BaseHTTPRequestHandler, raw: Raw) -> None:
        if raw.delay and self._stopping.wait(raw.delay):
            return
        try:
            h.send_response(raw.status)
            headers = {"Content-Type": "application/json", **raw.headers}
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(raw.body)))
            h.end_headers()
            h.wfile.write(raw.body)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (e.g. its timeout)
            pass

    def _calls(self, turn: Turn, prefix: str) -> list[tuple[str, str, Any]]:
        out = []
        for c in turn.tool_calls:
            if isinstance(c, dict):
                name, args, cid = c["name"], c.get("arguments", {}), c.get("id")
            else:
                name, args, cid = c[0], c[1], (c[2] if len(c) > 2 else None)
            out.append((cid or f"{prefix}{next(self._ids)}", name, args))
        return out

    def _render(self, turn: Turn, api: str, request: Any) -> dict[str, Any]:
        model = request.get("model", self.model) if isinstance(request, dict) else self.model
        if api == "openai":
            calls = self._calls(turn, "call_")
            message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
            if calls:
                message["tool_calls"] = [
                    {"id": cid, "type": "function",
                     "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
                    for cid, name, args in calls]
            return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        calls = self._calls(turn, "toolu_")
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}] if turn.text else []
        content += [{"type": "tool_use", "id": cid, "name": name, "input": args} for cid, name, args in calls]
        return {"id": f"msg_{next(self._ids)}", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 5}}
