"""Offload (issue 29): post-training with only the current block on the device.  On a CPU machine the moves
are watched, not timed: at most one block and its dense twin are on the "device" at a time, every block
goes there and comes back, and the result is the one without offload."""

from __future__ import annotations

import warnings

import pytest
import torch

import gblrc
from _samples import tiny_bert
from gblrc.learn import blocks as B

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=48, seq=6):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, seq - 2 :] = 0
    return {"input_ids": torch.randint(0, 50, (n, seq), generator=g), "attention_mask": mask}


def _config(**kw):
    base = dict(budget=0.5, steps=0, batch_size=8, progress=False)
    t = gblrc.TrainingConfig(calib_batches=2, refine_batches=3, refine_steps=3)
    return gblrc.CompressConfig(**{**base, **kw}, training=t)


def _compressed(offload: bool):
    model = tiny_bert(num_hidden_layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = gblrc.compress(model, _config(offload=offload), data=_data())
    return model, report


def test_offload_keeps_one_block_on_the_device_and_gives_the_same_model(monkeypatch):
    resident, peak, visits = set(), [0], {}
    layer_cls = type(tiny_bert().encoder.layer[0])
    real_move = B.Placement.move

    def watched(self, module, to_device):
        real_move(self, module, to_device)
        if to_device:
            resident.add(module)
        else:
            resident.discard(module)
        blocks_here = [m for m in resident if isinstance(m, layer_cls)]
        peak[0] = max(peak[0], len(blocks_here))
        if isinstance(module, layer_cls) and module in resident:
            visits[id(module)] = visits.get(id(module), 0) + 1

    monkeypatch.setattr(B.Placement, "move", watched)
    off, rep_off = _compressed(True)
    assert peak[0] == 2  # a compressed block and its dense twin, never more
    assert len(visits) == 6  # every block of both models went to the device ...
    assert not [m for m in resident if isinstance(m, layer_cls)]  # ... and came back
    assert any("moves nothing" in w for w in rep_off["warnings"])  # (this machine's device is its CPU)
    monkeypatch.setattr(B.Placement, "move", real_move)
    on, rep_on = _compressed(False)
    assert rep_on["achieved_ratio"] == rep_off["achieved_ratio"] <= 0.5
    assert rep_on["refine"]["blocks"] == rep_off["refine"]["blocks"]
    for (n, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_offload_is_for_post_training_only():
    with pytest.raises(ValueError, match="offload is for post-training compression"):
        _config(offload=True, steps=5)
    with pytest.raises(ValueError, match="offload is for gblrc.compress post-training"):
        gblrc.prepare(tiny_bert(), _config(offload=True), data=_data())
