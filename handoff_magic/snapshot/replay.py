"""Replay: re-create a live resource (generator, lock, connection, read-mode file) by re-running
the cell that defined it, when that cell is safe to run again (no writes, no processes, no
network, no secrets) and everything it needs is restored first.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

from ..manifest import ReplayEntry, VariableEntry
from ..secrets import KEY_PATTERNS
from .reports import VarReport

UNSAFE_ATTRS = frozenset({"write", "writelines", "write_text", "write_bytes", "unlink", "rmdir", "rmtree", "remove",
                          "rename", "touch", "system", "popen", "Popen", "call", "check_call", "check_output",
                          "kill", "terminate", "to_csv", "to_parquet", "to_excel", "to_json", "to_pickle",
                          "to_sql", "savefig", "dump", "send", "sendall", "sendto", "post", "put", "delete",
                          "patch", "truncate", "makedirs", "mkdir", "start", "submit", "urlopen", "retrieve"})


UNSAFE_MODULES = frozenset({"os", "shutil", "subprocess", "requests", "httpx", "urllib", "socketserver"})


_BUILTINS = frozenset(dir(builtins))


class ReplayPlan:
    def __init__(self) -> None:
        self.names: dict[str, int] = {}        # variable -> cell number replayed for it
        self.why_not: dict[str, str] = {}
        self.replays: list[ReplayEntry] = []


def _top_bindings(tree: ast.Module) -> set[str]:
    """Names a cell binds at module level (not inside functions, classes, lambdas or comprehensions)."""
    out: set[str] = set()

    def targets(node: ast.AST) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                out.add(n.id)

    def visit(stmts: list[ast.stmt]) -> None:
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(st.name)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in st.names)
            elif isinstance(st, ast.Assign):
                for t in st.targets:
                    targets(t)
            elif isinstance(st, (ast.AugAssign, ast.AnnAssign)):
                targets(st.target)
            elif isinstance(st, (ast.For, ast.AsyncFor)):
                targets(st.target)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                for item in st.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(st, field, None)
                if isinstance(sub, list) and not isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(sub)
            for h in getattr(st, "handlers", []) or []:
                if h.name:
                    out.add(h.name)
                visit(h.body)
        for st in stmts:
            for n in ast.walk(st):
                if isinstance(n, ast.NamedExpr) and isinstance(n.target, ast.Name):
                    out.add(n.target.id)

    visit(tree.body)
    return out


def _free_names(tree: ast.Module) -> set[str]:
    loads: set[str] = set()
    stores: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else stores).add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores.add(n.name)
        elif isinstance(n, ast.arg):
            stores.add(n.arg)
        elif isinstance(n, ast.alias):
            stores.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            stores.add(n.name)
    return loads - stores - _BUILTINS


def replay_hazard(tree: ast.Module) -> str | None:
    """Why re-running this cell could change the world (write files, run commands), or None."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in ("get_ipython", "exec", "eval", "__import__"):
            return "it uses IPython magics, shell commands or exec"
        if not isinstance(n, ast.Call):
            continue
        f = n.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in UNSAFE_MODULES:
            return f"it calls {f.value.id}.{f.attr}()"
        if name in UNSAFE_ATTRS:
            return f"it calls {name}(), which may write or send data"
        if name == "open":
            mode: ast.AST | None = None
            if isinstance(f, ast.Name) and len(n.args) >= 2:
                mode = n.args[1]
            elif isinstance(f, ast.Attribute) and n.args:
                mode = n.args[1] if len(n.args) >= 2 and not (isinstance(n.args[0], ast.Constant) and
                                                                 isinstance(n.args[0].value, str) and
                                                                 set(n.args[0].value) <= set("rbt")) else n.args[0]
            for kw in n.keywords:
                if kw.arg == "mode":
                    mode = kw.value
            if mode is not None:
                if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
                    return "it opens a file with a mode that is not a constant"
                if any(c in mode.value for c in "wax+"):
                    return f"it opens a file for writing (mode {mode.value!r}); replaying would truncate it"
    return None


def plan_replays(needed: dict[str, str], shell: Any, restorable: set[str], secrets: list[str]) -> ReplayPlan:
    """For each live resource, find the cell that last bound it (AST over In) and decide if it is safe to replay.

    A replay runs on restore in a scratch namespace seeded with the restored values, and
    only the needed names are copied back, so the cell's other assignments change nothing.
    """
    plan = ReplayPlan()
    if not needed:
        return plan
    cells: list[str] = list(shell.history_manager.input_hist_parsed) if shell is not None else []
    parsed: dict[int, ast.Module | None] = {}

    def tree_of(i: int) -> ast.Module | None:
        if i not in parsed:
            try:
                parsed[i] = ast.parse(cells[i])
            except (SyntaxError, ValueError):
                parsed[i] = None
        return parsed[i]

    where: dict[str, int] = {}
    for name in needed:
        for i in range(len(cells) - 1, 0, -1):
            tree = tree_of(i)
            if tree is not None and name in _top_bindings(tree):
                where[name] = i
                break
        else:
            plan.why_not[name] = "no cell in this kernel's history defines it, so it cannot be replayed"
    ok_names = set(restorable)
    by_cell: dict[int, list[str]] = {}
    for name, i in sorted(where.items(), key=lambda kv: kv[1]):
        by_cell.setdefault(i, []).append(name)
    for i in sorted(by_cell):
        names = by_cell[i]
        tree = tree_of(i)
        assert tree is not None
        code = cells[i]
        why = replay_hazard(tree)
        if why is None and (any(s and s in code for s in secrets) or KEY_PATTERNS.search(code)):
            why = "its cell contains a secret"
        if why is None:
            missing = sorted(_free_names(tree) - ok_names - set(names))
            if missing:
                why = f"cell {i} needs {', '.join(missing[:5])}, which cannot be restored"
        if why is not None:
            for n in names:
                plan.why_not[n] = f"not replayed: {why}"
            continue
        ok_names.update(names)
        plan.replays.append(ReplayEntry(names, i, code))
        for n in names:
            plan.names[n] = i
    return plan


def run_replays(replays: list[ReplayEntry], ns: dict[str, Any], root: Path, by_name: dict[str, VariableEntry],
                 results: dict[str, VarReport]) -> None:
    """Re-run each defining cell in a scratch copy of the namespace; keep only the names it was run for."""
    for r in sorted(replays, key=lambda r: r.cell):
        t0 = time.perf_counter()
        scratch = dict(ns)
        cwd = os.getcwd()
        err: str | None = None
        try:
            if os.path.realpath(root) != os.path.realpath(cwd):
                os.chdir(root)  # the cell's relative paths mean the restored working directory
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                exec(compile(r.code, f"<handoff replay of cell {r.cell}>", "exec"), scratch)  # noqa: S102
        except BaseException as exc:  # a failed replay only loses its own names (interrupts re-raised)
            if isinstance(exc, KeyboardInterrupt):
                raise
            err = f"replaying cell {r.cell} failed: {type(exc).__name__}: {exc}"
        finally:
            if os.getcwd() != cwd:
                os.chdir(cwd)
        spent = (time.perf_counter() - t0) / max(1, len(r.names))
        for n in r.names:
            meta = by_name.get(n)
            if err is None and n in scratch:
                ns[n] = scratch[n]
                results[n] = VarReport(n, meta.type if meta else type(scratch[n]).__name__, "replay", 0, spent,
                                       "ok", f"re-created by replaying cell {r.cell}")
            else:
                results[n] = VarReport(n, meta.type if meta else "?", "replay", 0, spent, "skipped",
                                       err or f"cell {r.cell} no longer defines it")
