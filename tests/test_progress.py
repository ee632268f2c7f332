"""Progress output: a bar on a terminal, a few plain lines in logs (issue 14)."""

from __future__ import annotations

import io

from gblrc.learn.progress import LineProgress, progress_bar, track


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_prints_a_line_per_tenth_not_per_step():
    out = io.StringIO()
    bar = progress_bar(200, "gblrc compress", file=out)
    assert isinstance(bar, LineProgress)
    for _ in range(200):
        bar.update(1)
        bar.set_postfix(loss="0.5", cost="0.400")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[-1].startswith("gblrc compress: 200/200 (100%)") and lines[-1].endswith("loss=0.5, cost=0.400")


def test_resumed_and_short_runs_still_end_with_the_last_step():
    out = io.StringIO()
    bar = progress_bar(7, "x", initial=3, file=out)
    for _ in range(4):
        bar.update(1)
    assert out.getvalue().splitlines()[-1].startswith("x: 7/7 (100%)")
    assert len(out.getvalue().splitlines()) <= 4


def test_track_yields_every_item_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    assert list(track(range(5), "layers", file=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("layers: 5/5")
    bar = progress_bar(3, "t", file=_Tty())
    assert type(bar).__name__ == "tqdm" or "tqdm" in type(bar).__module__
    bar.close()
