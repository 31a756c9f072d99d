"""Anthropic messages API with tools (tool_use / tool_result blocks, system as a top-level field)."""
from __future__ import annotations

import os
from typing import Any

from ...state import Message, ToolCall
from .base import HTTPProvider

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
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in m.tool_calls]
            add("assistant", blocks)
        elif m.role == "tool":
            blocks = [{"type": "tool_result", "tool_use_id": r.call_id, "content": r.content,
                       **({"is_error": True} if r.is_error else {})} for r in m.tool_results]
            if m.text:
                blocks.append({"type": "text", "text": m.text})
            add("user", blocks)
        else:  # user (and any stray system message, which the API only takes top-level)
            if m.text:
                add("user", [{"type": "text", "text": m.text}])
    return out


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
        if system_parts:
            body["system"] = "\n\n".join(system_parts)
        if tools:
            body["tools"] = to_anthropic_tools(tools)
        return body

    def complete(self, system: str, messages: list[Message], tools: list[dict]) -> Message:
        return self.parse_reply(self.post_json(self.request_body(system, messages, tools)))

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
        return Message(role="assistant", text="\n".join(t for t in texts if t), tool_calls=calls)
