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

Not yet wired into ``compress``: the allocation across families, the cost charged as a dense product and the
lowering that narrows the intermediate tensor are the rest of issue 28.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["permute_pair", "neuron_scores", "prune_pair", "check_pair", "find_pairs"]


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
    target = a @ down.weight.double().t()  # dense output without the bias (the bias is refitted with it)
    order = torch.argsort(neuron_scores(down, a), descending=True, stable=True)
    permute_pair(up, down, order)
    a = a[:, order]
    has_bias = down.bias is not None
    ak = torch.cat([a[:, :keep], torch.ones_like(a[:, :1])], 1) if has_bias else a[:, :keep]  # (+ b2's column)
    g = ak.t() @ ak
    g += damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    sol = torch.linalg.solve(g, ak.t() @ (target + down.bias.double() if has_bias else target))  # (keep [+ 1], d)
    down.weight.zero_()
    down.weight[:, :keep] = sol[:keep].t().to(down.weight)
    if has_bias:
        down.bias.copy_(sol[keep].to(down.bias))
    up.weight[keep:] = 0
    if up.bias is not None:
        up.bias[keep:] = 0
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
