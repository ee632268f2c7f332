"""Block-sparse FFN pairs by neurons (gblrc.learn.neurons): the permutation keeps the function, pruning keeps
the neurons that carry the output, the least-squares refit beats keeping the pruned pair's weights as they are."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import _samples

from gblrc.learn.neurons import neuron_scores, permute_pair, prune_heads, prune_pair


def _ffn(d=12, f=40, act=nn.GELU, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, f, bias=bias), act(), nn.Linear(f, d, bias=bias)).double()


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh])
def test_permuting_the_neurons_leaves_the_function_unchanged(act):
    m = _ffn(act=act)
    x = torch.randn(64, 12, dtype=torch.float64)
    y = m(x)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    permute_pair(m[0], m[2], order)
    assert torch.allclose(m(x), y, rtol=0, atol=1e-6 * float(y.abs().max()))
    assert not torch.equal(m[0].weight, _ffn(act=act)[0].weight)  # the weights did move


def test_the_transformer_ffn_of_a_bert_layer_permutes_without_change():
    model = _samples.tiny_bert(intermediate_size=48).double()
    ids = torch.randint(0, 50, (3, 10))
    y = model(input_ids=ids).last_hidden_state
    layer = model.encoder.layer[0]
    permute_pair(layer.intermediate.dense, layer.output.dense, torch.randperm(48))
    assert torch.allclose(model(input_ids=ids).last_hidden_state, y, rtol=0, atol=1e-6)


def _acts(m, x):
    return m[1](m[0](x))


def test_pruning_keeps_the_neurons_that_carry_the_output_and_refits():
    m = _ffn(f=40)
    with torch.no_grad():  # ten neurons carry the output, the others almost nothing
        m[2].weight[:, 10:] *= 0.1
    x = torch.randn(512, 12, dtype=torch.float64)
    y = m(x)
    acts = _acts(m, x)
    assert set(torch.argsort(neuron_scores(m[2], acts), descending=True)[:10].tolist()) == set(range(10))
    plain = copy.deepcopy(m)
    with torch.no_grad():  # the same ten kept, the rest dropped, no refit
        plain[2].weight[:, 10:] = 0
    order = prune_pair(m[0], m[2], acts, 10)
    assert set(order[:10].tolist()) == set(range(10))
    assert torch.count_nonzero(m[0].weight[10:]) == 0 and torch.count_nonzero(m[2].weight[:, 10:]) == 0
    err = lambda mod: ((mod(x) - y).norm() / y.norm()).item()
    assert err(m) < 0.8 * err(plain)


def test_the_refit_is_least_squares_on_the_kept_activations():
    m = _ffn(f=30, bias=True)
    x = torch.randn(400, 12, dtype=torch.float64)
    y = m(x)
    acts = _acts(m, x)
    prune_pair(m[0], m[2], acts, 12, damp=0.0)
    r = m(x) - y
    a = _acts(m, x)[:, :12]
    # normal equations: the residual is orthogonal to the kept activations and to the constant (the bias)
    assert (a.t() @ r).abs().max() < 1e-6 * a.abs().max() * r.abs().max() * len(x)
    assert r.sum(0).abs().max() < 1e-8 * len(x)


def test_bad_pairs_and_counts_are_one_line_errors():
    m = _ffn()
    acts = _acts(m, torch.randn(8, 12, dtype=torch.float64))
    for keep in (0, 41, 2.5, True):
        with pytest.raises(ValueError, match="keep must be") as e:
            prune_pair(m[0], m[2], acts, keep)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not an FFN pair"):
        permute_pair(m[0], m[0], torch.arange(40))
    with pytest.raises(ValueError, match="permutation"):
        permute_pair(m[0], m[2], torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="features"):
        neuron_scores(m[2], acts[:, :5])


def test_find_pairs_finds_every_ffn_of_a_bert_and_no_attention_pair():
    from gblrc.learn.neurons import find_pairs

    model = _samples.tiny_bert(num_hidden_layers=3, intermediate_size=48).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    before = copy.deepcopy(model.state_dict())
    batch = {"input_ids": torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))}
    pairs = find_pairs(model, names, batch)
    assert pairs == [(f"encoder.layer.{i}.intermediate.dense", f"encoder.layer.{i}.output.dense") for i in range(3)]
    for k, v in model.state_dict().items():  # every trial permutation was undone
        assert torch.equal(v, before[k]), k


class _Mixing(nn.Module):
    """A widening pair whose intermediate features are mixed (a softmax over them): not an FFN pair."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.softmax(h.cumsum(-1), -1))


def test_find_pairs_refuses_a_pair_whose_neurons_interact():
    from gblrc.learn.neurons import find_pairs

    torch.manual_seed(0)
    assert find_pairs(_Mixing().eval(), ["up", "down"], torch.randn(16, 8)) == []
    assert find_pairs(_ffn().float().eval(), ["0", "2"], torch.randn(16, 12)) == [("0", "2")]


def _attention(model, i=0):
    att = model.encoder.layer[i].attention
    return att.self.query, att.self.key, att.self.value, att.output.dense


def test_permuting_the_heads_leaves_a_bert_layer_unchanged():
    from gblrc.learn.neurons import permute_heads

    model = _samples.tiny_bert(hidden_size=32, num_attention_heads=4).double()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    y = model(input_ids=ids).last_hidden_state
    permute_heads(*_attention(model), torch.tensor([2, 0, 3, 1]), 8)
    assert torch.allclose(model(input_ids=ids).last_hidden_state, y, rtol=0, atol=1e-6)


def _output_inputs(model, ids):
    got = []
    h = model.encoder.layer[0].attention.output.dense.register_forward_pre_hook(lambda _m, a: got.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got[0]


def test_pruning_heads_keeps_the_loud_ones_silences_the_rest_and_refits_the_output():
    from gblrc.learn.neurons import prune_heads

    model = _samples.tiny_bert(hidden_size=32, num_attention_heads=4).double()
    q, k, v, o = _attention(model)
    with torch.no_grad():  # heads 1 and 3 carry most of the output
        o.weight[:, 8:16] *= 10.0
        o.weight[:, 24:32] *= 10.0
    ids = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(1))
    acts = _output_inputs(model, ids)
    dense_out = o(acts).detach()
    order = prune_heads(q, k, v, o, acts, 2, 8)
    assert sorted(order[:2].tolist()) == [1, 3]
    after = _output_inputs(model, ids)
    assert after[..., 16:].abs().max() == 0  # pruned heads output nothing (zero value rows)
    a = after.reshape(-1, 32)[:, :16]
    resid = (o(after) - dense_out).reshape(-1, 32)
    # the refit's normal equations on the kept heads' outputs (and the constant); the kept heads' outputs are
    # the dense ones, permuted (their query/key/value rows moved with them)
    scale = float((a.t() @ dense_out.reshape(-1, 32)).abs().max())
    assert float((a.t() @ resid).abs().max()) <= 1e-5 * scale  # (the ridge damp is 1e-6 of the mean diagonal)
    assert float(resid.sum(0).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize(
    "fn, args, msg",
    [
        ("prune_heads", (0, 8), "keep"),
        ("prune_heads", (1, 7), "head_dim"),
        ("permute_heads", ([0, 0, 1, 2], 8), "permutation"),
    ],
)
def test_bad_head_arguments_are_one_line_errors(fn, args, msg):
    from gblrc.learn import neurons

    q, k, v, o = _attention(_samples.tiny_bert(hidden_size=32, num_attention_heads=4))
    first = (torch.randn(5, 32),) if fn == "prune_heads" else ()
    with pytest.raises(ValueError, match=msg) as e:
        getattr(neurons, fn)(q, k, v, o, *first, *args)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the family in compress (issue 28)


def test_pruned_pair_as_gblr_layers_is_the_pruned_pair_refitted_from_moments():
    """pruned_pair (moments of the activations, block-sparse GBLR layers) = prune_pair (activations, in
    place): the same neurons kept, the same refit; each layer costs its kept slice's dense product."""
    from gblrc.learn.neurons import pruned_pair

    m = _ffn(f=40)
    x = torch.randn(512, 12, dtype=torch.float64)
    acts = _acts(m, x)
    C, mean = acts.t() @ acts / acts.shape[0], acts.mean(0)
    up, down, order = pruned_pair(m[0], m[2], C, mean, 10)
    ref = copy.deepcopy(m)
    order_ref = prune_pair(ref[0], ref[2], acts, 10)
    assert torch.equal(order[:10], order_ref[:10])
    y = down(m[1](up(x)))
    assert torch.allclose(y, ref(x), rtol=0, atol=1e-8 * float(ref(x).abs().max()))
    assert up.family == down.family == "neurons"
    assert up.flops() == 10 * 12 and down.flops() == 12 * 10  # k x d each, not k (k + d)


def _tiny_data(n=256, seq=12):
    ids = torch.randint(0, 50, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def block_sparse_bert():
    """A tiny BERT compressed post-training at 0.4 with the families allocated (FFN 128 wide)."""
    import gblrc

    dense = _samples.tiny_bert(num_hidden_layers=2, intermediate_size=128)
    cfg = gblrc.CompressConfig(
        budget=0.4, steps=0, batch_size=16, progress=False, training=gblrc.TrainingConfig(refine_steps=8)
    )
    model, report = gblrc.compress(copy.deepcopy(dense), cfg, data=_tiny_data())
    return dense, model, report


def test_compress_allocates_block_sparse_pairs_within_the_budget(block_sparse_bert):
    from gblrc.nn.layer import GBLRLinear

    dense, model, report = block_sparse_bert
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GBLRLinear)}
    pairs = [n for n, m in layers.items() if m.family == "neurons"]
    assert pairs and all("intermediate" in n or "output.dense" in n for n in pairs)
    cost = sum(m.flops() for m in layers.values())
    dense_cost = sum(m.dense_flops() for m in layers.values())
    assert cost / dense_cost == pytest.approx(report["achieved_ratio"]) and cost <= 0.4 * dense_cost
    rows = {r["name"]: r for r in report["layers"]}
    for n in pairs:  # the report charges the kept slice's dense product
        assert rows[n]["gblr_cost"] == layers[n].flops() == layers[n].hard_structure().cost()
    up = layers["encoder.layer.0.intermediate.dense"]
    assert up.flops() == up.hard_structure().blocks[0].n_rows * 32  # kept neurons x hidden
    x = _tiny_data(16)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(**x).last_hidden_state, dense(**x).last_hidden_state, dim=-1)
    assert float(cos.mean()) > 0.99


def test_block_sparse_off_keeps_every_layer_learned():
    import gblrc
    from gblrc.nn.layer import GBLRLinear

    cfg = gblrc.CompressConfig(
        budget=0.4,
        steps=0,
        batch_size=16,
        progress=False,
        training=gblrc.TrainingConfig(refine_steps=0, block_sparse=False),
    )
    model, _ = gblrc.compress(_samples.tiny_bert(intermediate_size=128), cfg, data=_tiny_data(64))
    assert {m.family for m in model.modules() if isinstance(m, GBLRLinear)} == {"gblr"}
    with pytest.raises(ValueError, match="block_sparse"):
        gblrc.TrainingConfig(block_sparse="yes")


def test_a_block_sparse_model_lowers_to_matmuls_on_the_kept_slice(block_sparse_bert, tmp_path):
    """narrow-pairs: the up layer computes the kept neurons only, GELU runs on them, the down layer reads them:
    one MatMul per matrix of the kept slice's shape; ONNX Runtime matches PyTorch (float64 reference)."""
    from collections import OrderedDict

    import onnx

    from gblrc import lower
    from gblrc.nn.layer import GBLRLinear

    from gblrc.io.modelio import load, save

    _, compressed, _ = block_sparse_bert
    x = _tiny_data(2)
    save(compressed, tmp_path / "m.gblr.pt", example_inputs=OrderedDict(x))
    model = load(tmp_path / "m.gblr.pt")  # saved and loaded: the families come back
    fam = lambda m: {n: l.family for n, l in m.named_modules() if isinstance(l, GBLRLinear)}
    assert fam(model) == fam(compressed) and "neurons" in fam(model).values()
    rep = lower(model, OrderedDict(x), tmp_path / "m.onnx")
    assert rep.max_rel_err <= 1e-4
    g = onnx.load(tmp_path / "m.onnx").graph
    dims = {i.name: tuple(i.dims) for i in g.initializer}
    shapes = {dims.get(n.input[1]) for n in g.node if n.op_type == "MatMul"}
    for i in range(2):
        up = model.get_submodule(f"encoder.layer.{i}.intermediate.dense")
        if isinstance(up, GBLRLinear) and up.family == "neurons":
            k = up.hard_structure().blocks[0].n_rows
            assert (32, k) in shapes and (k, 32) in shapes  # (in, out) of the MatMul weights
    assert (32, 128) not in shapes and (128, 32) not in shapes  # no FFN matrix at full width


def test_find_heads_and_pruned_heads_as_gblr_layers():
    """find_heads finds each attention layer's four projections and its head size (the module's own); the pruned
    heads as block-sparse GBLR layers are prune_heads' result (the same heads kept, the same refit)."""
    from gblrc.learn.neurons import find_heads, pruned_heads

    model = _samples.tiny_bert(num_hidden_layers=2, num_attention_heads=4).double()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    found = find_heads(model, names, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    att = "encoder.layer.{}.attention."
    assert found == [
        tuple(att.format(i) + s for s in ("self.query", "self.key", "self.value", "output.dense")) + (8,)
        for i in range(2)
    ]
    q, k, v, o = (model.get_submodule(n) for n in found[0][:4])
    acts = torch.randn(300, 32, dtype=torch.float64)
    C, mean = acts.t() @ acts / 300, acts.mean(0)
    *layers, order = pruned_heads(q, k, v, o, C, mean, 2, 8)
    assert [m.family for m in layers] == ["heads"] * 4
    assert [m.flops() for m in layers] == [16 * 32] * 4  # 2 heads of 8 x 32 features each
    ref = [copy.deepcopy(m) for m in (q, k, v, o)]
    order_ref = prune_heads(*ref, acts, 2, 8)
    assert torch.equal(order[:2], order_ref[:2])
    x = torch.randn(5, 32, dtype=torch.float64)
    for new, old in zip(layers, ref):
        torch.testing.assert_close(
            new(x if new is not layers[3] else acts[:5]), old(x if old is not ref[3] else acts[:5])
        )


def test_compress_prunes_heads_where_the_allocation_says(monkeypatch, tmp_path):
    """The init of a heads unit: the attention's four projections become block-sparse layers of the kept heads
    (the dense copy permuted alike), refitted and refined; the model stays close and within the budget."""
    import gblrc
    import gblrc.learn.compress as C
    from gblrc.learn.allocate import Unit
    from gblrc.nn.layer import GBLRLinear

    real = C.allocate_families

    def heads_too(model, names, units, *a, **kw):
        ratios, keeps = real(model, names, units, *a, **kw)
        u = next(u for u in units if u.family == "heads")
        for n in u.layers:
            ratios.pop(n, None)
        return ratios, {**{k: v for k, v in keeps.items() if not set(k.layers) & set(u.layers)}, u: 2}

    monkeypatch.setattr(C, "allocate_families", heads_too)
    dense = _samples.tiny_bert(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    cfg = gblrc.CompressConfig(
        budget=0.6, steps=0, batch_size=16, progress=False, training=gblrc.TrainingConfig(refine_steps=8)
    )
    model, report = gblrc.compress(copy.deepcopy(dense), cfg, data=_tiny_data())
    fam = {n: m.family for n, m in model.named_modules() if isinstance(m, GBLRLinear)}
    assert [
        fam[f"encoder.layer.0.attention.{s}"] for s in ("self.query", "self.key", "self.value", "output.dense")
    ] == ["heads"] * 4
    assert report["families"]["heads"] == 4 and report["achieved_ratio"] <= 0.6
    assert isinstance(Unit(("a", "b")), Unit)
    x = _tiny_data(16)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(**x).last_hidden_state, dense(**x).last_hidden_state, dim=-1)
    assert float(cos.mean()) > 0.99
    from collections import OrderedDict

    rep = gblrc.lower(model, OrderedDict(_tiny_data(2)), tmp_path / "h.onnx")  # lowers; ORT matches PyTorch
    assert rep.max_rel_err <= 1e-4
