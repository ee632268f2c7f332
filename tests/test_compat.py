"""A model saved by gblrc 0.1.0 (before the package was split into subpackages) still loads and lowers.

The fixture holds a pickled nn.Sequential with a GBLRConv2d and two GBLRLinear layers whose classes
were recorded under their 0.1.0 module paths (``gblrc.conv``, ``gblrc.layer``), and the outputs it gave.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import gblrc

FIX = Path(__file__).parent / "fixtures"
MODEL = FIX / "gblrc-0.1.0-mlp-conv.gblr.pt"
EXPECTED = FIX / "gblrc-0.1.0-mlp-conv.expected.pt"


def test_fixture_records_the_old_module_paths():
    names = torch.serialization.get_unsafe_globals_in_checkpoint(MODEL)
    assert "gblrc.layer.GBLRLinear" in names and "gblrc.conv.GBLRConv2d" in names


def test_old_file_loads_without_trust_and_reproduces_its_outputs():
    m = gblrc.load(MODEL)
    exp = torch.load(EXPECTED)
    assert isinstance(m[3], gblrc.GBLRLinear) and isinstance(m[0], gblrc.GBLRConv2d)
    assert m.gblrc_meta["written_by"] == "gblrc 0.1.0"
    with torch.no_grad():
        torch.testing.assert_close(
            m(exp["x"]), exp["y"], rtol=1e-6, atol=1e-7
        )  # float32 round-off of this CPU's kernels


def test_old_file_loads_with_trust_too():
    m = gblrc.load(MODEL, trust_pickle=True)
    exp = torch.load(EXPECTED)
    with torch.no_grad():
        torch.testing.assert_close(
            m(exp["x"]), exp["y"], rtol=1e-6, atol=1e-7
        )  # float32 round-off of this CPU's kernels


def test_old_file_lowers_to_standard_ops(tmp_path):
    m = gblrc.load(MODEL)
    exp = torch.load(EXPECTED)
    out = tmp_path / "old.onnx"
    rep = gblrc.lower(m, m.gblrc_example_inputs, out)
    assert rep.gblr_layers == 3
    assert not any(op.startswith("GBLR") for op in rep.ops_after)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: exp["x"].numpy()})[0]
    np.testing.assert_allclose(y, exp["y"].numpy(), rtol=1e-4, atol=1e-5)
