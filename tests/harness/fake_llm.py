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
Recorded request and returns a Turn or Raw, for replies that depend on what was sent. An empty
queue answers HTTP 400 (or asks ``responder``, a callable like those ``push`` takes), so a test
that under-scripts fails loudly. Runs on 127.0.0.1 on a free port, in a daemon thread.

Like the real services it counts every request's tokens (its own word-and-punctuation
tokenizer, deliberately unlike the client's estimate) and reports them in ``usage``, with
prompt caching: OpenAI's automatic prefix cache (``prompt_tokens_details.cached_tokens``, from
1024 tokens) and Anthropic's explicit ``cache_control`` breakpoints (cache reads and writes).
With ``window`` set, a request over it is refused the way each service refuses it: HTTP 400
``context_length_exceeded`` (OpenAI) or "prompt is too long" (Anthropic), nothing dequeued.
``refuse(reason)`` queues a safety refusal in each format.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    tokens: int = 0                  # prompt tokens as this model counts them
    over_window: bool = False        # refused as too long for the window
    usage: dict[str, Any] | None = None   # the usage the reply reported

    @property
    def prompt(self) -> str:
        """Everything the model was shown, as one string (to answer from what is in the prompt)."""
        return json.dumps(self.body, ensure_ascii=False)

    @property
    def counted(self) -> dict[str, int]:
        """The reply's usage in one shape for both formats: the whole prompt (cached part
        included), the output, the cache reads and the cache writes; zeros if no reply."""
        u = self.usage or {}
        if self.api == "openai":
            return {"input_tokens": u.get("prompt_tokens", 0), "output_tokens": u.get("completion_tokens", 0),
                    "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                    "cache_write_tokens": 0}
        read, written = u.get("cache_read_input_tokens", 0), u.get("cache_creation_input_tokens", 0)
        return {"input_tokens": u.get("input_tokens", 0) + read + written, "output_tokens": u.get("output_tokens", 0),
                "cached_tokens": read, "cache_write_tokens": written}

    @property
    def is_compaction(self) -> bool:
        """A request with no tools: the client asking for a summary, not for an agent turn."""
        return isinstance(self.body, dict) and not self.body.get("tools")


@dataclass
class Turn:
    """A model turn in neutral form; ``tool_calls`` items are (name, args) or dicts."""
    text: str = ""
    tool_calls: list[Any] = field(default_factory=list)
    refusal: str = ""                # a safety refusal with this reason (no text, no calls)


@dataclass
class Raw:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0               # seconds to wait before answering (a hang when > timeout)


Item = Turn | Raw | Callable[[Recorded], "Turn | Raw"]


_TOKEN = re.compile(r"\w+|[^\w\s]")
CACHE_MIN_TOKENS = 1024


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _strip_cache(block: Any) -> Any:
    return {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block


def _digest(items: list[str]) -> str:
    return hashlib.sha1("\x00".join(items).encode()).hexdigest()


class FakeLLM:
    def __init__(self, api_key: str | None = "sk-fake-test-key-0123456789", model: str = "fake-model",
                 window: int | None = None, responder: Callable[[Recorded], Turn | Raw] | None = None) -> None:
        self.api_key = api_key       # when set, requests without it get 401
        self.model = model
        self.window = window
        self.responder = responder
        self._cached: set[str] = set()   # prefix digests in the prompt cache
        self.requests: list[Recorded] = []
        self._queue: list[Item] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> FakeLLM:
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

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
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
    def push(self, *items: Item) -> FakeLLM:
        with self._lock:
            self._queue.extend(items)
        return self

    def reply(self, text: str = "", tool_calls: Iterable[Any] = ()) -> FakeLLM:
        """Queue one model turn; tool calls as (name, args), (name, args, id) or dicts."""
        return self.push(Turn(text, list(tool_calls)))

    def script(self, turns: list[dict[str, Any]]) -> FakeLLM:
        """Queue turns in the scripted-provider file format."""
        for t in turns:
            self.reply(t.get("text", ""), t.get("tool_calls", []))
        return self

    def refuse(self, reason: str) -> FakeLLM:
        """Queue a safety refusal: OpenAI ``refusal`` with null content, Anthropic
        ``stop_reason: refusal`` with ``stop_details``."""
        return self.push(Turn(refusal=reason))

    def fault_429(self, retry_after: float | str | None = 1) -> FakeLLM:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return self.push(Raw(429, b'{"error": {"message": "Rate limit reached", "type": "rate_limit"}}', headers))

    def fault_500(self, status: int = 500) -> FakeLLM:
        return self.push(Raw(status, b'{"error": {"message": "The server had an error"}}'))

    def fault_hang(self, seconds: float = 30.0) -> FakeLLM:
        """Answer only after ``seconds`` (set the client timeout below it)."""
        return self.push(Raw(500, b'{"error": {"message": "too late"}}', delay=seconds))

    def fault_malformed(self, body: bytes | str = b"<html>Bad gateway</html>", status: int = 200) -> FakeLLM:
        return self.push(Raw(status, body.encode() if isinstance(body, str) else body,
                             {"Content-Type": "text/html"}))

    def raw(self, status: int, body: Any, headers: dict[str, str] | None = None) -> FakeLLM:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.push(Raw(status, data, headers or {}))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def reported_usage(self, requests: list[Recorded] | None = None) -> dict[str, int]:
        """The sum of the usage the replies reported (all requests, or those given)."""
        replied = [r for r in (self.requests if requests is None else requests) if r.usage is not None]
        total = {"requests": len(replied)}
        for rec in replied:
            for key, value in rec.counted.items():
                total[key] = total.get(key, 0) + value
        return total

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
        api = ("openai" if path.endswith("/chat/completions")
               else "anthropic" if path.endswith("/messages") else "unknown")
        rec = Recorded("POST", path, {k.lower(): v for k, v in h.headers.items()}, body, api)
        with self._lock:
            self.requests.append(rec)
        if api == "unknown":
            return self._send(h, Raw(404, json.dumps({"error": {"message": f"no route {path}"}}).encode()))
        if self.api_key and not self._authorised(rec):
            return self._send(h, Raw(401, b'{"error": {"message": "Incorrect API key provided"}}'))
        items = self._prefix_items(rec)
        rec.tokens = sum(n for _, n, _ in items)
        if self.window is not None and rec.tokens > self.window:
            rec.over_window = True
            return self._send(h, self._too_long(rec))
        with self._lock:
            item = self._queue.pop(0) if self._queue else self.responder
        if item is None:
            return self._send(h, Raw(400, b'{"error": {"message": "FakeLLM: no response queued for this request"}}'))
        if callable(item):
            item = item(rec)
        if isinstance(item, Turn):
            with self._lock:
                rec.usage = self._usage(rec, items, item)
            item = Raw(200, json.dumps(self._render(item, api, body, rec.usage)).encode())
        self._send(h, item)

    # -- tokens, window, cache ----------------------------------------------------------------
    def _prefix_items(self, rec: Recorded) -> list[tuple[str, int, bool]]:
        """The prompt as cacheable pieces in order: (text, tokens, carries a cache breakpoint)."""
        body = rec.body if isinstance(rec.body, dict) else {}
        pieces: list[tuple[str, bool]] = [(json.dumps(body.get("tools") or []), False)]
        if rec.api == "anthropic":
            system = body.get("system") or []
            for block in ([{"type": "text", "text": system}] if isinstance(system, str) else system):
                pieces.append((json.dumps(_strip_cache(block)), isinstance(block, dict) and "cache_control" in block))
            for m in body.get("messages") or []:
                content = m.get("content")
                for block in ([{"type": "text", "text": content}] if isinstance(content, str) else content or []):
                    pieces.append((m["role"] + json.dumps(_strip_cache(block)),
                                   isinstance(block, dict) and "cache_control" in block))
        else:
            pieces += [(json.dumps(m), False) for m in body.get("messages") or []]
        return [(text, count_tokens(text), mark) for text, mark in pieces]

    def _usage(self, rec: Recorded, items: list[tuple[str, int, bool]], turn: Turn) -> dict[str, Any]:
        texts = [t for t, _, _ in items]
        cum = list(itertools.accumulate(n for _, n, _ in items))
        output = count_tokens(turn.text + turn.refusal + json.dumps(turn.tool_calls)) + 1
        if rec.api == "openai":   # automatic: any prefix an earlier request had
            hit = max((cum[k] for k in range(len(items)) if _digest(texts[:k + 1]) in self._cached), default=0)
            self._cached.update(_digest(texts[:k + 1]) for k in range(len(items)))
            cached = hit if hit >= CACHE_MIN_TOKENS else 0
            return {"prompt_tokens": rec.tokens, "completion_tokens": output, "total_tokens": rec.tokens + output,
                    "prompt_tokens_details": {"cached_tokens": cached}}
        marks = [k for k, (_, _, mark) in enumerate(items) if mark]
        last = marks[-1] if marks else -1
        read = max((cum[k] for k in range(last + 1) if _digest(texts[:k + 1]) in self._cached), default=0)
        written = 0
        for k in marks:
            if cum[k] >= CACHE_MIN_TOKENS and _digest(texts[:k + 1]) not in self._cached:
                self._cached.add(_digest(texts[:k + 1]))
                written = cum[k] - read
        read = read if read >= CACHE_MIN_TOKENS else 0
        return {"input_tokens": rec.tokens - read - written, "output_tokens": output,
                "cache_read_input_tokens": read, "cache_creation_input_tokens": written}

    def _too_long(self, rec: Recorded) -> Raw:
        if rec.api == "openai":
            return Raw(400, json.dumps({"error": {
                "message": f"This model's maximum context length is {self.window} tokens. However, your "
                           f"messages resulted in {rec.tokens} tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}).encode())
        return Raw(400, json.dumps({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {rec.tokens} tokens > {self.window} maximum"}}).encode())

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

    def _render(self, turn: Turn, api: str, request: Any, usage: dict[str, Any]) -> dict[str, Any]:
        model = request.get("model", self.model) if isinstance(request, dict) else self.model
        if api == "openai":
            calls = self._calls(turn, "call_")
            message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
            if turn.refusal:
                message = {"role": "assistant", "content": None, "refusal": turn.refusal}
            if calls:
                message["tool_calls"] = [
                    {"id": cid, "type": "function",
                     "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
                    for cid, name, args in calls]
            return {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
                    "usage": usage}
        calls = self._calls(turn, "toolu_")
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.text}] if turn.text else []
        content += [{"type": "tool_use", "id": cid, "name": name, "input": args} for cid, name, args in calls]
        reply = {"id": f"msg_{next(self._ids)}", "type": "message", "role": "assistant", "model": model,
                 "content": content, "stop_reason": "tool_use" if calls else "end_turn", "stop_sequence": None,
                 "usage": usage}
        if turn.refusal:
            reply.update(content=[], stop_reason="refusal",
                         stop_details={"type": "refusal", "category": "cyber", "explanation": turn.refusal})
        return reply
