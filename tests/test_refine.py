"""Block-level refinement (gblrc.learn.refine): lower output error on held-out inputs, off by default."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import gblrc
from gblrc.learn.refine import find_blocks

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=60,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=96,
            max_position_embeddings=16,
        )
    ).eval()


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 12), generator=g)
    mask = torch.ones_like(x)
    mask[::3, 9:] = 0
    return {"input_ids": x, "attention_mask": mask}


def held_out_error(model, dense, x) -> float:
    with torch.no_grad():
        a, b = model(**x).last_hidden_state, dense(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    return float(((a - b) * m).norm() / (b * m).norm())


def test_find_blocks_groups_layers_by_their_container_item():
    m = bert()
    names = [n for n, x in m.named_modules() if isinstance(x, nn.Linear) and n.startswith("encoder")]
    assert find_blocks(m, names) == ["encoder.layer.0", "encoder.layer.1"]
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    assert find_blocks(mlp, ["0", "2"]) == ["0", "2"]  # no container item above: each layer is a block


def test_refinement_lowers_the_error_on_held_out_inputs(one_thread):
    dense = bert()
    data, held = ids(96, 1), ids(48, 2)
    # (low rank: the block-sparse FFN pairs start 2.5x closer on this model, leaving refinement little to show)
    kw = dict(
        data=data, steps=0, batch_size=16, calib_batches=6, progress=False, include=r"^encoder\.", block_sparse=False
    )
    base, rep0 = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=0, **kw)
    refined, rep = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=60, refine_lr=3e-3, **kw)
    assert "refine" not in rep0
    blocks = rep["refine"]["blocks"]
    assert [b["name"] for b in blocks] == ["encoder.layer.0", "encoder.layer.1"] and all(
        b["layers"] == 6 for b in blocks
    )
    assert all(b["loss_after"] < b["loss_before"] for b in blocks)
    e0, e1 = held_out_error(base, dense, held), held_out_error(refined, dense, held)
    assert e1 < 0.9 * e0, (e0, e1)  # on inputs the refinement never saw
    assert rep["achieved_ratio"] == rep0["achieved_ratio"]  # the structure is untouched: same cost


FIXTURE = Path(__file__).parent / "fixtures" / "steps0-c50b11e-bert.pt"


@pytest.mark.parametrize("structure", ["lowrank", "gblr"])
def test_refine_steps_zero_reproduces_the_steps0_result_before_refinement_existed(structure, one_thread):
    """The fixture is `compress --steps 0` of commit c50b11e (before refinement was on by default): the same
    layers, weights and outputs with refine_steps=0 (to float32 round-off of another BLAS)."""
    exp = torch.load(FIXTURE, weights_only=True)
    cm, rep = gblrc.compress(
        bert(),
        0.3,
        data=ids(96, 1),
        steps=0,
        batch_size=16,
        calib_batches=4,
        progress=False,
        include=r"^encoder\.",
        structure=structure,
        refine_steps=0,
        block_sparse=False,  # (that commit had no block-sparse family)
    )
    assert "refine" not in rep and rep["achieved_ratio"] == exp[structure]["achieved_ratio"]
    state = {k: v for k, v in cm.state_dict().items() if "encoder" in k}
    assert state.keys() == exp[structure]["state"].keys()
    for k, v in state.items():
        # factors of a float32 SVD agree to round-off of their largest entry, not entrywise (another CPU's BLAS
        # moves single entries by ~3e-6 of the tensor's max); the function below is held to 1e-6
        want = exp[structure]["state"][k]
        scale = want.abs().max().item() if want.is_floating_point() and want.numel() else 1.0
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-5 * scale, msg=k)
    with torch.no_grad():
        y = cm(**exp["inputs"]).last_hidden_state
    torch.testing.assert_close(y, exp[structure]["output"], rtol=1e-6, atol=1e-6)


def test_bad_refine_steps_are_one_line_errors_and_no_data_warns(one_thread):
    dense = bert()
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="refine_steps") as e:
            gblrc.CompressConfig(budget=0.4, training=gblrc.TrainingConfig(refine_steps=bad))
        assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="block refinement needs data"):
        gblrc.compress(copy.deepcopy(dense), 0.4, steps=0, refine_steps=5, progress=False)


def test_cli_refine_steps_reports_the_blocks_and_rejects_bad_values(tmp_path, one_thread):
    import json

    from click.testing import CliRunner

    from gblrc.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.randn(128, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "d.pt")
    base = [
        "compress",
        str(tmp_path / "m.pt"),
        "--budget",
        "0.4",
        "--data",
        str(tmp_path / "d.pt"),
        "--steps",
        "0",
        "-q",
    ]
    r = CliRunner().invoke(main, base + ["--refine-steps", "20", "-o", str(tmp_path / "r.gblr.pt")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.gblr.pt.report.json").read_text())
    assert [b["name"] for b in rep["refine"]["blocks"]] == ["0", "2"] and rep["settings"]["refine_steps"] == 20
    r = CliRunner().invoke(main, base + ["--refine-steps", "-3", "-o", str(tmp_path / "bad.gblr.pt")])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code != 0 and last.startswith("Error: --refine-steps") and not list(tmp_path.glob("bad*"))


@pytest.mark.parametrize(
    "setting",
    [dict(refine_norms=True), dict(refine_target="local"), dict(refine_batches=2)],
    ids=["norms", "local-target", "two-batches"],
)
def test_refine_recipe_options_lower_the_held_out_error(setting, one_thread):
    dense = bert()
    data, held = ids(96, 1), ids(48, 2)
    kw = dict(data=data, steps=0, batch_size=16, calib_batches=4, progress=False, include=r"^encoder\.")
    base, _ = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=0, **kw)
    refined, rep = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=60, refine_lr=3e-3, **kw, **setting)
    assert all(b["loss_after"] < b["loss_before"] for b in rep["refine"]["blocks"])
    assert held_out_error(refined, dense, held) < 0.95 * held_out_error(base, dense, held)
    norms = [n for n, p in refined.named_parameters() if "LayerNorm" in n and "encoder" in n]
    moved = any(not torch.equal(refined.get_parameter(n), dense.get_parameter(n)) for n in norms)
    assert moved == bool(setting.get("refine_norms"))  # the norms train only when asked


def test_refine_batches_beyond_the_calibration_batches_are_used(one_thread):
    """refine_batches draws its own batches (more than calib_batches): a different result than 2."""
    dense = bert()
    kw = dict(data=ids(96, 1), steps=0, batch_size=16, calib_batches=2, progress=False, include=r"^encoder\.")
    a, _ = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=12, refine_batches=2, **kw)
    b, _ = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=12, refine_batches=6, **kw)
    assert not torch.equal(a.encoder.layer[0].attention.self.query.U, b.encoder.layer[0].attention.self.query.U)


def test_refine_structure_moves_gblr_widths_within_the_budget(one_thread):
    dense = bert()
    kw = dict(data=ids(96, 1), steps=0, batch_size=16, calib_batches=4, progress=False, include=r"^encoder\.")
    kw["block_sparse"] = False  # every layer's widths free to move (a block-sparse layer's structure is fixed)
    _, rep = gblrc.compress(copy.deepcopy(dense), 0.3, refine_steps=40, refine_lr=3e-3, refine_structure=True, **kw)
    moved = rep["refine"]["structure_moved"]
    assert moved["blocks_changed"] > 0, moved  # widths / locations took part
    assert rep["achieved_ratio"] <= 0.3 + 1e-12
    assert all(b["loss_after"] < b["loss_before"] for b in rep["refine"]["blocks"])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("refine_batches", 0, "refine_batches"),
        ("refine_target", "teacher", "refine_target"),
        ("refine_norms", "yes", "refine_norms"),
        ("refine_structure", 1, "refine_structure"),
    ],
)
def test_bad_refine_settings_are_one_line_errors(field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        gblrc.TrainingConfig(**{field: value})
    assert "\n" not in str(e.value)


def test_refine_structure_with_low_rank_is_a_one_line_error():
    with pytest.raises(ValueError, match="refine_structure.*lowrank") as e:
        gblrc.CompressConfig(budget=0.4, structure="lowrank", training=gblrc.TrainingConfig(refine_structure=True))
    assert "\n" not in str(e.value)


def test_a_refinement_step_in_pieces_has_the_whole_batch_gradient(monkeypatch):
    """The block's forward and backward run on pieces of at most CHUNK_TOKENS tokens (activation memory),
    with the whole batch's denominator: the loss and gradient of one pass over the batch (float64, 1e-12)."""
    from gblrc.learn import refine as R
    from gblrc.learn.objective import rel_mse

    blk = bert().double().encoder.layer[0]
    d = blk.attention.self.query.in_features
    g = torch.Generator().manual_seed(0)
    x, t = (torch.randn(6, 10, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(6, 10, 1, dtype=torch.float64)
    mask[2, 7:] = 0
    kw = {"attention_mask": torch.zeros(6, 1, 1, 10, dtype=torch.float64)}
    whole = rel_mse(R._main(blk(x, **kw)), t, mask)
    whole.backward()
    want = [p.grad.clone() for p in blk.parameters()]
    blk.zero_grad(set_to_none=True)
    monkeypatch.setattr(R, "CHUNK_TOKENS", 16)  # 60 tokens: 4 pieces
    loss = R._step_loss(blk, (x,), kw, t, mask)
    assert float(loss) == pytest.approx(float(whole), rel=1e-6)
    for p, w in zip(blk.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
