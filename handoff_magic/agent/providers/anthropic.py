"""Anthropic messages API with tools (tool_use / tool_result blocks, system as a top-level field)."""
from __future__ import annotations

import os
from typing import Any

from ...state import Message, ToolCall, Usage
from .base import HTTPProvider, wire_tool_id

CACHE = {"type": "ephemeral"}

ANTHROPIC_VERSION = "2023-06-01"


def to_anthropic_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Neutral messages -> alternating user/assistant turns of content blocks.

    Tool results travel as tool_result blocks in a user turn; consecutive same-role turns
    are merged because the API requires strict alternation.
    """
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        if m.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m.text}] if m.text else []
            blocks += [{"type": "tool_use", "id": wire_tool_id(c.id), "name": c.name, "input": c.arguments}
                       for c in m.tool_calls]
            add("assistant", blocks)
        elif m.role == "tool":
            blocks = [{"type": "tool_result", "tool_use_id": wire_tool_id(r.call_id), "content": r.content,
                       **({"is_error": True} if r.is_error else {})} for r in m.tool_results]
            if m.text:
                blocks.append({"type": "text", "text": m.text})
            add("user", blocks)
        else:  # user (and any stray system message, which the API only takes top-level)
            if m.text:
                add("user", [{"type": "text", "text": m.text}])
    return out


def mark_cache_breakpoints(messages: list[dict[str, Any]]) -> None:
    """Prompt caching on the conversation: a breakpoint on the last block of the last turn,
    so the next request (the same prefix plus one turn) reads everything before it from the
    cache, and one on the last block of the turn before (which the previous request wrote).
    Together with the system breakpoint that makes three of the four the API allows."""
    for turn in messages[-3:][::-2]:
        blocks = turn["content"]
        if blocks:
            blocks[-1] = {**blocks[-1], "cache_control": CACHE}


def to_anthropic_tools(tools: list[dict]) -> list[dict[str, Any]]:
    return [{"name": t["name"], "description": t.get("description", ""), "input_schema": t["parameters"]}
            for t in tools]


class AnthropicProvider(HTTPProvider):
    kind = "anthropic"
    key_env = "ANTHROPIC_API_KEY"

    def default_base_url(self) -> str:
        return os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"

    def endpoint(self) -> str:
        return f"{self.base_url}/v1/messages"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}

    def request_body(self, system: str, messages: list[Message], tools: list[dict]) -> dict[str, Any]:
        system_parts = [system] if system else []
        system_parts += [m.text for m in messages if m.role == "system" and m.text]
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "messages": to_anthropic_messages(messages)}
        mark_cache_breakpoints(body["messages"])
        if system_parts:
            # the stable prefix (tools, then system) is cached up to this breakpoint
            body["system"] = [{"type": "text", "text": "\n\n".join(system_parts), "cache_control": CACHE}]
        if tools:
            body["tools"] = to_anthropic_tools(tools)
        return body

    def complete(self, system: str, messages: list[Message], tools: list[dict]) -> Message:
        return self.parse_reply(self.post_json(self.request_body(system, messages, tools)))

    def is_context_overflow(self, status: int, body: Any, text: str) -> bool:
        return "prompt is too long" in text or "context window" in text.lower() and "exceed" in text.lower()

    def parse_usage(self, body: dict[str, Any]) -> Usage | None:
        """Anthropic's ``input_tokens`` excludes the cache: the prompt is input + cache reads +
        cache writes, and ``cached_tokens`` is the cache reads."""
        raw = body.get("usage")
        if not isinstance(raw, dict):
            return None
        read = int(raw.get("cache_read_input_tokens") or 0)
        written = int(raw.get("cache_creation_input_tokens") or 0)
        return Usage(input_tokens=int(raw.get("input_tokens") or 0) + read + written,
                     output_tokens=int(raw.get("output_tokens") or 0),
                     cached_tokens=read, cache_write_tokens=written, requests=1)

    def parse_reply(self, body: dict[str, Any]) -> Message:
        if body.get("type") == "error":
            raise self.malformed("the reply is an error object", body)
        content = body.get("content")
        if not isinstance(content, list):
            raise self.malformed("no 'content' list", body)
        texts: list[str] = []
        calls: list[ToolCall] = []
        for i, block in enumerate(content):
            if not isinstance(block, dict):
                raise self.malformed(f"content[{i}] is not an object", body)
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                    raise self.malformed(f"content[{i}] tool_use lacks id or name", body)
                args = block.get("input", {})
                if not isinstance(args, dict):
                    raise self.malformed(f"content[{i}] tool_use input is not an object", body)
                calls.append(ToolCall(id=block["id"], name=block["name"], arguments=args))
            # thinking and other block kinds are not part of the conversation we keep
        text = "\n".join(t for t in texts if t)
        if body.get("stop_reason") == "refusal":
            return Message(role="assistant", text=refusal_reason(body, text), refusal=True,
                           usage=self.parse_usage(body))
        return Message(role="assistant", text=text, tool_calls=calls, usage=self.parse_usage(body))


def refusal_reason(body: dict[str, Any], text: str) -> str:
    """The model's words for a refusal: ``stop_details`` (explanation, category), else its text."""
    details = body.get("stop_details")
    parts = []
    if isinstance(details, dict):
        parts += [str(details[k]) for k in ("explanation", "message", "reason") if details.get(k)]
        if details.get("category"):
            parts.append(f"(category: {details['category']})")
    elif isinstance(details, str) and details.strip():
        parts.append(details.strip())
    if text:
        parts.insert(0, text)
    return " ".join(parts) or "The model declined this request (stop_reason: refusal)."
