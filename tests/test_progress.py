"""Progress bars stay a line on a terminal and sparse in logs (Ray actors, Flower's log stream)."""

from __future__ import annotations

import io

from distill.progress import LOG_STEPS, progress


def _lines(out: str) -> int:
    return out.count("\r") + out.count("\n")


def test_off_a_terminal_a_bar_writes_about_one_line_per_five_percent():
    log = io.StringIO()  # not a TTY
    assert list(progress(range(2000), "distill", file=log)) == list(range(2000))
    assert "2000/2000" in log.getvalue() and _lines(log.getvalue()) <= LOG_STEPS + 4


def test_a_disabled_bar_writes_nothing_and_still_iterates():
    log = io.StringIO()
    assert sum(progress(range(10), "x", enabled=False, file=log)) == 45 and log.getvalue() == ""


def test_on_a_terminal_the_bar_is_tqdms_own():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress(range(5), "x", file=Terminal())
    assert bar.miniters in (0, 1, None) and bar.mininterval < 1  # tqdm's live redraws
    list(bar)
