"""The block-sequential pass (gblrc.learn.blocks): each block's inputs computed once, propagated through a
chain, equal to what a forward pass of the model gives them; refinement, sensitivity and the sequential
refit call each block O(1) times per batch, not once per later block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from _samples import tiny_bert
from gblrc.learn.allocate import sensitivity_curves
from gblrc.learn.blocks import BlockInputs, _capture, find_blocks
from gblrc.learn.calib import input_covariances

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert_batches(n=3, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = []
    for i in range(n):
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 1 - i :] = 0  # padding differs per batch
        xs.append({"input_ids": torch.randint(0, 50, (2, seq), generator=g), "attention_mask": mask})
    return xs


def _gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=layers, n_head=2, n_positions=16)).eval()


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def _same_inputs(a, b):
    (aa, ak), (ba, bk) = a, b
    assert len(aa) == len(ba) and set(ak) == set(bk)
    for x, y in list(zip(aa, ba)) + [(ak[k], bk[k]) for k in ak]:
        if torch.is_tensor(x):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        else:
            assert type(x) is type(y)


@pytest.mark.parametrize("release", [False, True])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_propagated_inputs_are_the_inputs_a_forward_pass_gives(kind, release):
    if kind == "bert":
        model, xs = tiny_bert(num_hidden_layers=4).eval(), _bert_batches()
    else:
        model = _gpt2(4)
        xs = [torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    blocks = find_blocks(model, _linears(model))
    bi = BlockInputs(model, xs)
    with torch.no_grad():
        for b in blocks:
            got, ref = bi.inputs(b), _capture(model, b, xs)
            for g, r in zip(got, ref):
                _same_inputs(g, r)
            bi.outputs(b, release=release)
    chain = [b for b in blocks if bi.chained(b)]
    assert len(chain) == 4  # the 4 transformer layers
    assert [bi.how[b] for b in chain] == ["captured"] + ["propagated"] * 3


def test_a_changed_block_passes_its_new_outputs_on():
    model, xs = tiny_bert(num_hidden_layers=3).eval(), _bert_batches()
    bi = BlockInputs(model, xs)
    bi.inputs("encoder.layer.0")
    bi.outputs("encoder.layer.0")
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(0.5)  # "refined" after its outputs were computed
    bi.changed()
    got = bi.inputs("encoder.layer.1")
    for g, r in zip(got, _capture(model, "encoder.layer.1", xs)):
        _same_inputs(g, r)


class Shuffled(nn.Module):
    """A ModuleList whose items are not a chain: the hidden state is changed between the items."""

    def __init__(self, n=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, n) for _ in range(3))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) * (i + 2.0)
        return x


class Reversed(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, n) for _ in range(3))

    def forward(self, x):
        for layer in reversed(self.layers):
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("cls", [Shuffled, Reversed])
def test_a_container_that_is_not_a_chain_is_captured(cls):
    torch.manual_seed(0)
    model = cls().eval()
    xs = [torch.randn(4, 16) for _ in range(2)]
    bi = BlockInputs(model, xs)
    blocks = find_blocks(model, _linears(model))
    order = blocks if cls is Shuffled else blocks[::-1]
    for b in order:
        assert not bi.chained(b)
        for g, r in zip(bi.inputs(b), _capture(model, b, xs)):
            _same_inputs(g, r)
        assert bi.how[b] == "captured"


def _count_calls(model, block):
    calls = []
    h = model.get_submodule(block).register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, h


@pytest.mark.parametrize("depth", [2, 6])
def test_refinement_runs_the_first_block_a_constant_number_of_times(depth):
    """O(L): block 0 runs for its own steps and judgement, once more to pass its outputs on, and in the two
    chain checks; not once per later block and batch (the O(L^2) of capturing every block by a forward)."""
    model, xs = tiny_bert(num_hidden_layers=depth).eval(), _bert_batches(4)
    dense = copy.deepcopy(model)
    from gblrc.learn.refine import refine_blocks
    from gblrc.nn.replace import replace_linears

    names = [n for n in _linears(model) if n.startswith("encoder.")]
    layers = replace_linears(model, names, {n: 0.5 for n in names})
    calls, h = _count_calls(model, "encoder.layer.0")
    try:
        refine_blocks(model, dense, layers, xs, steps=3)
    finally:
        h.remove()
    # 1 chain check + 4 captured + 2 x 4 judged + 3 steps + 4 to pass its outputs on
    assert len(calls) == 1 + 4 + 8 + 3 + 4


@pytest.mark.parametrize("depth", [2, 6])
def test_sensitivity_runs_each_block_a_constant_number_of_times(depth):
    model, xs = tiny_bert(num_hidden_layers=depth).eval(), _bert_batches(1)
    names = [n for n in _linears(model) if n.startswith("encoder.")]
    covs = input_covariances(model, names, xs)
    calls, h = _count_calls(model, "encoder.layer.0")
    try:
        curves = sensitivity_curves(model, names, covs, xs)
    finally:
        h.remove()
    per_block = len([n for n in names if n.startswith("encoder.layer.0.")])
    # chain check, capture, dense output, 4 measured ratios per layer of the block
    assert len(calls) == 1 + 1 + 1 + 4 * per_block
    assert set(curves) == set(names)
    for c in curves.values():  # losses fall as the cost rises (the truncation's tail energy)
        losses = [loss for _, loss in c]
        assert all(a >= b - 1e-12 for a, b in zip(losses, losses[1:]))


def test_half_cache_halves_the_stored_hidden_states_and_gives_them_back_as_float32():
    from gblrc.learn.blocks import Placement, _Half

    model, xs = (
        tiny_bert(num_hidden_layers=3, hidden_size=64, max_position_embeddings=80).eval(),
        _bert_batches(3, seq=70),
    )
    place = Placement("cpu", half_cache=True)
    full, half = BlockInputs(model, xs), BlockInputs(model, xs, place)
    for b in ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]:
        f, h = full.inputs(b), half.inputs(b)
        assert all(isinstance(a[0], _Half) and a[0].t.dtype == torch.float16 for a, _ in h)
        for (fa, _), (ha, hk) in zip(f, h):
            got = place.fetch(ha)[0]
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, fa[0], rtol=1e-3, atol=1e-3 * float(fa[0].abs().max()))
        full.outputs(b)
        half.outputs(b)
    big = torch.full((64, 64), 7.0e4)
    assert place.store(big) is big  # beyond float16's range: kept as it is
    assert place.fetch(place.store(torch.ones(64, 64))).dtype == torch.float32


def test_the_allocator_settings_take_effect_on_glibc():
    import platform

    from gblrc.learn.blocks import large_allocations_mapped, release_memory

    release_memory()  # (no error anywhere)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert large_allocations_mapped() is True
