"""Block-sparse by neurons: an FFN pair (up: d -> f, an elementwise activation, down: f -> d) keeps k of its f
intermediate neurons, permuted to the front so they are one contiguous interval (issue 28; docs/design.md §1,
"Block-sparse by neurons"; the prototype measured in the shared design notes, 2026-12-07).

An FFN's function does not change when its intermediate neurons are permuted: rows of W1 and b1 and columns of
W2 together (:func:`permute_pair`).  After the permutation the kept neurons are the interval [0, k): the up
layer's block is rows [0, k) x all columns, the down layer's all rows x columns [0, k), each a dense product
of k x d multiply-adds.

:func:`neuron_scores` ranks neurons by ||W2[:, j]||^2 E[a_j^2] (the output energy each carries on the
calibration activations); :func:`prune_pair` keeps the k best, folds the permutation into the weights, zeroes
the rest and refits W2[:, :k] and b2 by least squares on the kept activations to reproduce the dense pair's
output (Kwon et al. 2022's mask tuning, in closed form).

:func:`find_pairs` finds a model's FFN pairs without names: layers that run one after the other in call order,
the first widening (up.out == down.in > up.in), accepted only when a random permutation of the intermediate
neurons leaves the model's output on a batch unchanged (an attention layer's value and output projections
fail: attention mixes the features within a head).

Attention heads are pruned the same way (:func:`permute_heads`, :func:`head_scores`, :func:`prune_heads`): the
kept heads first, the others' query, key and value rows zero, the output projection refitted on the kept
heads' outputs.

:func:`pruned_pair` is the form ``compress`` uses: from the moments of the down layer's inputs (the calibration's
covariance and mean), the pair as two block-sparse GBLR layers (:meth:`gblrc.nn.layer.GBLRLinear.from_tile`,
family "neurons"), each one full-rank block that costs its kept slice's dense product; the allocation across
families is :func:`gblrc.learn.allocate.allocate_families`, the lowering's narrowing passes/narrow_pairs.py.
Heads likewise: :func:`find_heads` and :func:`pruned_heads` (family "heads"; the query, key and value layers'
kept rows, the output layer refitted on the kept heads' outputs).
"""

from __future__ import annotations

import torch
from torch import nn

from gblrc.nn.fit_data import refit_kept

__all__ = [
    "permute_pair",
    "neuron_scores",
    "prune_pair",
    "pruned_pair",
    "neuron_order",
    "refit_kept",
    "check_pair",
    "find_pairs",
    "permute_heads",
    "head_scores",
    "prune_heads",
    "pruned_heads",
    "find_heads",
]


def check_pair(up: nn.Linear, down: nn.Linear) -> int:
    """The intermediate width f of the pair (up.out_features == down.in_features), or a one-line ValueError."""
    if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
        raise ValueError(f"an FFN pair is two nn.Linear layers; got {type(up).__name__}, {type(down).__name__}")
    if up.out_features != down.in_features:
        raise ValueError(
            f"not an FFN pair: up gives {up.out_features} features, down takes {down.in_features}; "
            "pair a layer with the one that reads its (activated) output"
        )
    return up.out_features


@torch.no_grad()
def permute_pair(up: nn.Linear, down: nn.Linear, order: torch.Tensor) -> None:
    """Reorder the pair's intermediate neurons in place: neuron ``order[i]`` becomes neuron i (rows of W1 and b1,
    columns of W2).  The pair's function is unchanged for any elementwise activation between them."""
    f = check_pair(up, down)
    order = torch.as_tensor(order, dtype=torch.long, device=up.weight.device)
    if order.shape != (f,) or not torch.equal(torch.sort(order).values, torch.arange(f, device=order.device)):
        raise ValueError(f"order must be a permutation of the {f} intermediate neurons")
    up.weight.copy_(up.weight[order])
    if up.bias is not None:
        up.bias.copy_(up.bias[order])
    down.weight.copy_(down.weight[:, order.to(down.weight.device)])


@torch.no_grad()
def neuron_scores(down: nn.Linear, acts: torch.Tensor) -> torch.Tensor:
    """||W2[:, j]||^2 E[a_j^2] for each intermediate neuron j; ``acts`` (n, f): the down layer's inputs."""
    a = acts.reshape(-1, acts.shape[-1]).double()
    if a.shape[-1] != down.in_features:
        raise ValueError(f"acts have {a.shape[-1]} features, the down layer takes {down.in_features}")
    return down.weight.double().pow(2).sum(0) * a.pow(2).mean(0)


@torch.no_grad()
def prune_pair(up: nn.Linear, down: nn.Linear, acts: torch.Tensor, keep: int, *, damp: float = 1e-6) -> torch.Tensor:
    """Keep the ``keep`` highest-scoring neurons of the pair as neurons [0, keep), in place; returns the order
    applied (``order[i]`` is the original index of neuron i).

    The other neurons' rows of W1 and b1 and columns of W2 become zero (they produce no output), and W2[:, :keep]
    and b2 are refitted by least squares (ridge ``damp`` x the mean diagonal) so that, on ``acts`` (n, f: the
    dense down layer's inputs), the pair's output is as close as possible to the dense output."""
    f = check_pair(up, down)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= f:
        raise ValueError(f"keep must be a whole number of neurons in [1, {f}]; got {keep!r}")
    a = acts.reshape(-1, f).double()
    order = torch.argsort(neuron_scores(down, a), descending=True, stable=True)
    permute_pair(up, down, order)
    _refit_columns(down, a[:, order], keep, damp)
    up.weight[keep:] = 0
    if up.bias is not None:
        up.bias[keep:] = 0
    return order


@torch.no_grad()
def neuron_order(W2: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, scores): the intermediate neurons best first by ||W2[:, j]||^2 E[a_j^2] (``C``: the down layer's
    inputs' second moment), and the scores (float64)."""
    scores = W2.double().pow(2).sum(0) * C.double().diagonal().to(W2.device)
    return torch.argsort(scores, descending=True, stable=True), scores


@torch.no_grad()
def group_order(W: torch.Tensor, C: torch.Tensor, group: int) -> torch.Tensor:
    """The consumer ``W``'s input features in groups of ``group`` (neurons: 1, a head's size), best first by their
    summed :func:`neuron_order` scores."""
    scores = neuron_order(W, C)[1].reshape(-1, group).sum(1)
    return torch.argsort(scores, descending=True, stable=True)


@torch.no_grad()
def pruned_pair(up: nn.Linear, down: nn.Linear, C: torch.Tensor, mean, keep: int, *, damp: float = 1e-6):
    """The FFN pair with its ``keep`` best neurons as block-sparse GBLR layers (eval mode, family "neurons"),
    from the moments of the down layer's inputs (``C`` = E[a a^T], ``mean`` = E[a], on calibration data):
    (up layer, down layer, order).  ``order[i]`` is the original index of neuron i: the kept neurons are
    [0, keep), the up layer's block rows [0, keep) x all its inputs (W1's kept rows and b1, unchanged), the
    down layer's all its outputs x columns [0, keep) (W2 and b2 refitted by :func:`refit_kept` to give the
    dense pair's output).  Each costs keep x its other side: the kept slice's dense product."""
    from gblrc.nn.layer import GBLRLinear

    f = check_pair(up, down)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= f:
        raise ValueError(f"keep must be a whole number of neurons in [1, {f}]; got {keep!r}")
    order, _ = neuron_order(down.weight, C)
    kept = order[:keep]
    W2, b2 = refit_kept(down.weight, down.bias, C.to(down.weight.device), mean, kept, damp)
    dt = up.weight.dtype
    b1 = None
    if up.bias is not None:
        b1 = torch.zeros(f, dtype=dt, device=up.weight.device)
        b1[:keep] = up.bias[kept]
    new_up = GBLRLinear.from_tile(up.weight[kept], f, up.in_features, bias=b1)
    new_down = GBLRLinear.from_tile(W2.to(dt), down.out_features, f, bias=None if b2 is None else b2.to(dt))
    return new_up, new_down, order


@torch.no_grad()
def _refit_columns(down: nn.Linear, a: torch.Tensor, keep: int, damp: float) -> None:
    """W[:, :keep] and the bias of ``down`` refitted (:func:`refit_kept`) to give its own output on inputs ``a``
    (n, in; float64) from a[:, :keep] alone; the other columns become zero."""
    W, b = refit_kept(down.weight, down.bias, a.t() @ a / a.shape[0], a.mean(0), torch.arange(keep), damp)
    down.weight.zero_()
    down.weight[:, :keep] = W.to(down.weight)
    if b is not None:
        down.bias.copy_(b.to(down.bias))


def group_features(order: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature order of a head order: head order[i]'s ``head_dim`` features become head i's."""
    return (order[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _check_heads(q, k, v, o, head_dim: int) -> int:
    lins = (q, k, v, o)
    if not all(isinstance(m, nn.Linear) for m in lins):
        raise ValueError("heads: query, key, value and output must be nn.Linear layers")
    width = o.in_features
    if not isinstance(head_dim, int) or head_dim < 1 or width % head_dim:
        raise ValueError(f"head_dim must divide the attention width {width}; got {head_dim!r}")
    if {q.out_features, k.out_features, v.out_features} != {width}:
        raise ValueError(
            f"query/key/value give {q.out_features}/{k.out_features}/{v.out_features} features, the output layer "
            f"takes {width}: give one attention layer's four projections"
        )
    return width // head_dim


@torch.no_grad()
def permute_heads(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, order, head_dim: int) -> None:
    """Reorder an attention layer's heads in place: head ``order[i]`` becomes head i (the rows of the query, key
    and value projections and their biases, the output projection's columns, ``head_dim`` at a time).  The
    attention's function is unchanged: each head attends on its own and the output sums over heads."""
    n = _check_heads(q, k, v, o, head_dim)
    order = torch.as_tensor(order, dtype=torch.long)
    if order.shape != (n,) or not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise ValueError(f"order must be a permutation of the {n} heads")
    feats = group_features(order, head_dim).to(q.weight.device)
    for m in (q, k, v):
        m.weight.copy_(m.weight[feats])
        if m.bias is not None:
            m.bias.copy_(m.bias[feats])
    o.weight.copy_(o.weight[:, feats.to(o.weight.device)])


@torch.no_grad()
def head_scores(o: nn.Linear, acts: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The output energy each head carries: sum over its features j of ||O[:, j]||^2 E[a_j^2] (``acts``: the
    output projection's inputs, the heads' concatenated outputs)."""
    return neuron_scores(o, acts).reshape(-1, head_dim).sum(1)


@torch.no_grad()
def prune_heads(q, k, v, o, acts: torch.Tensor, keep: int, head_dim: int, *, damp: float = 1e-6) -> torch.Tensor:
    """Keep the ``keep`` highest-scoring heads as heads [0, keep), in place; returns the head order applied.

    The other heads' query, key and value rows and biases become zero, so they output nothing (a zero value
    row gives a zero head output whatever its attention), and the output projection's columns of the kept heads
    and its bias are refitted by least squares on ``acts`` (the dense output projection's inputs) to give the
    dense output; its other columns become zero."""
    n = _check_heads(q, k, v, o, head_dim)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= n:
        raise ValueError(f"keep must be a whole number of heads in [1, {n}]; got {keep!r}")
    a = acts.reshape(-1, o.in_features).double()
    order = torch.argsort(head_scores(o, a, head_dim), descending=True, stable=True)
    permute_heads(q, k, v, o, order, head_dim)
    _refit_columns(o, a[:, group_features(order, head_dim)], keep * head_dim, damp)
    for m in (q, k, v):
        m.weight[keep * head_dim :] = 0
        if m.bias is not None:
            m.bias[keep * head_dim :] = 0
    return order


@torch.no_grad()
def find_pairs(model: nn.Module, names, batch, *, seed: int = 0, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """The FFN pairs (up, down) among the nn.Linear layers ``names`` of ``model``, found on ``batch``.

    A candidate is two layers called one after the other (in the order of a forward pass of ``batch``, among
    ``names``) with up.out_features == down.in_features > up.in_features.  It is accepted only if a random
    permutation of its intermediate neurons (:func:`permute_pair`) leaves the model's output unchanged to
    ``rtol`` of its largest value, which holds when the down layer reads the up layer's output through
    elementwise operations only; the permutation is undone either way."""
    from gblrc.learn.calib import call_order
    from gblrc.learn.data import call_model, model_output
    from gblrc.nn.replace import get_module

    order = call_order(model, list(names), batch)
    mods = {n: get_module(model, n) for n in order}
    ref = model_output(call_model(model, batch)).detach()
    scale = float(ref.abs().max()) or 1.0
    g = torch.Generator().manual_seed(seed)
    pairs, used = [], set()
    for a, b in zip(order, order[1:]):
        up, down = mods[a], mods[b]
        if a in used or not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            continue
        if up.out_features != down.in_features or up.out_features <= up.in_features:
            continue
        perm = torch.randperm(up.out_features, generator=g)
        permute_pair(up, down, perm)
        try:
            out = model_output(call_model(model, batch)).detach()
            same = out.shape == ref.shape and float((out - ref).abs().max()) <= rtol * scale
        finally:
            permute_pair(up, down, torch.argsort(perm))  # undone: the model is as it was
        if same:
            pairs.append((a, b))
            used |= {a, b}
    return pairs


@torch.no_grad()
def pruned_heads(q, k, v, o, C: torch.Tensor, mean, keep: int, head_dim: int, *, damp: float = 1e-6):
    """An attention layer with its ``keep`` best heads as block-sparse GBLR layers (eval mode, family "heads"),
    from the moments of the output projection's inputs (``C``, ``mean``: the heads' concatenated outputs):
    (query, key, value, output layers, head order).  The kept heads are heads [0, keep): the query, key and
    value layers' block is rows [0, keep x head_dim) x all inputs (their kept rows and biases, unchanged; the
    other heads' rows zero, so they output nothing), the output layer's all outputs x those columns, refitted
    (:func:`refit_kept`) to give the dense attention output."""
    from gblrc.nn.layer import GBLRLinear

    n = _check_heads(q, k, v, o, head_dim)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= n:
        raise ValueError(f"keep must be a whole number of heads in [1, {n}]; got {keep!r}")
    order = group_order(o.weight, C, head_dim)
    feats = group_features(order[:keep], head_dim).to(o.weight.device)
    Wo, bo = refit_kept(o.weight, o.bias, C.to(o.weight.device), mean, feats, damp)
    width, dt = o.in_features, o.weight.dtype
    out = []
    for m in (q, k, v):
        b = None
        if m.bias is not None:
            b = torch.zeros(width, dtype=dt, device=m.weight.device)
            b[: feats.numel()] = m.bias[feats]
        out.append(GBLRLinear.from_tile(m.weight[feats], width, m.in_features, bias=b, family="heads"))
    bias = None if bo is None else bo.to(dt)
    out.append(GBLRLinear.from_tile(Wo.to(dt), o.out_features, width, bias=bias, family="heads"))
    return (*out, order)


@torch.no_grad()
def find_heads(model: nn.Module, names, batch, *, rtol: float = 1e-4) -> list[tuple]:
    """The attention layers among the nn.Linear layers ``names`` of ``model``, found on ``batch``:
    [(query, key, value, output, head_dim)].

    A candidate is three layers fed the same input (in call order) with the same output width w, followed in
    call order by a layer taking w features.  Its head size is the one the module holding the first of them
    declares (``attention_head_size``, ``head_dim``, ``head_size``, or its model config's hidden size over
    ``num_attention_heads``: a permutation test alone cannot tell a head from part of one where attention is
    nearly uniform), accepted only if a cyclic shift of the heads by one (:func:`permute_heads`) leaves the
    model's output unchanged to ``rtol`` of its largest value.  Every permutation is undone.  Which of the
    three is the value projection does not matter (each is permuted and pruned alike)."""
    from gblrc.learn.calib import call_groups
    from gblrc.learn.data import call_model, model_output
    from gblrc.nn.replace import get_module

    groups = call_groups(model, list(names), batch)
    ref = model_output(call_model(model, batch)).detach()
    scale = float(ref.abs().max()) or 1.0
    found = []
    for grp, nxt in zip(groups, groups[1:]):
        if len(grp) != 3 or not nxt:
            continue
        mods = [get_module(model, n) for n in (*grp, nxt[0])]
        if not all(isinstance(m, nn.Linear) for m in mods):
            continue
        w = mods[0].out_features
        if {m.out_features for m in mods[:3]} != {w} or mods[3].in_features != w:
            continue
        for hd in _head_sizes(model, grp[0]):
            if w % hd or w // hd < 2:
                continue
            # a cyclic shift by one: for a size under the true head size it moves features across heads
            # (a random order might keep every piece inside its head: permuting features within a head,
            # the same way in all four layers, keeps the function too)
            perm = torch.roll(torch.arange(w // hd), 1)
            permute_heads(*mods, perm, hd)
            try:
                out = model_output(call_model(model, batch)).detach()
                same = out.shape == ref.shape and float((out - ref).abs().max()) <= rtol * scale
            finally:
                permute_heads(*mods, torch.argsort(perm), hd)
            if same:
                found.append((*grp, nxt[0], hd))
                break
    return found


def _head_sizes(model: nn.Module, name: str) -> list[int]:
    """The head size the attention module above layer ``name`` declares (none found: [])."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        for attr in ("attention_head_size", "head_dim", "head_size"):
            v = getattr(mod, attr, None)
            if isinstance(v, int) and v > 0:
                return [v]
    cfg = getattr(model, "config", None)
    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    return (
        [hidden // heads]
        if isinstance(heads, int) and isinstance(hidden, int) and heads and hidden % heads == 0
        else []
    )
