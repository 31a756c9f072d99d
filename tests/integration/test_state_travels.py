"""State that travels (issue 17), in real kernel pairs: cells run in kernel A, ``%snapshot save``,
``%snapshot load`` in a fresh kernel B started in ANOTHER directory; every item is checked by
value and by identity there, and no secret of any common shape is in any byte of the bundle."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness.kernels import Kernel, kernel_env

# real-looking secrets of every common shape (none of them is a live credential)
ENV_SECRETS = {
    "OPENAI_API_KEY": "sk-proj-Q2xT9vB7nM4kL1pZ8wR5yU3eA6sD0fGhJ",
    "HF_TOKEN": "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",
    "DB_PASS_SECRET": "correct-horse-battery-staple-42",
}
TYPED_SECRETS = {   # typed into cells, built in ways a name-only check would miss
    "anthropic": "sk-ant-api03-" + "Zx9Kq2Lm5Np8Rs1Tv4Wy7Ab0Cd3Ef6Gh9Ij2Kl5Mn8Op1Qr4St7Uv0Wx3Yz6",
    "github": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "aws_id": "AKIAIOSFODNN7QWERTYU",
    "aws_secret": "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",
    "slack": "xoxb-2048-4096-" + "Tq8Wm3Zr5Lp0Vn7Xb2",
    "password": "Hunter2-Very-Secret-99",
    "hf_tail": "AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZTEyMzQ1In0.c2lnbmF0dXJlLW9mLWEtand0LXRva2Vu",
    "bearer": "Bearer-9f8e7d6c5b4a3210fedcba9876543210",
    "url_pw": "s3cr3t-pg-pass",
}

CELLS = [
    # -- secrets: by name, by value, by shape, however the literal is built --------------------
    "import os, io, sqlite3, threading, queue, weakref, functools, enum\n"
    "from concurrent.futures import ThreadPoolExecutor",
    "OPENAI_API_KEY = os.environ['OPENAI_API_KEY']\nmy_model_key = os.environ['HF_TOKEN']\n"
    "hf_token = 'hf_' + 'AbCdEfGhIjKlMnOpQrStUvWxYz012345'",
    f"aws_secret_access_key = \"{TYPED_SECRETS['aws_secret']}\"\nAWS_ACCESS_KEY_ID = '{TYPED_SECRETS['aws_id']}'\n"
    f"githubToken = f\"ghp_{{'{TYPED_SECRETS['github'][4:]}'}}\"\n"
    f"db_password = ''.join(['Hunter2', '-Very-Secret-99'])",
    f"claude = '{TYPED_SECRETS['anthropic']}'\nchannel = ['{TYPED_SECRETS['slack']}']\n"
    f"session = '{TYPED_SECRETS['jwt']}'\n"
    f"cfg = {{'user': 'bob', 'password': 'Hunter2-' + 'Very-Secret-99', 'host': 'db'}}\n"
    f"headers = {{'Authorization': '{TYPED_SECRETS['bearer']}'}}\n"
    f"dsn = 'postgresql://bob:{TYPED_SECRETS['url_pw']}@db:5432/sales'\n"
    "conn_pw = os.environ['DB_PASS_SECRET']",
    "def connect(password=None, api_key=None):\n    return 'connected'\n"
    f"state = connect(password='Hunter2-Very-Secret-99', api_key='{TYPED_SECRETS['anthropic']}')",
    # non-strings travel whatever their name
    "class Tokenizer:\n    def __init__(self):\n        self.vocab = {'a': 0, 'b': 1}\n"
    "    def __call__(self, s):\n        return [self.vocab[c] for c in s]\n"
    "tokenizer = Tokenizer()\ntokens = tokenizer('abba')\nkeys = ['a', 'b']\nsort_keys = True\n"
    "hotkey_map = {'ctrl+s': 'save'}\nkey_seen = None\nmax_tokens = 256\ntoken_ids = [3, 1, 4]\n"
    "keywords = ['x']\nmonkey = 'banana'\njoin_key = 'customer_id'",
    # -- reducers: sqlite3 filled in later cells, files in every state, weakrefs, threading ----------
    "db = sqlite3.connect(':memory:')\ndb.execute('create table t (a integer, b text)')",
    "db.executemany('insert into t values (?, ?)', [(1, 'one'), (2, 'two'), (3, 'three')])\ndb.commit()",
    "db.execute('delete from t where a = 2')\ndb.execute(\"insert into t values (4, 'four')\")\ndb.commit()\n"
    "cur = db.cursor()",
    "fdb = sqlite3.connect('local.db')\nfdb.execute('create table if not exists k (v)')\n"
    "fdb.execute('insert into k values (7)')\nfdb.commit()",
    "with open('data.csv') as closed_fh:\n    header = closed_fh.readline()",
    "reader = open('data.csv')\nfirst = reader.readline()",
    "blob = open('blob.bin', 'rb')\nblob.seek(10)",
    "appender = open('log.txt', 'a')\nappender.write('second\\n')",
    "writer = open('out.txt', 'w')\nwriter.write('partial')",
    "class Node:\n    def __init__(self, name):\n        self.name = name\n"
    "target = Node('t')\nref = weakref.ref(target)\nregistry = weakref.WeakValueDictionary({'t': target})\n"
    "dead = weakref.ref(Node('gone'))",
    "lock = threading.Lock()\nheld = threading.Lock()\nheld.acquire()\nrlock = threading.RLock()\n"
    "ready = threading.Event()\nready.set()\ncond = threading.Condition(lock)\n"
    "jobs = queue.Queue()\nfor j in ('a', 'b', 'c'):\n    jobs.put(j)\n"
    "prio = queue.PriorityQueue()\nfor j in (3, 1, 2):\n    prio.put(j)\n"
    "pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix='crunch')",
    "import ipywidgets\nslider = ipywidgets.IntSlider(value=5, min=0, max=10, description='k')\n"
    "panel = ipywidgets.VBox([slider])",
    # -- notebook code dill cannot rebuild: by source -------------------------------------------
    "@functools.lru_cache(maxsize=None)\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "fib(20)",
    "def bump(fn):\n    @functools.wraps(fn)\n    def wrapper(*a):\n        return fn(*a) + 1\n    return wrapper\n"
    "@bump\ndef inc(x):\n    return x",
    "class Color(enum.Enum):\n    RED = 1\n    GREEN = 2\nclass Level(enum.IntEnum):\n    LOW = 1\n    HIGH = 2\n"
    "fav = Color.GREEN\npalette = [Color.RED, Color.GREEN]\nlevel = Level.HIGH",
    "class Meta(type):\n    def __new__(m, name, bases, ns):\n        ns['tag'] = name.lower()\n"
    "        return super().__new__(m, name, bases, ns)\nclass Tagged(metaclass=Meta):\n    pass\n"
    "tagged = Tagged()",
    # -- local modules from the working dir -------------------------------------------------------
    "import helpers as h\nfrom mypkg.util import clean",
]

CHECK = r"""
_c('travel', lambda: [tokens, keys, sort_keys, hotkey_map, key_seen, max_tokens, token_ids, keywords, monkey,
                      join_key, tokenizer('ab'), type(tokenizer).__name__])
_c('held_back', lambda: sorted(n for n in ('OPENAI_API_KEY', 'my_model_key', 'hf_token', 'aws_secret_access_key',
                                           'AWS_ACCESS_KEY_ID', 'githubToken', 'db_password', 'claude',
                                           'session', 'dsn', 'conn_pw') if n in globals()))
_c('sqlite', lambda: db.execute('select * from t order by a').fetchall())
_c('sqlite_cursor', lambda: [cur.connection is db, cur.execute('select count(*) from t').fetchone()[0]])
_c('sqlite_file', lambda: fdb.execute('select v from k').fetchall())
_c('closed', lambda: [closed_fh.closed, closed_fh.name.endswith('data.csv'), closed_fh.mode, header])
_c('reader', lambda: [reader.closed, reader.readline(), reader.mode])
_c('blob', lambda: [blob.tell(), list(blob.read(4)), blob.mode, type(blob).__name__])
_c('appender', lambda: [appender.mode, appender.write('third\n'), appender.flush(), open('log.txt').read()])
_c('writer', lambda: [open('out.txt').read(), writer.tell(), writer.write('+more'), writer.flush(),
                      open('out.txt').read(), writer.mode])
_c('paths', lambda: [reader.name,
                     __import__('os').fstat(reader.fileno()).st_ino == __import__('os').stat('data.csv').st_ino,
                     __import__('os').fstat(writer.fileno()).st_ino == __import__('os').stat('out.txt').st_ino])
_c('weakref', lambda: [ref() is target, registry['t'] is target, dead() is None, type(registry).__name__])
_c('locks', lambda: [lock.locked(), held.locked(), rlock.acquire(blocking=False), ready.is_set(),
                     cond._lock is lock, type(lock).__name__])
_c('queues', lambda: [[jobs.get_nowait() for _ in range(3)], [prio.get_nowait() for _ in range(3)]])
_c('pool', lambda: [pool._max_workers, pool._thread_name_prefix, pool.submit(lambda: 6 * 7).result(timeout=10)])
_c('widget', lambda: [type(slider).__name__, slider.value, slider.max, slider.description,
                      panel.children[0] is slider, slider.comm is not None])
_c('lru', lambda: [fib(30), hasattr(fib, 'cache_info')])
_c('wraps', lambda: [inc(1), inc.__name__, inc.__wrapped__(1)])
_c('enum', lambda: [fav is Color.GREEN, palette[0] is Color.RED, level is Level.HIGH, int(level),
                    [c.name for c in Color]])
_c('metaclass', lambda: [type(tagged) is Tagged, Tagged.tag, type(Tagged).__name__])
_c('local_modules', lambda: [h.shout('hi'), clean('  x '), h.__file__.startswith(__import__('os').getcwd())])
"""

EXPECTED = {
    "travel": [[0, 1, 1, 0], ["a", "b"], True, {"ctrl+s": "save"}, None, 256, [3, 1, 4], ["x"], "banana",
               "customer_id", [0, 1], "Tokenizer"],
    "held_back": [],
    "sqlite": [[1, "one"], [3, "three"], [4, "four"]],
    "sqlite_cursor": [True, 3],
    "sqlite_file": [[7]],
    "closed": [True, True, "r", "a,b\n"],
    "reader": [False, "1,2\n", "r"],
    "blob": [10, [10, 11, 12, 13], "rb", "BufferedReader"],
    "appender": ["a", 6, None, "first\nsecond\nthird\n"],
    "writer": ["partial", 7, 5, None, "partial+more", "w"],
    "paths": ["data.csv", True, True],   # opened in the new working directory, names as the user wrote them
    "weakref": [True, True, True, "WeakValueDictionary"],
    "locks": [False, True, True, True, True, "lock"],
    "queues": [["a", "b", "c"], [1, 2, 3]],
    "pool": [3, "crunch", 42],
    "widget": ["IntSlider", 5, 10, "k", True, True],
    "lru": [832040, True],
    "wraps": [2, "inc", 1],
    "enum": [True, True, True, 2, ["RED", "GREEN"]],
    "metaclass": [True, "tagged", "Meta"],
    "local_modules": ["HI!", "x", True],
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("travels")
    src, dst, bundle = base / "src", base / "elsewhere" / "dst", base / "bundle"
    src.mkdir()
    dst.mkdir(parents=True)
    (src / "data.csv").write_text("a,b\n1,2\n3,4\n")
    (src / "blob.bin").write_bytes(bytes(range(32)))
    (src / "log.txt").write_text("first\n")
    (src / "helpers.py").write_text("def shout(s):\n    return s.upper() + '!'\n")
    (src / "mypkg").mkdir()
    (src / "mypkg" / "__init__.py").write_text("")
    (src / "mypkg" / "util.py").write_text("def clean(s):\n    return s.strip()\n")
    a = Kernel(src, kernel_env(**ENV_SECRETS))
    b = Kernel(dst, kernel_env())
    try:
        for cell in CELLS:
            a.ok(cell)
        a.ok("%load_ext handoff_magic")
        dry = a.ok("%handoff --dry-run")
        check = a.ok("%snapshot check")
        a.ok(f"%snapshot save {bundle}")
        report = json.loads(a.ok("import json; print(json.dumps(_.to_dict()))")["stdout"])
        b.ok("%load_ext handoff_magic")
        loaded = b.ok(f"%snapshot load {bundle}")
        checks = b.check(CHECK)
        yield {"a": a, "b": b, "bundle": bundle, "report": report, "checks": checks, "loaded": loaded,
               "dst": dst, "dry": dry, "check": check, "base": base}
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("item", sorted(EXPECTED))
def test_item_restored_by_value_and_identity(pair: Any, item: str) -> None:
    assert pair["checks"][item] == EXPECTED[item], f"{item}: {pair['checks'][item]!r}"


def test_no_secret_in_any_byte_of_the_bundle(pair: Any) -> None:
    secrets = list(ENV_SECRETS.values()) + list(TYPED_SECRETS.values())
    files = [p for p in pair["bundle"].rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"{s[:6]}... found in {p.name}"


def test_history_keeps_cells_but_not_their_secrets(pair: Any) -> None:
    manifest = json.loads((pair["bundle"] / "manifest.json").read_text())
    cells = "\n".join(manifest["history"]["In"])
    assert "hf_token = <redacted>" in cells and "db_password = <redacted>" in cells
    assert "connect(password=<redacted>, api_key=<redacted>)" in cells
    assert "'password': <redacted>" in cells and "'Authorization': <redacted>" in cells
    assert "tokens = tokenizer('abba')" in cells   # ordinary cells untouched


def test_methods_reported_honestly(pair: Any) -> None:
    rows = {v["name"]: v for v in pair["report"]["variables"]}
    for name in ("db", "fdb", "reader", "blob", "writer", "appender", "closed_fh", "ref", "registry", "lock",
                 "jobs", "pool", "slider"):
        assert rows[name]["method"] == "reducer" and rows[name]["outcome"] == "ok", rows[name]
    for name in ("fib", "inc", "Color", "Level", "Tagged"):
        assert rows[name]["outcome"] == "ok" and "source" in (rows[name]["reason"] or ""), rows[name]
    assert "skipped" not in {rows[n]["outcome"] for n in ("tokens", "tokenizer", "keys", "key_seen")}
    assert rows["hf_token"]["outcome"] == "skipped" and "secret" in rows["hf_token"]["reason"]
    manifest = json.loads((pair["bundle"] / "manifest.json").read_text())
    names = {v["name"] for v in manifest["variables"]}
    assert {"OPENAI_API_KEY", "hf_token", "db_password", "claude"}.isdisjoint(names)   # not even their names


def test_every_ok_variable_loaded(pair: Any) -> None:
    saved = {v["name"] for v in pair["report"]["variables"] if v["outcome"] == "ok"}
    out = pair["b"].ok(f"print(sorted(n for n in {sorted(saved)!r} if n not in globals()))")["stdout"]
    assert out.strip() == "[]", out


def test_dry_run_says_what_would_travel_before_anything_is_sent(pair: Any) -> None:
    text = pair["dry"]["data"][0]["text/plain"]
    assert text.startswith("Dry run: what would travel (nothing was sent)")
    assert "db " in text and "reducer" in text and "would travel" in text
    assert "hf_token" in text and "looks like a secret" in text   # left out, and why
    assert pair["check"]["data"][0]["text/plain"].startswith("Dry run")
    assert not list(pair["base"].glob("handoff-dry-run-*"))
