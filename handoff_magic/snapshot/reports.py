"""What a capture or restore did, per variable: shown as a table in the notebook, sent as JSON."""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class VarReport:
    name: str
    type: str
    method: str                 # pickle5 | dill | replay | import | skipped
    bytes: int = 0
    seconds: float = 0.0
    outcome: str = "ok"         # ok | skipped | failed
    reason: str | None = None


def fmt_bytes(n: float) -> str:
    """Sizes as people read them in progress bars and reports (decimal units: 1.5 MB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table_text(rows: list[VarReport]) -> str:
    lines = [f"{'name':<20} {'type':<24} {'method':<8} {'bytes':>10} {'secs':>7}  outcome"]
    for r in rows:
        extra = f" ({r.reason})" if r.reason else ""
        lines.append(f"{r.name[:20]:<20} {r.type[:24]:<24} {r.method:<8} {fmt_bytes(r.bytes):>10} "
                     f"{r.seconds:7.3f}  {r.outcome}{extra}")
    return "\n".join(lines)


def _table_html(title: str, rows: list[VarReport], foot: str) -> str:
    colour = {"ok": "#1a7f37", "skipped": "#9a6700", "failed": "#cf222e"}
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(c))}</td>" for c in (
            r.name, r.type, r.method)) +
        f"<td style='text-align:right'>{fmt_bytes(r.bytes)}</td><td style='text-align:right'>{r.seconds:.3f}</td>"
        f"<td style='text-align:left;color:{colour.get(r.outcome, '#000')}'>{html.escape(r.outcome)}</td>"
        f"<td style='text-align:left'>{html.escape(r.reason or '')}</td></tr>" for r in rows)
    return (f"<div><b>{html.escape(title)}</b><table><thead><tr><th>name</th><th>type</th><th>method</th>"
            f"<th>bytes</th><th>seconds</th><th>outcome</th><th>reason</th></tr></thead><tbody>{body}</tbody>"
            f"</table><div>{html.escape(foot)}</div></div>")


class _VariableRows:
    """What both reports answer about their per-variable rows."""
    variables: list[VarReport]

    @property
    def skipped(self) -> list[VarReport]:
        return [v for v in self.variables if v.outcome != "ok"]

    def var(self, name: str) -> VarReport | None:
        return next((v for v in self.variables if v.name == name), None)


@dataclass
class CaptureReport(_VariableRows):
    path: str
    variables: list[VarReport] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)          # {path, size, outcome}
    skipped_files: list[dict[str, Any]] = field(default_factory=list)  # {path, reason}
    bytes_new: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    dry_run: bool = False           # a preflight: what would travel; nothing was kept or sent
    problem: str | None = None      # why the handoff would fail as things stand (too many files...)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest")
        return d

    @property
    def title(self) -> str:
        return "Dry run: what would travel (nothing was sent)" if self.dry_run else f"Snapshot saved to {self.path}"

    def _foot(self) -> str:
        problem = f"\nWOULD FAIL: {self.problem}" if self.problem else ""
        if self.dry_run:
            return (f"{len(self.variables) - len(self.skipped)} variables would travel, {len(self.skipped)} left out, "
                    f"{len(self.files)} files ({len(self.skipped_files)} left out{self._left_out()}); "
                    f"{fmt_bytes(self.bytes_total)} in all, checked in {self.seconds:.2f}s{problem}")
        return (f"{len(self.variables) - len(self.skipped)} variables saved, {len(self.skipped)} skipped, "
                f"{len(self.files)} files ({len(self.skipped_files)} left out{self._left_out()}); "
                f"{fmt_bytes(self.bytes_new)} new of {fmt_bytes(self.bytes_total)} in {self.seconds:.2f}s")

    def _left_out(self, shown: int = 5) -> str:
        """Which files stayed behind and why, so "3 left out" is never a riddle."""
        if not self.skipped_files:
            return ""
        names = [f"{f.get('path')} ({f.get('reason')})" for f in self.skipped_files[:shown]]
        more = len(self.skipped_files) - shown
        return ": " + ", ".join(names) + (f" and {more} more" if more > 0 else "")

    def __str__(self) -> str:
        return f"{self.title}\n{_table_text(self.variables)}\n{self._foot()}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return _table_html(self.title, self.variables, self._foot())


@dataclass
class RestoreReport(_VariableRows):
    path: str
    variables: list[VarReport] = field(default_factory=list)
    files: list[str] = field(default_factory=list)                     # written
    conflicts: list[dict[str, str]] = field(default_factory=list)      # {path, written_as}
    seconds: float = 0.0
    run: Any = field(default=None, repr=False)                         # RunState | None
    title: str = ""                # the heading; pull back names the run instead of its cache dir

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run"] = self.run.to_dict() if self.run is not None else None
        d["skipped"] = [asdict(v) for v in self.skipped]
        return d

    def _foot(self) -> str:
        conf = f"; {len(self.conflicts)} conflicts written as .remote" if self.conflicts else ""
        return (f"{len(self.variables) - len(self.skipped)} variables restored, {len(self.skipped)} skipped, "
                f"{len(self.files)} files written{conf} in {self.seconds:.2f}s")

    @property
    def heading(self) -> str:
        return self.title or f"Snapshot restored from {self.path}"

    def __str__(self) -> str:
        return f"{self.heading}\n{_table_text(self.variables)}\n{self._foot()}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return _table_html(self.heading, self.variables, self._foot())
