"""OpenAI chat-completions with tools; any compatible endpoint via base_url / OPENAI_BASE_URL."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any
from urllib.parse import urlsplit

from ...state import Message, ToolCall, Usage
from .base import HTTPProvider, ProviderError, wire_tool_id


def to_openai_messages(system: str, messages: list[Message]) -> list[dict[str, Any]]:
    """Neutral messages -> chat-completions messages (one role=tool message per result).

    An assistant turn with neither text nor tool calls (an empty reply) is left out: the API
    refuses ``{"role": "assistant", "content": null}`` without ``tool_calls``.
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for m in messages:
        if m.role == "assistant":
            if not m.text and not m.tool_calls:
                continue
            msg: dict[str, Any] = {"role": "assistant", "content": m.text or None}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": wire_tool_id(c.id), "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                    for c in m.tool_calls
                ]
            out.append(msg)
        elif m.role == "tool":
            for r in m.tool_results:
                out.append({"role": "tool", "tool_call_id": wire_tool_id(r.call_id), "content": r.content})
            if m.text:
                out.append({"role": "user", "content": m.text})
        else:  # user / system
            out.append({"role": m.role, "content": m.text})
    return out


def to_openai_tools(tools: list[dict]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t["parameters"]}} for t in tools]


class OpenAIProvider(HTTPProvider):
    kind = "openai"
    key_env = "OPENAI_API_KEY"

    def default_base_url(self) -> str:
        return os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"

    def endpoint(self) -> str:
        # Azure-style bases carry a query (?api-version=...): the path goes before it
        base, sep, query = self.base_url.partition("?")
        return f"{base.rstrip('/')}/chat/completions{sep}{query}"

    def auth_headers(self, key: str) -> dict[str, str]:
        host = urlsplit(self.base_url).hostname or ""
        if host.endswith((".openai.azure.com", ".cognitiveservices.azure.com")):
            return {"api-key": key}
        return {"authorization": f"Bearer {key}"}

    def request_body(self, system: str, messages: list[Message], tools: list[dict]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(system, messages)}
        if tools:
            body["tools"] = to_openai_tools(tools)
        return body

    def complete(self, system: str, messages: list[Message], tools: list[dict]) -> Message:
        body = self.post_json(self.request_body(system, messages, tools))
        return self.parse_reply(body)

    def is_context_overflow(self, status: int, body: Any, text: str) -> bool:
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return code == "context_length_exceeded" or "maximum context length" in text

    def parse_usage(self, body: dict[str, Any]) -> Usage | None:
        """``usage.prompt_tokens`` (cached part included), ``completion_tokens`` and
        ``prompt_tokens_details.cached_tokens`` (OpenAI's automatic prompt caching)."""
        raw = body.get("usage")
        if not isinstance(raw, dict):
            return None
        details = raw.get("prompt_tokens_details") or {}
        return Usage(input_tokens=int(raw.get("prompt_tokens") or 0),
                     output_tokens=int(raw.get("completion_tokens") or 0),
                     cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
                     requests=1)

    def parse_reply(self, body: dict[str, Any]) -> Message:
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self.malformed("no choices[0]", body)
        msg = choices[0].get("message")
        if not isinstance(msg, dict):
            raise self.malformed("choices[0].message is missing", body)
        refusal = msg.get("refusal")
        if isinstance(refusal, str) and refusal.strip():
            return Message(role="assistant", text=refusal.strip(), refusal=True, usage=self.parse_usage(body))
        text = msg.get("content") or ""
        if isinstance(text, list):  # some compatible servers send content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str):
            raise self.malformed("message.content is not text", body)
        calls: list[ToolCall] = []
        for i, raw in enumerate(msg.get("tool_calls") or []):
            fn = raw.get("function") if isinstance(raw, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise self.malformed(f"tool_calls[{i}] has no function name", body)
            call_id = raw.get("id") or f"call_{uuid.uuid4().hex[:16]}"   # some local servers omit ids
            args_raw = fn.get("arguments")
            if isinstance(args_raw, dict):
                args = args_raw
            else:
                try:
                    args = json.loads(args_raw or "{}")
                except (TypeError, json.JSONDecodeError) as exc:
                    raise ProviderError(
                        f"{self.spec}: the model sent malformed JSON arguments for tool "
                        f"{fn['name']!r} (call {call_id}): {exc}: {str(args_raw)[:200]!r}",
                        "this happens occasionally; answer 'retry' to ask the model again",
                    ) from exc
                if not isinstance(args, dict):
                    raise ProviderError(
                        f"{self.spec}: arguments for tool {fn['name']!r} (call {call_id}) are not a JSON object",
                        "answer 'retry' to ask the model again")
            calls.append(ToolCall(id=str(call_id), name=fn["name"], arguments=args))
        if not text and not calls and choices[0].get("finish_reason") == "content_filter":
            return Message(role="assistant", text="The provider's content filter stopped the reply.",
                           refusal=True, usage=self.parse_usage(body))
        return Message(role="assistant", text=text, tool_calls=calls, usage=self.parse_usage(body))
