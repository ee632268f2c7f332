"""benchmarks.block_sparse_speed runs end to end on a small FFN: the pruned pair lowers to MatMuls of the kept
slice, both graphs time, the table and the bar line are printed."""

from __future__ import annotations

import re

from benchmarks import block_sparse_speed


def test_block_sparse_speed_smoke(capsys):
    assert block_sparse_speed.main(["--d", "16", "--f", "64", "--tokens", "32", "--ratios", "0.5"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 32 |"))
    assert "0.500" in row and "(16, 32)" in row and "(32, 16)" in row  # cost 0.5; MatMuls of the kept slice
    assert re.search(r"time / dense", out) and "bar (every ratio)" in out
