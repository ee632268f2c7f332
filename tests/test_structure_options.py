"""Compiler-friendly structure options: --tile (widths/starts on a tile grid) and --rank-per-component."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblrc
from gblrc.learn.budget import fit_to_budget
from gblrc.cli import main
from gblrc.nn.layer import GBLRLinear
from gblrc.nn.masks import boxcar_mask, hard_locations, hard_widths, quantize_ste

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grid_rounding_is_consistent_between_train_and_eval():
    n, t = 96, 16
    w = torch.linspace(0.0, 1.0, 41, dtype=torch.float64)
    l = torch.linspace(0.0, 0.99, 41, dtype=torch.float64)
    k, j = hard_widths(w, n, t), hard_locations(l, n, t)
    assert (k % t == 0).all() and (j % t == 0).all() and k.max() == n
    assert torch.equal(torch.round(quantize_ste(w, n, min_one=True, step=t) * n).long(), k)
    assert torch.equal(torch.remainder(torch.round(quantize_ste(l, n, step=t) * n), n).long(), j)
    m = boxcar_mask(w, l, n, torch.float64, t)
    assert torch.equal(m.sum(1).long(), k)


def test_full_width_survives_a_tile_that_does_not_divide_the_axis():
    assert int(hard_widths(torch.tensor(1.0), 100, 32)) == 100
    assert int(hard_widths(torch.tensor(0.5), 100, 32)) == 64


def test_fit_to_budget_keeps_the_tile_grid():
    torch.manual_seed(0)
    layers = []
    for n_in, n_out in ((64, 128), (128, 64)):
        m = GBLRLinear(n_in, n_out, num_components=6, rank_per_component=2)
        m.tile = 16
        m.set_intervals([48, 64, 32, 16, 64, 48], [0, 16, 32, 48, 0, 16], [32, 64, 48, 64, 16, 32], [0] * 6)
        layers.append(m.eval())
    for budget in (0.3, 0.6):
        ratio = fit_to_budget(layers, budget)
        assert ratio <= budget
        for m in layers:
            wc, lc, wr, lr = m.hard_intervals()
            for v in (wc, lc, wr, lr):
                assert (v % 16 == 0).all(), v


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.mark.parametrize("tile,rank", [(16, 1), (8, 4)])
def test_compress_with_tile_and_rank_gives_coarse_structure_within_budget(tile, rank):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    y = x[:, :4].argmax(1)
    m, rep = gblrc.compress(
        mlp(),
        0.4,
        data={"inputs": x, "targets": y},
        steps=20,
        lr=3e-3,
        tile=tile,
        rank_per_component=rank,
        progress=False,
    )
    assert 0.38 <= rep["achieved_ratio"] <= 0.4
    for i in (0, 2):
        assert m[i].rank_per_component == rank
        for b in m[i].structure().structure.blocks:
            for sp in b.cols + b.rows:  # every span starts and ends on the tile grid
                assert sp.start % tile == 0 and sp.stop % tile == 0, (sp, tile)
            assert b.rank % rank == 0


def test_cli_structure_and_tile_options(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=g)
    torch.save(mlp().eval(), tmp_path / "m.pt")
    torch.save({"inputs": x, "targets": x[:, :4].argmax(1)}, tmp_path / "d.pt")
    for args in (["--tile", "16"], ["--structure", "lowrank"]):
        out = tmp_path / f"out{args[1]}.pt"
        r = CliRunner().invoke(
            main,
            [
                "compress",
                str(tmp_path / "m.pt"),
                "-b",
                "0.4",
                "-d",
                str(tmp_path / "d.pt"),
                "--steps",
                "6",
                "-q",
                "-o",
                str(out),
                *args,
            ],
        )
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / f"{out.name}.report.json").read_text())
        assert rep["achieved_ratio"] <= 0.4 and str(rep["settings"][args[0][2:]]) == args[1]
        model = gblrc.load(out)
        if args[0] == "--structure":
            wc, _, wr, _ = model[0].hard_intervals()
            assert (wc == 64).all() and (wr == 128).all()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-b", "0.4", "--tile", "0"])
    assert r.exit_code != 0 and "--tile" in r.output
