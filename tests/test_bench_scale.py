"""benchmarks/scale.py's arithmetic and its errors (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from benchmarks import scale


def test_growth_exponent_is_the_log_log_slope():
    assert scale._fit([3, 6, 12, 24], [30 * d for d in (3, 6, 12, 24)]) == pytest.approx(1.0)
    assert scale._fit([3, 6, 12], [d**2 for d in (3, 6, 12)]) == pytest.approx(2.0)
    assert scale._fit([3], [1.0]) is None


def test_the_table_gives_the_per_layer_ratio_of_the_deepest_to_the_shallowest():
    rows = [
        dict(arch="bert", depth=3, width=256, compress_s=90.0, per_layer_s=30.0, peak_rss_gb=1.5),
        dict(arch="bert", depth=24, width=256, compress_s=648.0, per_layer_s=27.0, peak_rss_gb=1.9),
    ]
    fits = {"bert width 256": {"compress": scale._fit([3, 24], [90.0, 648.0])}}
    text = scale._table(rows, fits, False, 0.4, 3000)
    assert "compress s/layer at 24 layers / at 3: 0.90x" in text
    assert "| bert | 24 | 256 | 648.0 | 27.0 | – | 1.9 |" in text


@pytest.mark.parametrize(
    "args, msg", [(["--depths", "3,x"], "whole numbers"), (["--depths", "0"], ">= 1"), (["--archs", "t5"], "t5")]
)
def test_bad_arguments_are_one_line_errors(args, msg):
    res = CliRunner().invoke(scale.main, args)
    assert res.exit_code == 2 and msg in res.output
