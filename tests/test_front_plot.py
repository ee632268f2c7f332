"""The pure parts of benchmarks/minilm.py's front: the Pareto front, the verdict and the plot, on hand-made rows."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package of the repository root
    sys.path.insert(0, str(ROOT))

import benchmarks.minilm as front  # noqa: E402  (an in-repo module: failing to import is a failure)


def row(name, time, other, family="lowrank", precision="fp32", recipe="steps0", budget=0.5):
    r = dict(name=name, time=time, other=other, family=family, precision=precision)
    if family != "dense":
        r.update(recipe=recipe, budget=budget)
    return r


def rows():
    return [
        row("dense fp32", 1.0, 1.0, family="dense"),
        row("dense int8 per-tensor", 0.55, 0.96, family="dense", precision="int8 per-tensor"),
        row("dense int8 per-channel", 0.56, 0.97, family="dense", precision="int8 per-channel"),  # beaten by none
        row("lowrank 0.3 steps0 fp32", 0.40, 0.80, budget=0.3),
        row("lowrank 0.3 steps0 int8", 0.30, 0.78, precision="int8", budget=0.3),
        row("gblr 0.5 refine fp32", 0.60, 0.93, family="gblr", recipe="refine"),  # beaten by dense int8
        row("gblr 0.8 distill fp32", 0.70, 0.955, family="gblr", recipe="distill", budget=0.8),  # beaten
        row("lowrank 0.5 distill int8", 0.45, 0.90, precision="int8", recipe="distill"),
        row("twin of lowrank 0.3 int8", 0.30, 0.78),  # equal to a front point: both stay
        row("no time", None, 0.99),
    ]


def test_pareto_known_front():
    got = [r["name"] for r in front.pareto(rows())]
    assert got == [
        "lowrank 0.3 steps0 int8",
        "twin of lowrank 0.3 int8",
        "lowrank 0.3 steps0 fp32",
        "lowrank 0.5 distill int8",
        "dense int8 per-tensor",
        "dense int8 per-channel",
        "dense fp32",
    ]


def test_pareto_other_keys_and_empty():
    pts = [dict(a=1, b=1), dict(a=2, b=0), dict(a=0, b=0)]
    assert front.pareto(pts, x="a", y="b") == [dict(a=0, b=0), dict(a=1, b=1)]
    assert front.pareto([]) == []


def test_verdict():
    assert front.verdict(rows()).endswith("gblr 0.8 distill fp32 (time 0.700 x dense fp32, other genres 0.9550)")
    low = [r for r in rows() if r["name"] != "gblr 0.8 distill fp32"]
    assert "none; closest: gblr 0.5 refine fp32" in front.verdict(low)


def test_plot_front_writes_png(tmp_path):
    path = tmp_path / "sub" / "front.png"
    front.plot_front(rows(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
