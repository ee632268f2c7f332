"""Progress bars that suit where the output goes.

On a terminal: a tqdm bar.  Otherwise (a log file, CI, a pipe): plain lines, one at each tenth of the
work and one at the end, instead of a carriage-return update per step.
"""

from __future__ import annotations

import sys
import time


class LineProgress:
    """The part of tqdm's interface gblrc uses, printing at most ``lines`` lines plus the last one."""

    def __init__(self, total: int, desc: str, initial: int = 0, lines: int = 10, file=None):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.file = file or sys.stderr
        self.every = max(1, -(-self.total // max(1, lines)))
        self.postfix = ""
        self.t0 = time.perf_counter()
        self._last = None

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n % self.every == 0 or self.n >= self.total:
            self._line()

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self) -> None:
        if self._last == self.n:
            return
        self._last = self.n
        pct = 100.0 * self.n / self.total if self.total else 100.0
        tail = f" {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {time.perf_counter() - self.t0:.0f}s{tail}",
            file=self.file,
            flush=True,
        )

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, initial: int = 0, file=None):
    """A tqdm bar on a terminal, else a :class:`LineProgress` (both: update, set_postfix, close)."""
    out = file or sys.stderr
    if getattr(out, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=out)
    return LineProgress(total, desc, initial=initial, file=out)


def track(items, desc: str, file=None):
    """Iterate over ``items`` with a progress bar (see :func:`progress_bar`)."""
    items = list(items)
    bar = progress_bar(len(items), desc, file=file)
    try:
        for it in items:
            yield it
            bar.update(1)
    finally:
        bar.close()
