"""Recognise and redact secrets, so keys and tokens never leave the machine.

Shared by capture (variables, history, run state), the agent loop (tool output shown to a
model) and the server (what it stores and shows). A secret is a variable or environment
variable whose *name* looks secret, or any value equal to one of those.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"

SECRET_NAME_RE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

# Shorter values would redact ordinary words and numbers everywhere ("1", "true").
MIN_SECRET_LEN = 6

# Well-known key formats, for keys typed straight into a cell (no secret-named variable holds them).
KEY_PATTERNS = re.compile(
    r"\b(sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"        # OpenAI / Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{30,}"                       # GitHub
    r"|github_pat_[A-Za-z0-9_]{30,}"
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"                    # Slack
    r"|AKIA[0-9A-Z]{16}"                                  # AWS access key id
    r"|AIza[0-9A-Za-z_\-]{35}"                            # Google API key
    r"|hf_[A-Za-z0-9]{30,})\b")


def is_secret_name(name: str) -> bool:
    """True if ``name`` looks like it holds a secret (*KEY*, *TOKEN*, *SECRET*, *PASSWORD*...)."""
    return bool(SECRET_NAME_RE.search(name))


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def secret_values(ns: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-named environment variables and secret-named str/bytes variables.

    ``environ`` defaults to ``os.environ``. Values shorter than MIN_SECRET_LEN are ignored:
    they are too common to redact and too short to be real keys.
    """
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in environ.items():
        if is_secret_name(name) and isinstance(value, str) and len(value.strip()) >= MIN_SECRET_LEN:
            found.add(value)
            found.add(value.strip())
    for name, value in (ns or {}).items():
        if not isinstance(name, str) or not is_secret_name(name):
            continue
        text = _as_text(value)
        if text is not None and len(text.strip()) >= MIN_SECRET_LEN:
            found.add(text)
            found.add(text.strip())
    return found


def is_secret_value(value: Any, values: Iterable[str]) -> bool:
    """True if a str/bytes ``value`` equals one of the secret ``values``."""
    text = _as_text(value)
    if text is None:
        return False
    vals = values if isinstance(values, (set, frozenset)) else set(values)
    return text in vals or text.strip() in vals


def redact(text: str, values: Iterable[str], *, patterns: bool = False) -> str:
    """Replace every occurrence of each secret value in ``text`` with ``<redacted>``.

    ``patterns=True`` also redacts strings shaped like well-known API keys (KEY_PATTERNS).
    """
    if not isinstance(text, str) or not text:
        return text
    for value in sorted(set(values), key=len, reverse=True):
        if value and value in text:
            text = text.replace(value, REDACTED)
    if patterns:
        text = KEY_PATTERNS.sub(REDACTED, text)
    return text


KEY_PREFIXES = (b"sk-", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_", b"xox", b"AKIA", b"AIza", b"hf_")
# In a pickle a string follows its length byte, which may itself be a letter: accept the match
# after a non-word byte or right after a SHORT_BINUNICODE opcode + length ("task-..." stays fine).
KEY_PATTERNS_BYTES = re.compile(rb"(?:(?<![A-Za-z0-9_\-])|(?<=\x8c.))" +
                                KEY_PATTERNS.pattern.replace("\\b", "").encode("ascii"), re.DOTALL)


def bytes_look_like_key(data: bytes) -> bool:
    """Fast check of a binary blob (a pickle chunk) for key-shaped strings: literal prefixes first."""
    if not any(p in data for p in KEY_PREFIXES):
        return False
    return bool(KEY_PATTERNS_BYTES.search(data))


def looks_like_key(value: Any) -> bool:
    """True if a str/bytes value contains something shaped like a well-known API key."""
    text = _as_text(value)
    return text is not None and len(text) < 10_000 and bool(KEY_PATTERNS.search(text))


def redact_obj(obj: Any, values: Iterable[str], *, patterns: bool = False) -> Any:
    """Redact secret values in every string of a JSON-like structure (dicts, lists, str)."""
    vals = sorted({v for v in values if v}, key=len, reverse=True)
    if not vals and not patterns:
        return obj

    def walk(o: Any) -> Any:
        if isinstance(o, str):
            return redact(o, vals, patterns=patterns)
        if isinstance(o, dict):
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj)


def contains_secret(data: bytes | bytearray | memoryview | str, values: Iterable[str]) -> str | None:
    """Return the (redacted) name of the first secret found in ``data``, else None.

    Used to refuse pickle streams and files that embed a secret value.
    """
    if isinstance(data, str):
        hay: Any = data
        needles = [v for v in values if v]
    else:
        hay = bytes(data) if isinstance(data, memoryview) else data
        needles = [v.encode("utf-8") for v in values if v]
    for needle in needles:
        if needle in hay:
            return "a secret value"
    return None


def secret_env_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """Names (never values) of secret-looking environment variables, for messages."""
    environ = os.environ if environ is None else environ
    return sorted(n for n, v in environ.items() if is_secret_name(n) and len(v.strip()) >= MIN_SECRET_LEN)
