"""The API's wire models: request bodies and queries parsed into typed values, replies built
from stored rows. Shapes are a contract (docs/internals.md "Server"); errors are ``BadRequest``
/ ``TooLarge`` with a hint, rendered by http.py.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff_magic.state import Event

from .errors import BadRequest, TooLarge

MAX_ANSWER_CHARS = 100_000
MAX_SHAS = 1_000_000
MAX_EVENTS_PAGE = 5000
DEFAULT_PULL_TIMEOUT = 120.0
MAX_PULL_TIMEOUT = 600.0
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


@dataclass(frozen=True)
class CreateRun:
    """``POST /runs``: the handoff manifest (checked by the service) and an optional retry key."""
    manifest: dict[str, Any]
    idempotency_key: str | None


@dataclass(frozen=True)
class EventsQuery:
    """``GET /runs/{id}/events?after=N&timeout=S&limit=L`` (timeout capped by the server)."""
    after: int
    timeout: float
    limit: int


def idempotency_key(body: dict[str, Any]) -> str | None:
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.match(key)):
        raise BadRequest("idempotency_key must be 1-200 letters, digits or ._:-", "use a uuid4 hex per handoff")
    return key or None


def parse_create(body: dict[str, Any]) -> CreateRun:
    key = idempotency_key(body)
    manifest = body.get("manifest")
    if not isinstance(manifest, dict):
        raise BadRequest("request has no 'manifest' object",
                         'POST {"manifest": {...}, "idempotency_key": "..."} (%handoff does this)')
    return CreateRun(manifest, key)


def parse_shas(body: dict[str, Any]) -> list[str]:
    """``POST /blobs/missing``: the list (each id is checked by the BlobStore)."""
    shas = body.get("shas")
    if not isinstance(shas, list) or len(shas) > MAX_SHAS:
        raise BadRequest("'shas' must be a list of chunk ids", 'send {"shas": ["<sha256>", ...]}')
    return shas


def parse_answer(body: dict[str, Any]) -> str:
    text = body.get("answer")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("answer must be a non-empty string", 'POST {"answer": "..."}')
    if len(text) > MAX_ANSWER_CHARS:
        raise TooLarge(f"answer is over {MAX_ANSWER_CHARS} characters", "shorten it")
    return text


def parse_form_answer(text: str) -> str:
    """The status page's answer form: trimmed, and cut at the API's limit rather than refused."""
    text = text.strip()
    if not text:
        raise BadRequest("the answer was empty", "type an answer and send it again")
    return text[:MAX_ANSWER_CHARS]


def parse_pull_timeout(body: dict[str, Any]) -> float:
    timeout = body.get("timeout", DEFAULT_PULL_TIMEOUT)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        timeout = DEFAULT_PULL_TIMEOUT
    return min(float(timeout), MAX_PULL_TIMEOUT)


def parse_events_query(arg: Callable[[str, str], str], max_wait: float) -> EventsQuery:
    try:
        after = max(0, int(arg("after", "0")))
        timeout = float(arg("timeout", "0"))
        limit = int(arg("limit", "500"))
    except ValueError:
        raise BadRequest("after and limit must be integers and timeout a number",
                         "e.g. ?after=12&timeout=25") from None
    if timeout != timeout:  # NaN
        timeout = 0.0
    return EventsQuery(after, max(0.0, min(timeout, max_wait)), max(1, min(limit, MAX_EVENTS_PAGE)))


def event_json(ev: Event) -> dict[str, Any]:
    return {"seq": ev.seq, "type": ev.type, "data": ev.data, "time": ev.time}


def events_page(events: list[Event], after: int, last_seq: int, status: str) -> dict[str, Any]:
    """One long-poll reply. ``last_seq`` never runs past what this client has seen: an event
    committed after the wait returned must still come in the next poll."""
    return {"events": [event_json(e) for e in events],
            "last_seq": events[-1].seq if events else min(after, last_seq),
            "status": status}
