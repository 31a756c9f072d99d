"""register_reducer: a user's save/rebuild pair is used before any other method, and its
instances keep their identity inside a sharing group."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import handoff_magic
from handoff_magic import load_state, save_state
from handoff_magic.errors import HandoffError


class Client:
    """Holds a live resource (a lock) that plain pickle refuses."""

    def __init__(self, url: str) -> None:
        self.url, self.session = url, threading.Lock()


def test_user_reducer_saves_what_the_object_means(tmp_path: Path) -> None:
    handoff_magic.register_reducer(Client, lambda c: c.url, Client)
    c = Client("https://api.example.org")
    rep = save_state(tmp_path / "b", ns={"client": c, "same": {"c": c}}, files=False, environ={})
    assert {r.name: r.method for r in rep.variables} == {"client": "reducer", "same": "reducer"}
    out: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=out, files=False)
    assert out["client"].url == "https://api.example.org" and out["same"]["c"] is out["client"]


@pytest.mark.parametrize("args", [("not a class", len, len), (Client, None, len)])
def test_register_reducer_says_what_it_needs(args: tuple) -> None:
    with pytest.raises(HandoffError, match="register_reducer needs"):
        handoff_magic.register_reducer(*args)


def test_star_imported_library_objects_travel_as_imports(tmp_path: Path) -> None:
    """``from numpy import *`` binds library objects under their own names: they travel as the
    import that binds them (same object on the other side), not as copies of library state."""
    import numpy as np
    rep = save_state(tmp_path / "b", ns={"False_": np.False_, "average": np.average, "pi": np.pi},
                     files=False, environ={})
    assert {r.name: r.method for r in rep.variables} == {"False_": "import", "average": "import", "pi": "pickle5"}
    out: dict[str, Any] = {}
    load_state(tmp_path / "b", ns=out, files=False)
    assert out["False_"] is np.False_ and out["average"] is np.average


def test_a_database_image_loads_where_sqlite3_has_no_deserialize() -> None:
    """Python 3.10's sqlite3 has no Connection.deserialize: an image saved on 3.11+ still loads."""
    import sqlite3

    from handoff_magic.snapshot.reducers import _load_image

    class Py310Connection(sqlite3.Connection):
        @property
        def deserialize(self):
            raise AttributeError("deserialize")

    src = sqlite3.connect(":memory:")
    src.executescript("create table t(x); insert into t values (1), (2); delete from t where x = 1;")
    old = sqlite3.connect(":memory:", factory=Py310Connection)
    assert not hasattr(old, "deserialize")
    _load_image(old, src.serialize())  # type: ignore[attr-defined]  # mypy checks as 3.10; the test runs on 3.11+
    assert old.execute("select x from t").fetchall() == [(2,)]


def test_only_the_projects_own_module_folders_travel_as_import_paths(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A module from the project's own folder travels with its folder on sys.path; a package
    installed in a venv inside the project, or a folder a symlink puts there, does not (restoring
    such a path used to refuse the whole load: 'it would land outside')."""
    import importlib
    import sys

    from handoff_magic.manifest import read_manifest
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    site = project / ".venv" / "lib" / "python3" / "site-packages"
    for d in (project / "src", site, elsewhere):
        d.mkdir(parents=True)
    (project / "src" / "own_helpers_mod.py").write_text("X = 1\n")
    (site / "installed_pkg_mod.py").write_text("X = 2\n")
    (elsewhere / "linked_in_mod.py").write_text("X = 3\n")
    (project / "linked").symlink_to(elsewhere)
    for d in (project / "src", site, project / "linked"):
        monkeypatch.syspath_prepend(str(d))
    mods = {n: importlib.import_module(n) for n in ("own_helpers_mod", "installed_pkg_mod", "linked_in_mod")}
    try:
        save_state(tmp_path / "b", ns=dict(mods), files=False, environ={}, root=project)
        assert read_manifest(tmp_path / "b")["module_paths"] == ["src"]
        out: dict[str, Any] = {}
        load_state(tmp_path / "b", ns=out, files=False, root=project)
        assert out["own_helpers_mod"] is mods["own_helpers_mod"]
    finally:
        for n in mods:
            sys.modules.pop(n, None)
