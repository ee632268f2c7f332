"""Test helpers: the sample model families module, and GBLR layers with random structure and factors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch


def load_families():
    """samples/families.py as a module (samples/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "samples" / "families.py"
    spec = importlib.util.spec_from_file_location("gblrc_sample_families", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def randomize(layer, rng: np.random.Generator, seed: int, full: bool = False):
    """Random cyclic intervals (full widths if ``full``) and normal factors/bias; the layer in eval mode."""
    K, n_in, n_out = layer.num_components, layer.in_features, layer.out_features
    if full:
        layer.set_intervals([n_in] * K, [0] * K, [n_out] * K, [0] * K)
    else:
        layer.set_intervals(
            rng.integers(0, n_in + 1, K),
            rng.integers(0, n_in, K),
            rng.integers(0, n_out + 1, K),
            rng.integers(0, n_out, K),
        )
    with torch.no_grad():
        torch.manual_seed(seed)
        layer.U.normal_()
        layer.V.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer.eval()


def tiny_bert(head=None, *, seed: int = 0, **config):
    """A random-initialised BERT (eval mode) of one layer, hidden 32, 2 heads, FFN 64, vocabulary 50, 16
    positions, unless ``config`` says otherwise; ``head``: a transformers class name (default BertModel)."""
    import transformers

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return getattr(transformers, head or "BertModel")(transformers.BertConfig(**{**cfg, **config})).eval()
