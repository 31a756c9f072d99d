"""What counts as a secret (DESIGN "Capture"): names by their words, values by equality with
secret environment values and by the shape of well-known keys; cells by where a value goes."""
from __future__ import annotations

from pathlib import Path

import pytest

from handoff_magic import save_state, secrets

SECRET_NAMES = ["OPENAI_API_KEY", "api_key", "apiKey", "APIKey", "hf_token", "hfToken", "HF_TOKEN", "token",
                "secret", "client_secret", "db_password", "passwd", "credentials", "AWS_CREDENTIALS",
                "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "my_key", "OPENAI_KEY", "accessToken",
                "SECRET_KEY_BASE", "jwt_secret", "api_key_2"]
DATA_NAMES = ["tokens", "tokenizer", "keys", "sort_keys", "hotkey_map", "key_seen", "keywords", "monkey",
              "max_tokens", "n_tokens", "key", "primary_key", "join_key", "df", "model", "secretary"]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_credential_names(name: str) -> None:
    assert secrets.is_secret_name(name)


@pytest.mark.parametrize("name", DATA_NAMES)
def test_data_names(name: str) -> None:
    assert not secrets.is_secret_name(name)


KEYS = ["sk-proj-Q2xT9vB7nM4kL1pZ8wR5yU3eA6sD0fGhJ", "sk-ant-api03-Zx9Kq2Lm5Np8Rs1Tv4Wy7Ab0Cd3Ef6",
        "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstu",
        "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", "AKIAIOSFODNN7QWERTYU", "xoxb-2048-4096-Tq8Wm3Zr5Lp0Vn7Xb2",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "glpat-Ab1Cd2Ef3Gh4Ij5Kl6Mn7", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8tLk3mNa",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZTEyMzQ1In0.c2lnbmF0dXJlLW9mLWEtand0",
        "postgresql://bob:s3cr3t-pg-pass@db:5432/sales", "-----BEGIN RSA PRIVATE KEY-----\nMIIE"]


@pytest.mark.parametrize("key", KEYS)
def test_key_shapes(key: str) -> None:
    assert secrets.looks_like_key(key)


@pytest.mark.parametrize("text", ["da39a3ee5e6b4b0d3255bfef95601890afd80709", "a" * 40, "task-1234567890abcdefghij",
                                  "https://example.org/data.csv", "skeleton-key"])
def test_ordinary_strings_are_not_keys(text: str) -> None:
    assert not secrets.looks_like_key(text)


def test_only_strings_are_held_back_by_name() -> None:
    assert secrets.is_secret_variable("token", "abc123xyz", set())
    assert secrets.is_secret_variable("api_key", b"raw-bytes-key", set())
    for value in (None, 42, ["a", "b"], {"ctrl": "c"}, object()):
        assert not secrets.is_secret_variable("token", value, set())
    assert secrets.is_secret_variable("plain", "the-env-value-1", {"the-env-value-1"})
    assert not secrets.is_secret_variable("tokens", "a b c", set())


def test_values_one_level_inside_dicts_and_objects_are_known() -> None:
    class Conn:
        def __init__(self) -> None:
            self.password = "pg-pass-1234"

    vals = secrets.secret_values({"cfg": {"password": "hunter2-secret"}, "conn": Conn(), "n": {"key_seen": 1}},
                                 environ={})
    assert {"hunter2-secret", "pg-pass-1234"} <= vals


CELLS = [
    ("hf_token = 'hf_' + 'abcdefghijklmnopqrstuvwxyz0123'\nx = 1", "hf_token = <redacted>\nx = 1"),
    ('api_key = f"{prefix}-{rest}"; y = 2', "api_key = <redacted>; y = 2"),
    ("password = getpass('pw')", "password = <redacted>"),
    ("client = OpenAI(api_key='whatever-123', timeout=3)", "client = OpenAI(api_key=<redacted>, timeout=3)"),
    ("os.environ['HF_TOKEN'] = 'abc' 'def'", "os.environ['HF_TOKEN'] = <redacted>"),
    ("cfg = {'password': 'hunter2!', 'user': 'bob'}", "cfg = {'password': <redacted>, 'user': 'bob'}"),
    ("%matplotlib inline\ntoken = ('abc'\n  'def')\nprint(1)", "%matplotlib inline\ntoken = (<redacted>)\nprint(1)"),
    ("x = !ls\nDB_PASSWORD = 'zzz'", "x = !ls\nDB_PASSWORD = <redacted>"),
    ("s = 'é'; secret = 'ü' + 'x'", "s = 'é'; secret = <redacted>"),
    ("key_seen = None\ntokens = tokenize('a b')\ntoken_ids = ids(t)", None),
    ("url = 'postgres://bob:hunter2pw@db:5432/x'", "url = 'postgres://bob:<redacted>@db:5432/x'"),
]


@pytest.mark.parametrize("cell,want", CELLS)
def test_cells_lose_what_is_assigned_to_secret_names(cell: str, want: str | None) -> None:
    assert secrets.redact_cell(cell) == (cell if want is None else want)


def test_capture_keeps_data_named_like_keys_and_drops_secrets(tmp_path: Path) -> None:
    ns = {"tokens": ["a", "b"], "sort_keys": True, "key_seen": None, "hotkey_map": {"k": "v"},
          "api_key": "plain-but-named-secret", "leak": "sk-proj-Q2xT9vB7nM4kL1pZ8wR5yU3eA6sD0fGhJ"}
    rep = save_state(tmp_path / "b", ns=ns, files=False, environ={})
    rows = {r.name: r for r in rep.variables}
    assert {n: rows[n].outcome for n in ("tokens", "sort_keys", "key_seen", "hotkey_map")} == \
        dict.fromkeys(("tokens", "sort_keys", "key_seen", "hotkey_map"), "ok")
    assert rows["api_key"].outcome == rows["leak"].outcome == "skipped"
    for p in (tmp_path / "b").rglob("*"):
        if p.is_file():
            assert b"plain-but-named-secret" not in p.read_bytes()
