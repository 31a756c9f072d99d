"""Real notebooks nobody here wrote, each executed, saved, restored elsewhere and compared
variable by variable, against ``dill.dump_session`` on the same notebooks (issue 17).

    python benchmarks/corpus.py CORPUS_DIR

CORPUS_DIR holds checkouts of the repositories below (their notebooks and the data they ship);
the notebooks are not copied into this repository. For each notebook: its folder is copied to a
fresh directory, every code cell runs in kernel A (cells that fail there, such as downloads,
fail alike for both methods), then the state goes to a fresh kernel started in ANOTHER
directory: once by ``%snapshot save``/``%snapshot load``, once by ``dill.dump_session`` /
``dill.load_session``. A variable counts as restored when its fingerprint (data for arrays and
frames, value repr for the rest, name for functions/classes/modules) is equal on both sides;
a notebook counts when all its variables are.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness.kernels import Kernel, kernel_env

# (checkout folder in CORPUS_DIR, notebook path, source repository @ commit, license)
CORPUS = [
    ("pandas-cookbook", "cookbook/Chapter 1 - Reading from a CSV.ipynb",
     "jvns/pandas-cookbook@69d3389e", "CC BY-SA 4.0"),
    ("pandas-cookbook", "cookbook/Chapter 4 - Find out on which weekday people bike the most with groupby and "
     "aggregate.ipynb", "jvns/pandas-cookbook@69d3389e", "CC BY-SA 4.0"),
    ("pandas-cookbook", "cookbook/Chapter 6 - String Operations- Which month was the snowiest.ipynb",
     "jvns/pandas-cookbook@69d3389e", "CC BY-SA 4.0"),
    ("pandas-cookbook", "cookbook/Chapter 8 - How to deal with timestamps.ipynb",
     "jvns/pandas-cookbook@69d3389e", "CC BY-SA 4.0"),
    ("pandas-cookbook", "cookbook/Chapter 9 - Loading data from SQL databases.ipynb",
     "jvns/pandas-cookbook@69d3389e", "CC BY-SA 4.0"),
    ("scientific-python-lectures", "Lecture-1-Introduction-to-Python-Programming.ipynb",
     "jrjohansson/scientific-python-lectures@a2a76136", "CC BY 3.0"),
    ("scientific-python-lectures", "Lecture-2-Numpy.ipynb",
     "jrjohansson/scientific-python-lectures@a2a76136", "CC BY 3.0"),
    ("scientific-python-lectures", "Lecture-4-Matplotlib.ipynb",
     "jrjohansson/scientific-python-lectures@a2a76136", "CC BY 3.0"),
]

FINGERPRINT = r"""
def _fp_all():
    import json, re, sys, types, hashlib
    skip = {'In', 'Out', 'exit', 'quit', 'get_ipython', 'open'}
    out = {}
    for name, v in list(globals().items()):
        if name.startswith('_') or name in skip:
            continue
        try:
            if isinstance(v, types.ModuleType):
                fp = ['module', v.__name__]
            elif isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType)):
                fp = ['callable', getattr(v, '__qualname__', '?')]
            elif type(v).__module__.startswith('numpy') and hasattr(v, 'tobytes'):
                fp = ['array', str(v.dtype), list(getattr(v, 'shape', ())),
                      hashlib.sha256(v.tobytes() if v.dtype.kind != 'O' else repr(v.tolist()).encode()).hexdigest()]
            elif type(v).__module__.startswith('pandas') and hasattr(v, 'shape'):
                import pandas as pd
                h = pd.util.hash_pandas_object(v, index=True).to_numpy() if not isinstance(v, pd.Index) \
                    else pd.util.hash_pandas_object(v).to_numpy()
                fp = ['pandas', type(v).__name__, list(v.shape), hashlib.sha256(h.tobytes()).hexdigest()]
            else:
                text = re.sub(r' at 0x[0-9a-fA-F]+', '', repr(v))[:5000]
                fp = [type(v).__name__, text]
        except Exception as e:
            fp = [type(v).__name__, f'unprintable {type(e).__name__}']
        out[name] = fp
    return out
print(__import__('json').dumps(_fp_all(), default=str))
del _fp_all
"""


def fingerprints(k: Kernel) -> dict[str, Any]:
    out = k.run(FINGERPRINT, store_history=False)
    if out["error"]:
        return {}
    return json.loads(out["stdout"].strip().splitlines()[-1])


def run_notebook(nb_path: Path, work: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], int, int]:
    src = work / "src"
    shutil.copytree(nb_path.parent, src, ignore=shutil.ignore_patterns(".git", "*.ipynb_checkpoints"))
    nb = nbformat.read(nb_path, as_version=4)
    env = kernel_env(MPLBACKEND="Agg")
    a = Kernel(src, env)
    failed = cells = 0
    try:
        for cell in nb.cells:
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            cells += 1
            try:
                if a.run(cell.source, timeout=120)["error"]:
                    failed += 1
            except TimeoutError:
                failed += 1
        before = fingerprints(a)
        a.run("%load_ext handoff_magic")
        bundle = work / "bundle"
        a.run(f"%snapshot save {bundle}")
        session = work / "session.pkl"
        dill_saved = not a.run(f"import dill as _dill\n_dill.dump_session({str(session)!r})")["error"]
    finally:
        a.stop()
    after: dict[str, dict[str, Any]] = {}
    for method in ("ours", "dill"):
        elsewhere = work / f"elsewhere-{method}" / "dst"
        elsewhere.mkdir(parents=True)
        b = Kernel(elsewhere, env)
        try:
            if method == "ours":
                b.run("%load_ext handoff_magic")
                b.run(f"%snapshot load {bundle}")
                after[method] = fingerprints(b)
            elif dill_saved and not b.run(f"import dill as _dill\n_dill.load_session({str(session)!r})")["error"]:
                after[method] = fingerprints(b)
            else:
                after[method] = {}
        finally:
            b.stop()
    return before, after, cells, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus_dir", type=Path)
    args = ap.parse_args()
    totals = {m: [0, 0, 0, 0] for m in ("ours", "dill")}   # notebooks ok, notebooks, variables ok, variables
    print(f"{'notebook':<58} {'cells':>7} {'vars':>5} | {'ours':>5} {'dill':>5}")
    for folder, rel, source, licence in CORPUS:
        nb_path = args.corpus_dir / folder / rel
        with tempfile.TemporaryDirectory(prefix="handoff-corpus-") as tmp:
            before, after, cells, failed = run_notebook(nb_path, Path(tmp))
        row = []
        for m in ("ours", "dill"):
            ok = [n for n, fp in before.items() if after[m].get(n) == fp]
            totals[m][0] += len(ok) == len(before)
            totals[m][1] += 1
            totals[m][2] += len(ok)
            totals[m][3] += len(before)
            row.append(len(ok))
            lost = sorted(set(before) - set(ok))
            if lost and m == "ours":
                print(f"    ours lost: {', '.join(lost[:12])}")
        print(f"{Path(rel).stem[:58]:<58} {cells - failed:>3}/{cells:<3} {len(before):>5} | {row[0]:>5} {row[1]:>5}"
              f"   ({source}, {licence})")
    for m, (n_ok, n, v_ok, v) in totals.items():
        print(f"{m}: {n_ok}/{n} notebooks, {v_ok}/{v} variables")


if __name__ == "__main__":
    main()
