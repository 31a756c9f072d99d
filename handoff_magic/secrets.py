"""What counts as a secret, and redaction, so keys and tokens never leave the machine.

Shared by capture (variables, history, run state), the agent loop (tool output shown to a
model) and the server (what it stores and shows). DESIGN "Capture" draws the rule:

- a str/bytes value held by a variable whose *name*, split into words (snake_case, camelCase),
  names a credential (``api_key``, ``OPENAI_API_KEY``, ``hfToken``, ``db_password``...);
  objects that are not strings travel whatever their name (``tokens``, ``tokenizer``,
  ``sort_keys``, ``hotkey_map``, ``key_seen = None``);
- any value equal to the value of a secret-named environment variable;
- any string shaped like a well-known key (OpenAI, Anthropic, GitHub, Hugging Face, AWS, Slack,
  Google, Stripe, GitLab, JWTs, PEM private keys, passwords inside URLs).

In the history, the right-hand side of an assignment to a secret name (however the value is
built: concatenation, f-string, call), a secret-named keyword argument or dict key, is redacted.
"""
from __future__ import annotations

import ast
import os
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"

# Shorter values would redact ordinary words and numbers everywhere ("1", "true").
MIN_SECRET_LEN = 6

# A word that alone names a credential; also as the end of a compound word ("accesstoken").
_CREDENTIAL_WORDS = ("token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "creds",
                     "apikey", "secretkey", "accesskey", "privatekey", "authkey", "bearer", "authorization")
# "key" names a credential after a qualifier (api_key, my_key, OPENAI_KEY) but not after these
# words, whose keys are data: a join column, a dict key, a cache key, a keyboard key.
_DATA_KEY_WORDS = frozenset({"sort", "primary", "foreign", "join", "dict", "cache", "group", "groupby", "partition",
                             "index", "lookup", "row", "col", "column", "unique", "composite", "merge", "dedup",
                             "map", "hash", "hot", "music", "piano", "by", "next", "prev", "last", "first",
                             "current", "cur", "max", "min", "default", "idempotency", "natural", "surrogate",
                             "shard", "bucket", "attr", "field", "config", "json", "yaml", "dataset",
                             "table", "record", "entry", "item", "node", "edge", "cluster", "label", "class",
                             "feature", "target", "match", "search", "query", "order", "result", "metric"})
# Words that may follow the credential word and still mean its value (api_key_value, AWS_ACCESS_KEY_ID).
_VALUE_WORDS = frozenset({"value", "str", "string", "text", "raw", "b64", "base64", "hex", "bytes", "id", "env",
                          "var", "secret", "key", "token", "old", "new", "prod", "dev", "test", "live", "v1", "v2",
                          "1", "2", "3"})
_WORD_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b|_)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def name_words(name: str) -> list[str]:
    """``OPENAI_API_KEY`` -> [openai, api, key]; ``hfToken`` -> [hf, token]; ``APIKey2`` -> [api, key, 2]."""
    return [w.lower() for part in re.split(r"[^A-Za-z0-9]+", name) for w in _WORD_RE.findall(part)]


def is_secret_name(name: str, *, strict: bool = False) -> bool:
    """True if the words of ``name`` name a credential (see the module docstring).

    A credential word anywhere counts (``SECRET_KEY_BASE``, ``token_ids``: only str/bytes values
    under such names are held back, so a list of ids still travels). ``strict`` asks for the
    credential to be what the name holds (last word, or followed only by words like value/id),
    which is how the history decides whose right-hand side to redact.
    """
    words = name_words(name)
    for i, w in enumerate(words):
        holds_it = set(words[i + 1:]) <= _VALUE_WORDS    # not token_ids, password_file
        if w.endswith(_CREDENTIAL_WORDS) and (holds_it or not strict):
            return True
        if w == "key" and i > 0 and holds_it and words[i - 1] not in _DATA_KEY_WORDS:
            return True
    return False


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def is_secret_variable(name: str, value: Any, values: Iterable[str]) -> bool:
    """Whether ``name = value`` must not travel: only str/bytes values can be secrets."""
    text = _as_text(value)
    if text is None:
        return isinstance(value, (bytes, bytearray)) and is_secret_name(name)  # undecodable key bytes
    return is_secret_name(name) or is_secret_value(text, values) or looks_like_key(text)


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
        if not isinstance(name, str):
            continue
        for key, inner in _named_values(name, value):
            if not is_secret_name(key):
                continue
            text = _as_text(inner)
            if text is not None and len(text.strip()) >= MIN_SECRET_LEN:
                found.add(text)
                found.add(text.strip())
    return found


def _named_values(name: str, value: Any) -> Iterable[tuple[str, Any]]:
    """A variable, and one level into it: a dict's str keys (``cfg['password']``) and an
    object's attributes (``conn.password``), so those values are recognised wherever they go."""
    yield name, value
    if isinstance(value, dict):
        inner: Any = value
    elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, (type, types.ModuleType)):
        inner = value.__dict__
    else:
        return
    if len(inner) <= 10_000:
        yield from ((k, v) for k, v in list(inner.items()) if isinstance(k, str))


def is_secret_value(value: Any, values: Iterable[str]) -> bool:
    """True if a str/bytes ``value`` equals one of the secret ``values``."""
    text = _as_text(value)
    if text is None:
        return False
    vals = values if isinstance(values, (set, frozenset)) else set(values)
    return text in vals or text.strip() in vals


# Well-known key formats, for keys typed straight into a cell (no secret-named variable holds them).
_KEY_SHAPES = (
    r"sk-(?:proj-|ant-(?:api|admin)\d\d-|svcacct-|None-)?[A-Za-z0-9_\-]{20,}",  # OpenAI / Anthropic
    r"gh[pousr]_[A-Za-z0-9]{30,}",                                               # GitHub
    r"github_pat_[A-Za-z0-9_]{30,}",
    r"glpat-[A-Za-z0-9_\-]{20,}",                                                # GitLab
    r"xox[abposre]-[A-Za-z0-9\-]{10,}",                                          # Slack
    r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}",                            # AWS key ids
    r"AIza[0-9A-Za-z_\-]{35}",                                                   # Google API key
    r"hf_[A-Za-z0-9]{30,}",                                                      # Hugging Face
    r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,}",                                 # Stripe
    r"npm_[A-Za-z0-9]{36}",                                                      # npm
    r"pypi-AgE[A-Za-z0-9_\-]{50,}",                                              # PyPI
    r"SG\.[A-Za-z0-9_\-]{20,}\.[A-Za-z0-9_\-]{20,}",                             # SendGrid
    r"dop_v1_[a-f0-9]{64}",                                                      # DigitalOcean
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",         # JWT
    r"-----BEGIN[A-Z ]{0,20} PRIVATE KEY-----",                                  # PEM private key
)
KEY_PATTERNS = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(_KEY_SHAPES) + r")")
# A password inside a URL: scheme://user:password@host
URL_PASSWORD = re.compile(r"(?<=://)([^/\s:@'\"]{1,64}):([^/\s@'\"]{3,128})(?=@)")
# An AWS secret access key is 40 base64 characters: too plain to look for inside text, but a
# whole string of that shape (upper, lower and a digit or /+) is one.
_AWS_SECRET = re.compile(r"(?=.*[A-Z])(?=.*[a-z])(?=.*[0-9/+])[A-Za-z0-9/+]{40}")


def looks_like_key(value: Any) -> bool:
    """True if a str/bytes value contains something shaped like a well-known key."""
    text = _as_text(value)
    if text is None or len(text) >= 10_000:
        return False
    return bool(KEY_PATTERNS.search(text) or URL_PASSWORD.search(text) or _AWS_SECRET.fullmatch(text.strip()))


def redact(text: str, values: Iterable[str], *, patterns: bool = False) -> str:
    """Replace every occurrence of each secret value in ``text`` with ``<redacted>``.

    ``patterns=True`` also redacts strings shaped like well-known keys and passwords in URLs.
    """
    if not isinstance(text, str) or not text:
        return text
    for value in sorted(set(values), key=len, reverse=True):
        if value and value in text:
            text = text.replace(value, REDACTED)
    if patterns:
        text = KEY_PATTERNS.sub(REDACTED, text)
        text = URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}", text)
    return text


KEY_PREFIXES = (b"sk-", b"sk_", b"rk_", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_", b"glpat-",
                b"xox", b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"ANPA", b"AIza", b"hf_", b"npm_", b"pypi-",
                b"SG.", b"dop_v1_", b"eyJ", b"PRIVATE KEY")
# In a pickle a string follows its length byte, which may itself be a letter: accept the match
# after a non-word byte or right after a SHORT_BINUNICODE opcode + length ("task-..." stays fine).
KEY_PATTERNS_BYTES = re.compile(rb"(?:(?<![A-Za-z0-9_\-])|(?<=\x8c.))(?:" +
                                "|".join(_KEY_SHAPES).encode("ascii") + rb")", re.DOTALL)


def bytes_look_like_key(data: bytes) -> bool:
    """Fast check of a binary blob (a pickle chunk) for key-shaped strings: literal prefixes first."""
    if not any(p in data for p in KEY_PREFIXES):
        return False
    return bool(KEY_PATTERNS_BYTES.search(data))


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
        needles: list[Any] = [v for v in values if v]
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


# -- cells ---------------------------------------------------------------------------
def _target_names(node: ast.AST) -> list[str]:
    """The names an assignment target binds or writes: ``x``, ``cfg.token``, ``os.environ['HF_TOKEN']``."""
    out: list[str] = []
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            out.append(n.attr)
        elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            out.append(n.slice.value)
    return out


def _secret_spans(tree: ast.AST) -> list[ast.expr]:
    """Expressions whose value is a secret by where it goes: the right-hand side of an assignment
    to a secret name, a secret-named keyword argument, the value of a secret-named dict key."""
    spans: list[ast.expr] = []
    for n in ast.walk(tree):
        value: ast.expr | None = None
        if isinstance(n, ast.Assign):
            if any(is_secret_name(t, strict=True) for tg in n.targets for t in _target_names(tg)):
                value = n.value
        elif isinstance(n, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
            if n.value is not None and any(is_secret_name(t, strict=True) for t in _target_names(n.target)):
                value = n.value
        elif isinstance(n, ast.keyword):
            if n.arg and is_secret_name(n.arg, strict=True):
                value = n.value
        elif isinstance(n, ast.Dict):
            for k, v in zip(n.keys, n.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and is_secret_name(k.value, strict=True):
                    spans.append(v)
        elif isinstance(n, ast.Call) and len(n.args) >= 2 and isinstance(n.args[0], ast.Constant) \
                and isinstance(n.args[0].value, str) and is_secret_name(n.args[0].value, strict=True) \
                and isinstance(n.func, (ast.Attribute, ast.Name)) \
                and (n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id) in ("setdefault", "putenv",
                                                                                         "__setitem__", "setenv"):
            value = n.args[1]
        if value is not None and not (isinstance(value, ast.Constant) and not isinstance(value.value, (str, bytes))):
            spans.append(value)
    return spans


def _mask_magics(code: str) -> str:
    """Raw cell text with IPython-only lines (``%magic``, ``!cmd``) turned into comments of the
    same length, so the rest parses as Python with unchanged positions."""
    lines = code.splitlines(keepends=True)
    if lines and lines[0].lstrip().startswith("%%"):
        return "".join(_MAGIC_LINE.sub(r"\1#", ln, count=1) if ln.strip() else ln for ln in lines)
    return "".join(_MAGIC_START.sub(r"\1#", ln, count=1) for ln in lines)


_MAGIC_START = re.compile(r"^(\s*)[%!]")
_MAGIC_LINE = re.compile(r"^(\s*)\S")
_LINE_ASSIGN = re.compile(r"^(?P<lhs>\s*[A-Za-z_][\w.]*(?:\[['\"][^'\"]+['\"]\])?\s*(?::[^=]+)?[+]?=(?!=)\s*)"
                          r"(?P<rhs>.+)$")


# ``--token T``, ``--token=T``, ``--api-key "T"``: an option naming a credential and its value,
# in a magic line (``%handoff``) or the call IPython turns it into (``run_line_magic(..., '--token T')``)
_SECRET_OPTION = re.compile(r"""(?P<opt>--?[A-Za-z][\w-]*)(?P<sep>[ \t]*=[ \t]*|[ \t]+)"""
                            r"""(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s'"\\)]+)""")


def redact_options(text: str) -> str:
    """``text`` with the value of every credential-named command-line option redacted."""
    def cut(m: re.Match[str]) -> str:
        if not is_secret_name(m.group("opt").lstrip("-").replace("-", "_"), strict=True) \
                or m.group("value").startswith("-"):
            return m.group(0)
        return m.group("opt") + m.group("sep") + REDACTED
    return _SECRET_OPTION.sub(cut, text)


def redact_cell(code: str, values: Iterable[str] = ()) -> str:
    """A cell's text with every secret in it replaced by ``<redacted>``: by position (what is
    assigned to a secret name, however it is built), credential-named options (``--token T``),
    by value and by shape."""
    if not isinstance(code, str) or not code:
        return code
    code = redact_options(code)
    try:
        tree = ast.parse(_mask_magics(code))
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        offsets = [0]
        for ln in code.splitlines(keepends=True):
            offsets.append(offsets[-1] + len(ln))
        cuts: list[tuple[int, int]] = []
        for node in _secret_spans(tree):
            if getattr(node, "end_lineno", None) is None:
                continue
            start = _char_offset(code, offsets, node.lineno, node.col_offset)
            end = _char_offset(code, offsets, node.end_lineno, node.end_col_offset)  # type: ignore[arg-type]
            cuts.append((start, end))
        for start, end in _outermost(cuts):
            code = code[:start] + REDACTED + code[end:]
    else:   # not Python (a magic inside an expression): by line
        code = "".join(_redact_line(ln) for ln in code.splitlines(keepends=True))
    return redact(code, values, patterns=True)


def _char_offset(code: str, offsets: list[int], lineno: int, col: int) -> int:
    """ast columns count UTF-8 bytes; turn (line, byte column) into an index into ``code``."""
    line_start = offsets[lineno - 1]
    line = code[line_start: offsets[lineno] if lineno < len(offsets) else len(code)]
    return line_start + len(line.encode("utf-8")[:col].decode("utf-8", "ignore"))


def _outermost(cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-overlapping spans, last first (so earlier offsets stay valid while cutting)."""
    kept: list[tuple[int, int]] = []
    for s, e in sorted(cuts, key=lambda c: (c[0], -c[1])):
        if kept and s < kept[-1][1]:
            continue
        kept.append((s, e))
    return sorted(kept, reverse=True)


def _redact_line(line: str) -> str:
    m = _LINE_ASSIGN.match(line.rstrip("\n"))
    if not m:
        return line
    lhs = m.group("lhs")
    target = re.split(r"[\s:+=]", lhs.strip(), maxsplit=1)[0]
    if not any(is_secret_name(t, strict=True) for t in re.findall(r"\w+", target)):
        return line
    return lhs + REDACTED + ("\n" if line.endswith("\n") else "")

