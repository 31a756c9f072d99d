"""What every model provider shares: the Provider protocol, ProviderError, HTTP retries.

A provider turns the provider-neutral conversation (``state.Message``) into one model reply.
Keys live only inside provider objects (never in a RunState, never in a repr).
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ...errors import ProviderError
from ...state import Message

_WIRE_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def wire_tool_id(call_id: str) -> str:
    """A tool-call id every provider accepts (``^[a-zA-Z0-9_-]+$``, at most 64 characters).

    Ids minted by another provider (``functions.run_python:0``) are mapped stably: the same id
    always gives the same wire id, so a call and its result still match, and two different
    ids never collide (a digest of the original is appended).
    """
    if _WIRE_ID.match(call_id):
        return call_id
    digest = hashlib.sha1(call_id.encode("utf-8")).hexdigest()[:10]
    return f"{re.sub(r'[^a-zA-Z0-9_-]+', '_', call_id)[:48].strip('_') or 'call'}_{digest}"


@runtime_checkable
class Provider(Protocol):
    spec: str  # e.g. "openai:gpt-4o"; never a key

    def complete(self, system: str, messages: list[Message], tools: list[dict]) -> Message:
        """Return the model's next reply as a Message with role ``assistant`` (and its usage)."""
        ...


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ProviderError(f"{name}={raw!r} is not a number", f"set {name} to seconds, e.g. 60") from exc


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class HTTPProvider:
    """JSON-over-HTTPS provider with timeout and retries (429, 5xx, connect errors, timeouts).

    Backoff is ``backoff_base * 2**attempt`` seconds, or the server's Retry-After when given,
    each wait capped at ``max_delay`` and all waits together at ``max_total_wait``.
    Defaults come from HANDOFF_MODEL_TIMEOUT / HANDOFF_MODEL_RETRIES / HANDOFF_MODEL_BACKOFF
    so a server or a test can tune them without code.
    """

    kind = "http"
    key_env = ""

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float | None = None, max_retries: int | None = None,
                 backoff_base: float | None = None, max_delay: float = 60.0,
                 max_total_wait: float = 180.0, max_tokens: int = 4096) -> None:
        if not model:
            raise ProviderError(f"no model name in '{self.kind}:'", f"use e.g. {self.kind}:MODEL_NAME")
        self.model = model
        self.spec = f"{self.kind}:{model}"
        key = api_key if api_key is not None else os.environ.get(self.key_env)
        if not key:
            raise ProviderError(
                f"no API key for {self.spec}",
                f"set the {self.key_env} environment variable (in the kernel's or server's environment)",
            )
        self.__key = key
        self.base_url = (base_url or self.default_base_url()).rstrip("/")
        self.timeout = timeout if timeout is not None else _env_float("HANDOFF_MODEL_TIMEOUT", 120.0)
        self.max_retries = int(max_retries if max_retries is not None else _env_float("HANDOFF_MODEL_RETRIES", 4))
        self.backoff_base = backoff_base if backoff_base is not None else _env_float("HANDOFF_MODEL_BACKOFF", 1.0)
        self.max_delay = max_delay
        self.max_total_wait = max_total_wait
        self.max_tokens = max_tokens
        self._client: Any = None
        # told about each retry (what failed, how long until the next attempt), so a slow
        # model service is visible to the user instead of a silent wait; the loop sets it
        self.on_retry: Callable[[str], None] | None = None

    # -- subclass hooks -----------------------------------------------------------------
    def default_base_url(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def endpoint(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def auth_headers(self, key: str) -> dict[str, str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def is_context_overflow(self, status: int, body: Any, text: str) -> bool:  # pragma: no cover
        raise NotImplementedError

    def error_text(self, body: Any) -> str:
        """The human part of an error body ({"error": {"message": ...}} for both APIs)."""
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
            if isinstance(err, str):
                return err
        return ""

    # -- plumbing -----------------------------------------------------------------------
    def __repr__(self) -> str:  # never show the key
        return f"<{type(self).__name__} {self.spec} at {self.base_url}>"

    def secret_values(self) -> set[str]:
        """The key, so the loop can redact it from anything shown to a model or stored."""
        return {self.__key}

    def _http(self) -> Any:
        if self._client is None:
            import httpx
            self._client = httpx.Client(timeout=httpx.Timeout(self.timeout))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def post_json(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload``; retry what is worth retrying; return the decoded JSON object."""
        import httpx

        url = self.endpoint()
        headers = {"content-type": "application/json", **self.auth_headers(self.__key)}
        waited = 0.0
        attempt = 0
        while True:
            problem: str
            retry_after: float | None = None
            try:
                resp = self._http().post(url, json=payload, headers=headers)
            except httpx.TimeoutException:
                problem = f"{self.spec}: no reply from {url} within {self.timeout:g}s"
            except httpx.TransportError as exc:
                problem = f"{self.spec}: could not connect to {url} ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code < 300:
                    return self._decode(resp)
                detail = self._error_detail(resp)
                if self._overflow(resp):
                    raise ProviderError(f"{self.spec}: the request is too long for the model's context "
                                        f"window{detail}", "the conversation is compacted and retried",
                                        context_overflow=True)
                if resp.status_code == 429 or resp.status_code >= 500:
                    retry_after = parse_retry_after(resp.headers.get("retry-after"))
                    problem = f"{self.spec}: HTTP {resp.status_code} from {url}{detail}"
                else:
                    raise ProviderError(f"{self.spec}: HTTP {resp.status_code} from {url}{detail}",
                                        self._hint_for(resp.status_code))
            delay = retry_after if retry_after is not None else self.backoff_base * (2 ** attempt)
            delay = min(delay, self.max_delay)
            if attempt >= self.max_retries or waited + delay > self.max_total_wait:
                raise ProviderError(
                    f"{problem}; gave up after {attempt + 1} attempt(s) and {waited:.1f}s of waiting",
                    "the model service is unavailable or rate-limited: answer 'retry' to try again later, "
                    "or check the base URL and your quota",
                    retryable=True,
                )
            if self.on_retry is not None:
                self.on_retry(f"{problem}; retrying in {delay:.1f}s (attempt {attempt + 2} of {self.max_retries + 1})")
            time.sleep(delay)
            waited += delay
            attempt += 1

    def _overflow(self, resp: Any) -> bool:
        if resp.status_code not in (400, 413):
            return False
        try:
            body = resp.json()
        except ValueError:
            body = None
        return self.is_context_overflow(resp.status_code, body, self.error_text(body) or resp.text[:500])

    def _error_detail(self, resp: Any) -> str:
        try:
            text = self.error_text(resp.json())
        except ValueError:
            text = resp.text[:300]
        return f": {text}" if text else ""

    def _hint_for(self, status: int) -> str:
        if status in (401, 403):
            return f"the API key was refused: check {self.key_env} (the key itself is never printed)"
        if status == 404:
            return f"check the model name '{self.model}' and the base URL {self.base_url}"
        return "the request was rejected; check the model name and the provider's documentation"

    def _decode(self, resp: Any) -> dict[str, Any]:
        try:
            body = resp.json()
        except (ValueError, json.JSONDecodeError) as exc:
            raise ProviderError(
                f"{self.spec}: the reply from {self.endpoint()} is not JSON ({exc}): {resp.text[:200]!r}",
                "the endpoint may not speak this API; check the base URL",
            ) from exc
        if not isinstance(body, dict):
            raise ProviderError(f"{self.spec}: the reply is JSON but not an object: {str(body)[:200]}",
                                "the endpoint may not speak this API; check the base URL")
        return body

    def malformed(self, what: str, body: Any) -> ProviderError:
        return ProviderError(
            f"{self.spec}: malformed reply, {what}: {json.dumps(body)[:300]}",
            "the endpoint may not speak this API, or the model misbehaved; answer 'retry' to try again",
        )
