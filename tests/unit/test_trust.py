"""Pull back loads data, not code, unless asked: a bundle "from a remote run" holding an object
whose unpickling calls exec is restored with PullTrust; nothing runs, the report names it."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import handoff_magic
from handoff_magic.snapshot.trust import PullTrust, allowed_global, unsafe_globals

RAN: list[str] = []


class Planted:
    """What a prompt-injected agent could leave in its namespace for the laptop to load."""

    def __reduce__(self) -> Any:
        return (exec, ("from tests.unit.test_trust import RAN; RAN.append('code ran on the laptop')",))


class Point:
    """A user class: fine when it is what the laptop itself sent."""

    def __init__(self, x: int) -> None:
        self.x = x


def _bundle(tmp_path: Path, ns: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    import json
    path = tmp_path / "bundle"
    handoff_magic.save_state(path, ns=ns, root=tmp_path / "wd")
    return path, json.loads((path / "manifest.json").read_text())


def _restore(path: Path, trust: PullTrust | None) -> tuple[dict[str, Any], dict[str, Any]]:
    ns: dict[str, Any] = {}
    report = handoff_magic.load_state(path, ns=ns, files=False, trust=trust)
    return ns, {v.name: v for v in report.variables}


def test_a_planted_exec_object_is_left_out_and_named_while_data_loads(tmp_path: Path) -> None:
    (tmp_path / "wd").mkdir()
    path, _ = _bundle(tmp_path, {"planted": Planted(), "df": pd.DataFrame({"a": [1, 2]}),
                                 "arr": np.arange(4.0), "d": {"k": [1, 2.5, "x"]}})
    RAN.clear()
    ns, rows = _restore(path, PullTrust())
    assert RAN == [] and "planted" not in ns
    assert rows["planted"].outcome == "skipped" and "builtins.exec" in rows["planted"].reason
    assert "--trust" in rows["planted"].reason
    assert ns["df"]["a"].tolist() == [1, 2] and ns["arr"].sum() == 6.0 and ns["d"] == {"k": [1, 2.5, "x"]}
    ns, rows = _restore(path, None)   # %pull ID --trust
    assert RAN == ["code ran on the laptop"]


def test_objects_the_laptop_sent_come_back_without_trust(tmp_path: Path) -> None:
    (tmp_path / "wd").mkdir()
    path, manifest = _bundle(tmp_path, {"p": Point(3)})
    _, rows = _restore(path, PullTrust())
    assert rows["p"].outcome == "skipped" and "test_trust.Point" in rows["p"].reason
    ns, rows = _restore(path, PullTrust.from_sent(PullTrust.sent_in(manifest)))
    assert rows["p"].outcome == "ok" and ns["p"].x == 3


def test_the_allowlist_reads_opcodes_and_refuses_loaders_inside_data_packages() -> None:
    assert unsafe_globals(pickle.dumps(pd.Timestamp("2024-01-01"), protocol=5)) == []
    assert unsafe_globals(pickle.dumps({"when": __import__("datetime").datetime.now()}, protocol=2)) == []
    assert not allowed_global("numpy", "load") and not allowed_global("pandas", "read_pickle")
    assert not allowed_global("pandas", "eval") and not allowed_global("os", "system")
    assert allowed_global("numpy._core.multiarray", "_reconstruct")


def test_a_remote_file_reopen_by_absolute_path_is_left_out_and_named(tmp_path: Path) -> None:
    """A remote run asks, through the file reducer, to append to a file outside the working
    directory (here one that no longer exists, so reopening it would create it): nothing is
    opened or created unless trusted, and the report says which file it asked for."""
    (tmp_path / "wd").mkdir()
    target = tmp_path / "outside" / "appended-by-remote.log"
    target.parent.mkdir()
    log = open(target, "a")
    path, _ = _bundle(tmp_path, {"log": log, "rows": [1, 2]})
    log.close()
    target.unlink()
    ns, rows = _restore(path, PullTrust())
    assert not target.exists() and "log" not in ns and ns["rows"] == [1, 2]
    assert rows["log"].outcome == "skipped" and str(target) in rows["log"].reason and "--trust" in rows["log"].reason
    ns, rows = _restore(path, None)   # %pull ID --trust
    assert target.exists() and rows["log"].outcome == "ok"
    ns["log"].close()


def test_a_chunk_the_laptop_sent_as_a_file_does_not_make_a_pickle_trusted(tmp_path: Path) -> None:
    """A hand-edited bundle reuses the chunk of a working-directory file the laptop sent (a
    downloaded ``model.pkl`` it never loaded) as a variable's pickle: it is left out."""
    import json
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "model.pkl").write_bytes(pickle.dumps(Planted(), protocol=5))
    path, manifest = _bundle(tmp_path, {"n": 1})
    sent = PullTrust.sent_in(manifest)
    file_chunk = next(f for f in manifest["files"] if f["path"] == "model.pkl")["chunks"][0]
    manifest["groups"].append({"id": "planted", "names": ["model"], "method": "pickle5", "payload": [file_chunk],
                               "buffers": []})
    manifest["variables"].append({**manifest["variables"][0], "name": "model", "group": "planted"})
    (path / "manifest.json").write_text(json.dumps(manifest))
    RAN.clear()
    ns, rows = _restore(path, PullTrust.from_sent(sent))
    assert RAN == [] and "model" not in ns and ns["n"] == 1
    assert rows["model"].outcome == "skipped" and "builtins.exec" in rows["model"].reason


def test_a_text_column_made_remotely_is_plain_data(tmp_path: Path) -> None:
    (tmp_path / "wd").mkdir()
    words = [f"w{i % 50}" for i in range(80_000)]
    path, _ = _bundle(tmp_path, {"df": pd.DataFrame({"word": words}), "arr": np.arange(10)[2:5]})
    ns, rows = _restore(path, PullTrust())
    assert rows["df"].outcome == "ok", rows["df"].reason
    assert ns["df"]["word"].tolist() == words and ns["arr"].tolist() == [2, 3, 4]
