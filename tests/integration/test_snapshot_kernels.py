"""Snapshot engine end to end in real kernels: define the hard-object corpus in kernel A,
`%snapshot save`, restore into a fresh kernel B in another directory, compare values,
types and identities. Two kernels for the whole module."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from handoff_magic.chunks import shard_path
from tests.harness.kernels import Kernel
from tests.harness.kernels import kernel_env as _env

SECRET = "sk-handoff-test-9f8e7d6c5b4a"

CORPUS = [
    "import os, sqlite3, threading, dataclasses\nimport numpy as np\nimport pandas as pd\n"
    "import numpy.linalg as la\nfrom math import sqrt as s",
    "big = np.random.default_rng(0).random(3_000_000)\nbig_sum = float(big.sum())\nview = big[10:20]\n"
    "ints = np.arange(12, dtype=np.int32).reshape(3, 4)",
    "df = pd.DataFrame({'cat': pd.Categorical(['a', 'b', 'a', 'c']),\n"
    "                   'when': pd.date_range('2024-01-01', periods=4, tz='Europe/Paris'),\n"
    "                   'x': [1.5, 2.5, 3.5, 4.5]},\n"
    "                  index=pd.MultiIndex.from_product([[1, 2], ['u', 'v']], names=['k', 'l']))\ndf",
    "shared = [1, 2, 3]\nx = {'a': shared, 'b': shared}\ny = shared\nalias = x\n"
    "rec = {'name': 'loop'}\nrec['self'] = rec",
    "sq = lambda t: t * t\n"
    "def make_adder(k):\n    def add(z):\n        return z + k\n    return add\nadd5 = make_adder(5)\n"
    "def twice(v):\n    return 2 * v",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "    def norm2(self):\n        return self.x ** 2 + self.y ** 2\npt = Point(3, 4)\npts = [pt, Point(1, 1)]",
    "@dataclasses.dataclass\nclass Item:\n    name: str\n    qty: int = 1\nitem = Item('pen', 3)",
    "gen = (i * i for i in range(5))",
    "con = sqlite3.connect(':memory:')\ncon.execute('create table t (a integer, b text)')\n"
    "con.executemany('insert into t values (?, ?)', [(1, 'one'), (2, 'two')])\ncon.commit()",
    "lock = threading.Lock()",
    "fh = open('data.csv')",
    "wfh = open('out.log', 'a')",
    "class Unpicklable:\n    def __reduce__(self):\n        raise RuntimeError('refuses to be pickled')\n"
    "bad = Unpicklable()",
    "OPENAI_API_KEY = os.environ['OPENAI_API_KEY']\nleak = os.environ['OPENAI_API_KEY']\n"
    "settings = {'model': 'm', 'key': os.environ['OPENAI_API_KEY']}\nprint('key is', OPENAI_API_KEY)",
    "import ipywidgets\nslider = ipywidgets.IntSlider()",
    "counter = 41\ncounter += 1\ncounter",
    f"len('{SECRET}')",
    "vv = view[::2]\nviews = {'first': big[:5], 'same': view}",
    "nested_lock = {'lock': threading.RLock(), 'n': 1}",
    "limit = 100\nsquares = (i * i for i in range(limit))",
    "limit = 5",
    "import socket\nsock = socket.socket()",
    "holder = {'out': wfh}",
    "class Point3(Point):\n    def __init__(self, x, y, z):\n        super().__init__(x, y)\n        self.z = z\n"
    "    def norm2(self):\n        return super().norm2() + self.z ** 2\np3 = Point3(1, 2, 2)",
    "items = [Item(f'i{k}', k) for k in range(1000)]\nops = {'inc': lambda v: v + 1, 'sq': sq}",
    "def logged(fn):\n    def wrapper(*a):\n        return ('logged', fn(*a))\n    return wrapper\n"
    "@logged\ndef half(v):\n    return v / 2",
]

CHECK = r"""
import numpy as _np
_c('big', lambda: [type(big).__name__, big.shape[0], float(big.sum()) == big_sum, big.flags.writeable])
_c('view', lambda: [view.base is not None, bool(_np.shares_memory(view, big)), float(view[0]) == float(big[10])])
_c('ints', lambda: [str(ints.dtype), ints.tolist()[2]])
_c('df', lambda: [str(df['cat'].dtype), str(df['when'].dtype), list(df.index.names), df['x'].sum(),
                  df.index.tolist()[3]])
_c('shared', lambda: [x['a'] is y, x['b'] is y, alias is x, y == [1, 2, 3]])
_c('rec', lambda: rec['self'] is rec)
_c('lambda', lambda: sq(7))
_c('closure', lambda: add5(1))
_c('function', lambda: twice(21))
_c('class', lambda: [type(pt) is Point, pt.norm2(), all(type(p) is Point for p in pts), pts[0] is pt])
_c('dataclass', lambda: [repr(item), dataclasses.is_dataclass(item)])
_c('generator', lambda: list(gen))
_c('sqlite', lambda: con.execute('select a, b from t order by a').fetchall())
_c('lock', lambda: [type(lock).__name__, lock.acquire(blocking=False)])
_c('file', lambda: [fh.name, fh.read(), fh.mode])
_c('modules', lambda: [np.__name__, la.__name__, s(16), pd.__name__])
_c('names', lambda: sorted(k for k in ('bad', 'wfh', 'OPENAI_API_KEY', 'leak', 'settings', 'slider', 'Unpicklable')
                           if k in globals()))
_c('counter', lambda: counter)
_c('In', lambda: [len(In), In[3][:20], 'big = np.random' in In[2]])
_c('Out', lambda: [sorted(Out)[:3], 'cat' in repr(Out[3])])
_c('out_log', lambda: open('out.log').read())
_c('views2', lambda: [bool(_np.shares_memory(vv, big)), vv.strides == view[::2].strides,
                      bool(_np.shares_memory(views['first'], big)), views['same'] is view])
_c('nested_lock', lambda: [type(nested_lock['lock']).__name__, nested_lock['n']])
_c('scratch', lambda: [limit, len(list(squares))])
_c('socket', lambda: type(sock).__name__)
_c('holder', lambda: [holder['out'] is wfh, wfh.mode, wfh.closed])
_c('subclass', lambda: [issubclass(Point3, Point), type(p3) is Point3, p3.norm2(), isinstance(p3, Point)])
_c('instances', lambda: [len(items), all(type(i) is Item for i in items), items[7].qty, ops['inc'](1),
                         ops['sq'] is sq])
_c('decorated', lambda: half(8))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("snap")
    src, dst, bundle = base / "src", base / "dst", base / "bundle"
    src.mkdir()
    dst.mkdir()
    (src / "data.csv").write_text("a,b\n1,2\n")
    (src / ".gitignore").write_text("data.csv\nresults/\n")
    (src / "results").mkdir()
    (src / "results" / "model.bin").write_bytes(os.urandom(5000))
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]\n")
    (src / "env").mkdir()
    (src / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    (src / "env" / "lib.py").write_text("x = 1\n")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0" * 10)
    (src / "huge.bin").write_bytes(b"\1" * 300_000)
    (src / "out.log").write_text("keep me\n")
    (src / "keys.txt").write_text(f"token={SECRET}\n")
    os.symlink("/etc/passwd", src / "passwd-link")
    a = Kernel(src, _env(OPENAI_API_KEY=SECRET, HANDOFF_MAX_FILE_BYTES="200000"))
    b = Kernel(dst, _env())
    try:
        for cell in CORPUS:
            a.ok(cell)
        a.ok("%load_ext handoff_magic")
        saved = a.ok(f"%snapshot save {bundle}")
        report = json.loads(a.ok("import json; print(json.dumps(_.to_dict()))")["stdout"])
        b.ok("%load_ext handoff_magic")
        loaded = b.ok(f"%snapshot load {bundle}")
        checks = b.check(CHECK)
        yield {"a": a, "b": b, "src": src, "dst": dst, "bundle": bundle, "saved": saved, "loaded": loaded,
               "report": report, "checks": checks}
    finally:
        a.stop()
        b.stop()


EXPECTED = {
    "big": ["ndarray", 3_000_000, True, True],
    "view": [True, True, True],
    "ints": ["int32", [8, 9, 10, 11]],
    "df": ["category", "datetime64[ns, Europe/Paris]", ["k", "l"], 12.0, [2, "v"]],
    "shared": [True, True, True, True],
    "rec": True,
    "lambda": 49,
    "closure": 6,
    "function": 42,
    "class": [True, 25, True, True],
    "dataclass": ["Item(name='pen', qty=3)", True],
    "generator": [0, 1, 4, 9, 16],
    "sqlite": [[1, "one"], [2, "two"]],
    "lock": ["lock", True],
    "file": ["data.csv", "a,b\n1,2\n", "r"],
    "modules": ["numpy", "numpy.linalg", 4.0, "pandas"],
    "names": ["Unpicklable", "slider", "wfh"],  # the class travels, its instance cannot; no secret does
    "counter": 42,
    "out_log": "keep me\n",
    "views2": [True, True, True, True],
    "nested_lock": ["RLock", 1],
    "scratch": [5, 100],   # replaying the generator's cell did not clobber the restored `limit`
    "socket": "socket",
    "holder": [True, "a", False],   # an append handle travels by its reducer, shared with its holder
    "subclass": [True, True, 9, True],
    "instances": [1000, True, 7, 2, True],
    "decorated": ["logged", 4.0],
}


@pytest.mark.parametrize("item", sorted(EXPECTED))
def test_corpus_item_restored_in_fresh_kernel(world: Any, item: str) -> None:
    got = world["checks"][item]
    want: Any = EXPECTED[item]
    if item == "df":  # pandas picks the datetime unit
        assert got[1].startswith("datetime64[") and got[1].endswith("Europe/Paris]"), got
        got = got[:1] + [want[1]] + got[2:]
    assert got == want, f"{item}: {got!r}"


def test_each_variable_reports_method_and_reason(world: Any) -> None:
    rows = {v["name"]: v for v in world["report"]["variables"]}
    assert rows["big"]["method"] == "pickle5" and rows["view"]["method"] == "pickle5"
    # one group: big and its views, pickled together so they stay views of one array
    assert sum(rows[n]["bytes"] for n in ("big", "view", "vv", "views")) >= 24_000_000
    assert rows["df"]["method"] == "pickle5"
    assert rows["sq"]["method"] == "dill" and rows["add5"]["method"] == "dill" and rows["pt"]["method"] == "dill"
    for name in ("gen", "squares", "sock"):
        assert rows[name]["method"] == "replay", rows[name]
    for name in ("con", "lock", "fh", "nested_lock", "wfh", "holder", "slider"):
        assert rows[name]["method"] == "reducer" and rows[name]["outcome"] == "ok", rows[name]
    assert rows["bad"]["outcome"] == "skipped" and "refuses to be pickled" in rows["bad"]["reason"]
    assert rows["np"]["method"] == "import" and rows["s"]["method"] == "import"
    for name in ("OPENAI_API_KEY", "leak"):
        assert rows[name]["reason"] == "looks like a secret"
    assert rows["settings"]["outcome"] == "skipped" and "secret" in rows["settings"]["reason"]
    assert not any(n in rows for n in ("In", "Out", "_", "_i3", "get_ipython", "exit", "quit"))


def test_reports_render_as_tables(world: Any) -> None:
    saved_html = world["saved"]["data"][0]["text/html"]
    assert "<table" in saved_html and "big" in saved_html and "replay" in saved_html
    loaded = world["loaded"]["data"][0]
    assert "<table" in loaded["text/html"] and "restored" in loaded["text/plain"]


def test_imports_are_import_lines(world: Any) -> None:
    manifest = json.loads((world["bundle"] / "manifest.json").read_text())
    assert "import numpy as np" in manifest["imports"]
    assert "from numpy import linalg as la" in manifest["imports"]
    assert "from math import sqrt as s" in manifest["imports"]


def test_summaries_carry_no_memory_addresses(world: Any) -> None:
    """An address changes in every process: a diff would flag unchanged variables as changed."""
    import re
    manifest = json.loads((world["bundle"] / "manifest.json").read_text())
    summaries = {v["name"]: v.get("summary") or "" for v in manifest["variables"]}
    assert summaries["pt"].startswith("Point: <__main__.Point object>"), summaries["pt"]
    assert summaries["twice"] == "function: <function twice>", summaries["twice"]
    with_address = {n: s for n, s in summaries.items() if re.search(r"0x[0-9a-fA-F]{6,}", s)}
    assert not with_address


def test_secret_never_in_bundle_bytes(world: Any) -> None:
    needle = SECRET.encode()
    for path in world["bundle"].rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), f"secret found in {path}"
    manifest = json.loads((world["bundle"] / "manifest.json").read_text())
    names = {v["name"] for v in manifest["variables"]}
    assert not names & {"OPENAI_API_KEY", "leak"}
    assert "<redacted>" in json.dumps(manifest["history"])


def test_files_travel_with_ignores_and_caps(world: Any) -> None:
    manifest = json.loads((world["bundle"] / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"data.csv", "results/model.bin", ".gitignore", "out.log"} <= paths
    assert not any(p.startswith((".git/", "env/", "__pycache__/")) for p in paths)
    assert "huge.bin" not in paths and "keys.txt" not in paths and "passwd-link" not in paths
    dst = world["dst"]
    assert (dst / "results" / "model.bin").read_bytes() == (world["src"] / "results" / "model.bin").read_bytes()
    assert not (dst / "huge.bin").exists()


def test_history_travels_and_numbering_continues(world: Any) -> None:
    got = world["checks"]
    # kernel A: '' + corpus + load_ext + save; kernel B adds its load cell and the check cell
    assert got["In"][0] == len(CORPUS) + 5
    assert got["In"][1][:9] == "df = pd.D" and got["In"][2]
    assert got["Out"][1] is True
    nxt = world["b"].ok("1 + 1")
    assert nxt["execution_count"] == len(CORPUS) + 5


@pytest.mark.parametrize("damage", ["corrupt_chunk", "truncated_manifest", "newer_schema"])
def test_damaged_bundle_changes_nothing(world: Any, damage: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(world["bundle"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if damage == "corrupt_chunk":
        sha = next(g["buffers"][0]["chunks"][0] for g in manifest["groups"] if "big" in g["names"])
        p = shard_path(bad / "chunks", sha)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        expect = f"chunk {sha} is corrupt"
    elif damage == "truncated_manifest":
        raw = (bad / "manifest.json").read_bytes()
        (bad / "manifest.json").write_bytes(raw[: len(raw) // 2])
        expect = "truncated"
    else:
        manifest["schema_version"] = 99
        (bad / "manifest.json").write_text(json.dumps(manifest))
        expect = "upgrade jupyter-handoff"
    b = world["b"]
    b.ok("import json\nbig[0] = -1.0\ncounter = 'changed here'\n"
         "_before = sorted(k for k in globals() if not k.startswith('_'))")
    (world["dst"] / "data.csv").write_text("local edit\n")
    out = b.run(f"%snapshot load {bad}")
    assert out["error"] is not None and out["error"].startswith("Bundle") and expect in out["error"], out["error"]
    after = json.loads(b.ok("import json\nprint(json.dumps([big[0], counter, sorted(k for k in globals() "
                            "if not k.startswith('_')) == _before]))")["stdout"])
    assert after == [-1.0, "changed here", True]
    assert (world["dst"] / "data.csv").read_text() == "local edit\n"


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip("kernels over ZMQ with POSIX paths")


def test_snapshot_verify_magic_names_the_damaged_variable(world: Any, tmp_path: Path) -> None:
    b = world["b"]
    assert "verified" in b.ok(f"%snapshot verify {world['bundle']}")["stdout"]
    bad = tmp_path / "bad"
    shutil.copytree(world["bundle"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    sha = next(g["payload"][0] for g in manifest["groups"] if "pt" in g["names"])
    p = shard_path(bad / "chunks", sha)
    p.write_bytes(p.read_bytes()[:-1] + b"\0")
    out = b.run(f"%snapshot verify {bad}")
    assert out["error"] and sha in out["error"] and "pt" in out["error"], out["error"]


def test_silent_restore_like_the_server_keeps_numbering(world: Any) -> None:
    """The server restores with silent=True, store_history=False: In must not gain that call."""
    b = world["b"]
    b.run(f"import handoff_magic as _h\n_h.load_state({str(world['bundle'])!r}, files=False)", store_history=False)
    got = json.loads(b.ok("import json\nprint(json.dumps([len(In), In[-1][:12], counter]))")["stdout"])
    # the bundle's In had len(CORPUS) + 3 entries ('' + corpus + load_ext + save); this cell is the next
    assert got == [len(CORPUS) + 4, "import json\n", 42]
    nxt = b.ok("2 + 2")
    assert nxt["execution_count"] == len(CORPUS) + 4
    # kernel B had already logged more cells than that: the reused numbers must not collide with
    # its SQLite history ("ERROR! Session/line number was not unique in database ...")
    assert nxt["stdout"] == "" and got_stdout(b, "3 + 3") == "ok\n"


def got_stdout(k: Any, code: str) -> str:
    return k.ok(f"{code}\nimport time as _t; _t.sleep(0.1); print('ok')")["stdout"]


def test_pull_into_a_kernel_with_its_own_history_keeps_history_logging(world: Any, tmp_path: Path) -> None:
    """%snapshot load of a bundle with a short history into a kernel that ran many cells: In/Out are
    the bundle's, numbering continues from it, and IPython's history database never complains."""
    a = world["a"]
    small = tmp_path / "small"
    a.ok(f"import handoff_magic as _h\n_h.save_state({str(small)!r}, ns={{'pulled_value': 41}})")
    out = a.ok(f"%snapshot load {small}")
    assert "not unique" not in out["stdout"]
    later = [a.ok(f"pulled_value + {i}") for i in range(3)]
    assert [r["data"][0]["text/plain"] for r in later] == ["41", "42", "43"]
    assert all("not unique" not in r["stdout"] for r in later), [r["stdout"] for r in later]
    assert got_stdout(a, "pass") == "ok\n"
    info = json.loads(a.ok("import json\nprint(json.dumps([len(In), In[-1][:11]]))")["stdout"])
    assert info == [7, "import json"]   # '' + the load cell + 3 cells + the check + this one
