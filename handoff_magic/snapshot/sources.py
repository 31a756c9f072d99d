"""Notebook code that no pickle can rebuild travels as its defining source (DESIGN "Capture").

dill rebuilds most notebook functions and classes by value, but not an ``Enum`` (it recurses),
an ``lru_cache`` wrapper or a ``functools.wraps`` decorator (they pickle as a bare reference to
``__main__``, which a fresh kernel does not have), nor classes built by a metaclass. Those are
defined again on the other side from the ``def``/``class`` statement (decorators included)
found in the kernel's history, before any variable is unpickled; every other pickle then
refers to them by name, so ``fav is Color.GREEN`` holds after the restore.

Capture also checks each by-reference pickle of a ``__main__`` name (``check_by_reference``):
a name that will not exist on the other side makes its variable fail now, so "ok" means it loads.
"""
from __future__ import annotations

import ast
import enum
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from ..secrets import KEY_PATTERNS


def needs_source(obj: Any) -> bool:
    """A notebook definition that pickling by value cannot rebuild faithfully."""
    if getattr(obj, "__module__", None) != "__main__" or not callable(obj):
        return False
    if isinstance(obj, type):
        return issubclass(obj, enum.Enum) or type(obj) is not type
    if isinstance(obj, types.FunctionType):
        return hasattr(obj, "__wrapped__")   # functools.wraps: it pickles as its wrapped name
    return isinstance(getattr(obj, "__qualname__", None), str)   # lru_cache & other wrapper objects


def check_by_reference(obj: Any, by_source: frozenset[int]) -> None:
    """Refuse an object that would pickle as a bare ``__main__.name`` the other side cannot resolve."""
    if isinstance(obj, (type, types.FunctionType, types.MethodType)) or id(obj) in by_source:
        return
    try:
        qual = getattr(obj, "__qualname__", None)
        if not isinstance(qual, str) or getattr(obj, "__module__", None) != "__main__":
            return
    except Exception:  # noqa: BLE001 - attributes that raise: not a notebook definition
        return
    main = sys.modules.get("__main__")
    if getattr(main, qual, None) is obj:
        raise pickle.PicklingError(f"{qual} is a notebook {type(obj).__name__} that would travel only as the "
                                   f"name __main__.{qual}, and its defining cell was not found in this kernel's "
                                   "history; define it in a cell and save again")


@dataclass
class SourcePlan:
    definitions: list[dict[str, Any]] = field(default_factory=list)   # {names, cell, code}, in order
    ids: frozenset[int] = frozenset()
    objects: dict[int, Any] = field(default_factory=dict)
    cells: dict[str, int] = field(default_factory=dict)               # name -> cell it is defined in


def plan(candidates: list[tuple[str, Any]], shell: Any, secrets: list[str]) -> SourcePlan:
    """Find the defining statement of every notebook definition that needs its source, plus the
    notebook definitions those statements use while being defined (decorators, bases)."""
    values = dict(candidates)
    wanted = [n for n, v in candidates if needs_source(v)]
    out = SourcePlan()
    if not wanted or shell is None:
        return out
    cells = list(shell.history_manager.input_hist_parsed)
    found: dict[str, tuple[int, int, str, set[str]]] = {}
    while wanted:
        name = wanted.pop()
        if name in found:
            continue
        hit = _defining_statement(cells, name)
        if hit is None:
            continue
        cell, line, code, uses = hit
        if any(s and s in code for s in secrets) or KEY_PATTERNS.search(code):
            continue   # the statement itself holds a secret: it cannot travel
        found[name] = hit
        wanted += [u for u in uses if u in values and u not in found and _is_notebook_definition(values[u])]
    for name, (cell, _line, code, _uses) in sorted(found.items(), key=lambda kv: kv[1][:2]):
        out.definitions.append({"names": [name], "cell": cell, "code": code})
        out.objects[id(values[name])] = values[name]
        out.cells[name] = cell
    out.ids = frozenset(out.objects)
    return out


def _is_notebook_definition(v: Any) -> bool:
    return getattr(v, "__module__", None) == "__main__" and callable(v)


def _defining_statement(cells: list[str], name: str) -> tuple[int, int, str, set[str]] | None:
    """(cell, line, source with decorators, names it reads when defined) of the last top-level
    ``def``/``class`` binding ``name``, if the last cell that binds ``name`` binds it that way."""
    for i in range(len(cells) - 1, 0, -1):
        try:
            tree = ast.parse(cells[i])
        except (SyntaxError, ValueError):
            continue
        binds = [st for st in tree.body if name in _binds(st)]
        if not binds:
            continue
        st = binds[-1]
        if not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or st.name != name:
            return None   # rebound by an assignment or import after its definition
        first = min([d.lineno for d in st.decorator_list] + [st.lineno])
        lines = cells[i].splitlines()[first - 1: st.end_lineno]
        return i, first, "\n".join(lines) + "\n", _definition_time_names(st)
    return None


def _binds(st: ast.stmt) -> set[str]:
    if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {st.name}
    if isinstance(st, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in st.names}
    return {n.id for n in ast.walk(st) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _definition_time_names(st: ast.AST) -> set[str]:
    """Names read while the statement runs: decorators, bases, defaults, a class body; not the
    bodies of functions (those run later, when everything is restored)."""
    out: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not top:
            parts: list[ast.AST] = list(getattr(node, "decorator_list", []))
            parts += [*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]]
            for p in parts:
                visit(p, False)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            out.add(node.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):   # the top statement itself
            for p in [*node.decorator_list, *node.args.defaults, *[d for d in node.args.kw_defaults if d]]:
                visit(p, False)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, False)

    visit(st, True)
    return out


def define(definitions: list[dict[str, Any]], ns: dict[str, Any]) -> dict[str, str | None]:
    """Run each defining statement in ``ns`` (the user namespace, so the rebuilt functions see
    its globals); returns name -> None, or why it could not be defined."""
    results: dict[str, str | None] = {}
    for d in definitions:
        try:
            exec(compile(d["code"], f"<handoff source of cell {d['cell']}>", "exec"), ns)  # noqa: S102 - the user's cell
            err = None
        except Exception as exc:  # noqa: BLE001 - reported per name in the load report
            err = f"defining it from its source (cell {d['cell']}) failed: {type(exc).__name__}: {exc}"
        for n in d["names"]:
            results[n] = err
    return results
