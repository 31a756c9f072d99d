"""The transfer bar: a 1 GB upload reports thousands of pieces; the widget must not redraw for
each (every redraw is a comm message), yet it always ends on the true total."""
from __future__ import annotations

from handoff_magic.remote.views import progress_reporter


class Bar:
    def __init__(self) -> None:
        self.draws: list[tuple[str, int, int]] = []

    def set_progress(self, label: str, done: int, total: int) -> None:
        self.draws.append((label, done, total))


def test_thousands_of_pieces_draw_a_few_times_and_end_on_the_total() -> None:
    bar = Bar()
    report = progress_reporter(bar, "upload")
    total = 4096 * 262_144
    for i in range(1, 4097):
        report(i * 262_144, total)
    assert 1 <= len(bar.draws) < 100
    assert bar.draws[0] == ("upload", 262_144, total)   # the bar appears at once
    assert bar.draws[-1] == ("upload", total, total)

