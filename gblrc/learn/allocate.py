"""Sensitivity-based allocation of the budget across layers (before initialisation).

A uniform budget gives every layer the same fraction of its dense cost, although layers differ widely in
how much their truncation hurts the model's output.  Here each layer's sensitivity curve is *measured*:
for a few ratios g, the layer alone is replaced by its truncation at cost g (the data-aware truncated SVD
of :mod:`gblrc.learn.calib`, everything else dense) and the relative MSE of the output of the layer's
*block* (a transformer layer; the layer itself outside a ModuleList) against the dense block's output is
recorded on the block's cached inputs of a calibration batch (one block-sequential pass: O(L) block
calls; the model's output after every truncation cost O(L^2), docs/design.md §5); between and beyond
those points the loss is interpolated through the truncation's tail energy (log-log), which the SVD gives
for every rank.  The per-layer budgets then minimise the sum of the measured losses under the total cost
(Lagrangian relaxation: one multiplier mu, each layer picks the grid point minimising loss + mu * cost,
mu bisected to the largest total cost within budget; the losses are first made non-increasing in g so
noise cannot buy a worse point at a higher cost).

Only linear layers (nn.Linear, HF Conv1D) are allocated; a model with convolutions keeps the uniform
budget (:func:`allocate_budgets` returns None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gblrc.learn.calib import layer_rows
from gblrc.learn.blocks import BlockInputs, CacheOff, Placement, block_output, layer_blocks
from gblrc.learn.data import call_model, model_output
from gblrc.nn.fit import svd_rank_for_budget
from gblrc.nn.fit_data import whitened_decomposition
from gblrc.learn.objective import _mask_for, rel_mse
from gblrc.nn.replace import get_module, is_linear

__all__ = [
    "sensitivity_curves",
    "family_curves",
    "solve_allocation",
    "choose_points",
    "allocate_budgets",
    "allocate_families",
    "Unit",
    "uniform_time_ratios",
    "GRID",
]

GRID = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0: the ratios a layer may get
MEASURE = (0.1, 0.25, 0.45, 0.7)  # the ratios whose effect on the output is measured


def _cost(n_in: int, n_out: int, g: float, r: int) -> int:
    """Multiply-adds of the truncated SVD at ratio g (whole components of rank r)."""
    return svd_rank_for_budget(n_in, n_out, g, r) * r * (n_in + n_out)


@torch.no_grad()
def _truncation_error(U, S, Vh, L, k: int) -> torch.Tensor:
    """W - W_k with W_k the rank-k truncation in the metric: U_tail S_tail Vh_tail L^-1."""
    k = min(k, S.numel())
    return U[:, k:] @ torch.linalg.solve_triangular(L, Vh[k:] * S[k:, None], upper=False, left=False)


def _interpolate(tails, measured) -> list[float]:
    """Loss at each tail energy of ``tails``, piecewise linear in log-log through ``measured``
    [(tail energy, loss)], extrapolated with the end slopes (loss 0 where the tail is 0)."""
    pts = sorted((math.log(max(t, 1e-300)), math.log(max(l, 1e-300))) for t, l in measured if t > 0)
    out = []
    for t in tails:
        if t <= 0 or not pts:
            out.append(0.0)
            continue
        x = math.log(t)
        if len(pts) == 1:
            out.append(math.exp(pts[0][1] + x - pts[0][0]))  # loss proportional to the tail energy
            continue
        i = 1
        while i < len(pts) - 1 and x > pts[i][0]:
            i += 1
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 1.0
        out.append(math.exp(y0 + slope * (x - x0)))
    return out


@torch.no_grad()
def sensitivity_curves(
    model,
    names,
    covs: dict,
    batches,
    *,
    grid=GRID,
    measure=MEASURE,
    rank_per_component: int = 1,
    progress: bool = False,
    placement=None,
) -> dict[str, list[tuple[int, float]]]:
    """{name: [(cost of the truncation at g, relative MSE of its block's output), ...] for g in grid}: the
    low-rank curves of :func:`family_curves`, no pairs."""
    return family_curves(
        model,
        names,
        covs,
        batches,
        grid=grid,
        measure=measure,
        rank_per_component=rank_per_component,
        progress=progress,
        placement=placement,
    )[0]


@torch.no_grad()
def family_curves(
    model,
    names,
    covs: dict,
    batches,
    *,
    units=(),
    grid=GRID,
    measure=MEASURE,
    rank_per_component: int = 1,
    progress: bool = False,
    placement=None,
) -> tuple[dict[str, list[tuple[int, float]]], dict[tuple, list[tuple[int, float, int]]]]:
    """{name: [(cost of the truncation at g, relative MSE of its block's output), ...] for g in grid}.

    The loss is measured at the ratios ``measure`` (the layer's block run on its cached dense inputs on
    ``batches`` with only this layer truncated, against the dense block's output) and interpolated to
    ``grid`` through the truncation's tail energy in the metric, which the SVD gives exactly.  Each block's
    inputs are computed once (:class:`gblrc.learn.blocks.BlockInputs`), so the pass costs O(L) block calls.
    ``model`` is the dense model (unchanged on return); ``covs`` the layers' input covariances.
    ``placement``: a :class:`gblrc.learn.blocks.Placement` (offload: each block on the device in turn).
    """
    curves, unit_curves = {}, {}
    bar = None
    if progress:
        from gblrc.learn.progress import progress_bar

        bar = progress_bar(len(names) + len(units), "gblrc sensitivity")
    r = rank_per_component
    p = placement or Placement("cpu")
    blocks = BlockInputs(model, batches, p)
    try:
        with CacheOff(model):
            members = layer_blocks(model, names)
            for block in dict.fromkeys(members.values()):
                inside = [n for n, b in members.items() if b == block]
                if blocks.chained(block):  # a transformer layer: its output on its cached dense inputs
                    bmod = model.get_submodule(block)
                    ins = p.fetch(blocks.inputs(block))
                    outs = p.fetch(blocks.outputs(block))

                    def run(i, bmod=bmod, ins=ins):
                        return block_output(bmod(*ins[i][0], **ins[i][1]))

                else:  # a layer outside a chain (a head, a pooler, a small model's layer): the model's output
                    bmod = None  # (the model where it rests)
                    outs = [model_output(call_model(model, x)).detach() for x in batches]

                    def run(i):
                        return model_output(call_model(model, batches[i]))

                at = p.fetch(batches) if bmod is not None else batches  # the batches where ``outs`` are
                masks = [_mask_for(x, t) for x, t in zip(at, outs)]
                with p.on_device(bmod):
                    for name in inside:
                        cov = p.fetch(covs[name]) if bmod is not None else covs[name]
                        curves[name] = _layer_curve(get_module(model, name), cov, run, outs, masks, grid, measure, r)
                        if bar is not None:
                            bar.update(1)
                    for unit in units:
                        last = unit.layers[-1]
                        if last not in inside or bmod is None:  # units inside a chain's block only
                            continue
                        cov, mean = p.fetch(covs[last]), p.fetch(covs.mean(last))
                        mods = [get_module(model, n) for n in unit.layers]
                        unit_curves[unit] = _kept_curve(mods, unit.group, cov, mean, run, outs, masks, grid, measure)
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {n: curves[n] for n in names}, unit_curves


@torch.no_grad()
def _layer_curve(mod, cov, run, outs, masks, grid, measure, r) -> list[tuple[int, float]]:
    """One layer's (cost, loss) curve over ``grid``: the relative MSE of ``run(i)`` (the output the loss is
    taken on, for batch i) against the dense ``outs`` at the ratios ``measure``, interpolated through the
    tail energy."""
    from gblrc.nn.replace import as_linear

    W = as_linear(mod).weight.detach()
    n_out, n_in = W.shape
    U, S, Vh, L = whitened_decomposition(W, cov)
    energy = (S * S).flip(0).cumsum(0).flip(0).tolist() + [0.0]  # energy[k] = sum_{i >= k} S_i^2

    def tail(g):
        return energy[min(svd_rank_for_budget(n_in, n_out, g, r) * r, S.numel())]

    state = {}

    def hook(_m, inp, out):
        x = layer_rows(_m, inp[0])
        return out - (x @ state["E"].t()).to(out.dtype).reshape(out.shape)

    h = mod.register_forward_hook(hook)
    try:
        measured = []
        for g in measure:
            k = svd_rank_for_budget(n_in, n_out, g, r) * r
            state["E"] = _truncation_error(U, S, Vh, L, k)
            loss = sum(float(rel_mse(run(i), t, m)) for i, (t, m) in enumerate(zip(outs, masks))) / len(outs)
            measured.append((tail(g), loss))
    finally:
        h.remove()
    losses = _interpolate([tail(g) for g in grid], measured)
    return [(_cost(n_in, n_out, g, r), l) for g, l in zip(grid, losses)]


@dataclass(frozen=True)
class Unit:
    """Layers that the block-sparse family prunes together: ``layers`` = the producers then the consumer (an FFN
    pair's up and down layers; an attention layer's query, key, value and output projections), ``group`` the
    consumer's input features kept or dropped together (1 neuron; a head's size), ``family`` the name the
    layers get ("neurons", "heads")."""

    layers: tuple[str, ...]
    group: int = 1
    family: str = "neurons"


def _keep(g: float, n: int) -> int:
    """Groups (neurons, heads) of ``n`` a unit keeps at cost ratio g (its cost is linear in them)."""
    return max(1, min(n, int(g * n + 1e-9)))


@torch.no_grad()
def _kept_curve(mods, group, cov, mean, run, outs, masks, grid, measure) -> list[tuple[int, float, int]]:
    """A unit's block-sparse curve over ``grid``: (cost, loss, groups kept) with the consumer (``mods[-1]``)
    reading only the best ``g`` x n groups of its inputs (by ||W[:, j]||^2 E[a_j^2] summed per group), refitted
    (:func:`gblrc.nn.fit_data.refit_kept`) -- its output replaced by the refit's on the kept inputs -- the
    loss measured at ``measure`` and interpolated through the dropped groups' score (their share of the
    output energy) as :func:`_layer_curve` does.  Each kept group costs ``group`` x (the producers' inputs +
    the consumer's outputs) multiply-adds: the producers' kept rows and the consumer's kept columns."""
    from gblrc.learn.neurons import group_features, neuron_order
    from gblrc.nn.fit_data import refit_kept

    down = mods[-1]
    W, b = down.weight.detach(), down.bias
    n = W.shape[1] // group
    scores = neuron_order(W, cov)[1].reshape(n, group).sum(1)
    order = torch.argsort(scores, descending=True, stable=True)
    tail = scores[order].flip(0).cumsum(0).flip(0).tolist() + [0.0]  # tail[k]: the scores of groups k, k+1, ..
    state = {}

    def hook(_m, inp, out):
        x = inp[0].double()
        return (x[..., state["kept"]] @ state["W"].t() + state["b"]).to(out.dtype)

    def feats(k):
        return group_features(order[:k], group).to(W.device)

    h = down.register_forward_hook(hook)
    try:
        measured = []
        for g in measure:
            k = _keep(g, n)
            Wk, bk = refit_kept(W, b, cov, mean, feats(k))
            state.update(kept=feats(k), W=Wk, b=0.0 if bk is None else bk)
            loss = sum(float(rel_mse(run(i), t, m)) for i, (t, m) in enumerate(zip(outs, masks))) / len(outs)
            measured.append((tail[k], loss))
    finally:
        h.remove()
    losses = _interpolate([tail[_keep(g, n)] for g in grid], measured)
    side = sum(m.in_features for m in mods[:-1]) + down.out_features
    return [(_keep(g, n) * group * side, l, _keep(g, n)) for g, l in zip(grid, losses)]


def _combined(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float, tuple[int, ...]]]:
    """The low-rank option of a unit: every choice of one point per layer curve, costs and losses added, kept
    only where no other choice is as cheap and loses less (the Pareto front, built a layer at a time)."""
    front = [(0, 0.0, ())]
    for c in curves:
        pts = sorted(((fc + cc, fl + cl, fi + (i,)) for fc, fl, fi in front for i, (cc, cl) in enumerate(c)))
        front, best = [], float("inf")
        for p in pts:
            if p[1] < best:
                front.append(p)
                best = p[1]
    return front


def solve_allocation(curves: dict, dense_costs: dict, budget: float) -> dict[str, float]:
    """{name: cost ratio} minimising the summed losses with sum(cost) <= budget * sum(dense cost).

    ``curves``: {name: [(cost, loss), ...]} (costs increasing); ``dense_costs``: {name: dense cost}.
    Each layer's chosen ratio is its chosen cost / dense cost (>= the smallest point of its curve).
    """
    pick = choose_points(curves, dense_costs, budget)
    return {n: min(1.0, (curves[n][i][0] + 0.5) / dense_costs[n]) for n, i in pick.items()}  # +0.5: floor() keeps it


def choose_points(curves: dict, dense_costs: dict, budget: float) -> dict[str, int]:
    """{name: index of the chosen point of its curve}: the solution of :func:`solve_allocation`.

    ``curves``: {name: [(cost, loss), ...]} (costs non-decreasing).  Of points of equal cost the one
    with the smallest loss is taken (with a time cost, many ratios can cost the same)."""
    cap = budget * sum(dense_costs.values())
    pts = {}
    for n, c in curves.items():
        best, mono = float("inf"), []
        for i, (cost, loss) in enumerate(c):  # non-increasing envelope: a higher cost never has a higher loss
            best = min(best, loss)
            mono.append((cost, best, i))
        pts[n] = mono

    def pick(mu):
        return {n: min(p, key=lambda cl: (cl[1] + mu * cl[0], cl[0], -cl[2])) for n, p in pts.items()}

    def total(choice):
        return sum(c for c, _, _ in choice.values())

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > cap and hi < 1e30:
        hi *= 10.0
    if total(pick(hi)) > cap:
        raise ValueError(f"budget {budget} is below the smallest allocatable cost; raise the budget")
    if total(pick(lo)) <= cap:
        hi = lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if total(pick(mid)) > cap:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    # spend what is left greedily: the next grid point with the best loss drop per cost that still fits
    spent = total(choice)
    while True:
        best = None
        for n, (c, l, _) in choice.items():
            for c2, l2, i2 in pts[n]:
                if c2 > c and spent - c + c2 <= cap and l2 < l:
                    gain = (l - l2) / (c2 - c)
                    if best is None or gain > best[0]:
                        best = (gain, n, (c2, l2, i2))
        if best is None:
            break
        _, n, new = best
        spent += new[0] - choice[n][0]
        choice[n] = new
    return {n: choice[n][2] for n in choice}


def _linears(model, names, covs, batches) -> dict | None:
    """{name: module} when every layer is linear with a covariance and there are batches; else None (the
    allocation does not apply)."""
    mods = {n: get_module(model, n) for n in names}
    if not all(is_linear(m) for m in mods.values()) or any(n not in covs for n in names) or not batches:
        return None
    return mods


def allocate_budgets(
    model,
    names,
    covs: dict,
    batches,
    budget: float,
    *,
    rank_per_component: int = 1,
    grid=GRID,
    measure=MEASURE,
    progress: bool = False,
    unit=None,
    placement=None,
) -> dict[str, float] | None:
    """Per-layer FLOP ratios from measured sensitivities (module docstring), or None when not applicable.

    ``unit``: a :class:`gblrc.learn.budget.TimeCost` to spend ``budget`` x the layers' estimated dense
    time (each grid point costing its low-rank layer's estimated time, as lowered); None: multiply-adds."""
    kw = dict(rank_per_component=rank_per_component, grid=grid, measure=measure, progress=progress)
    if unit is None:  # (the families' allocation with no units)
        alloc = allocate_families(model, names, (), covs, batches, budget, placement=placement, **kw)
        return None if alloc is None else alloc[0]
    mods = _linears(model, names, covs, batches)
    if mods is None:
        return None
    from gblrc.nn.replace import as_linear

    curves = sensitivity_curves(model, names, covs, batches, placement=placement, **kw)
    dense = {n: as_linear(m).weight.shape[0] * as_linear(m).weight.shape[1] for n, m in mods.items()}
    shapes = {
        n: (as_linear(m).weight.shape[1], as_linear(m).weight.shape[0], as_linear(m).bias is not None)
        for n, m in mods.items()
    }
    timed = {}
    for n in curves:
        n_in, n_out, bias = shapes[n]
        timed[n] = [(unit.lowrank(n_in, n_out, c // (n_in + n_out), bias), l) for c, l in curves[n]]
    pick = choose_points(timed, {n: unit.dense_shape(*shapes[n]) for n in curves}, budget)
    return {n: min(1.0, (curves[n][i][0] + 0.5) / dense[n]) for n, i in pick.items()}


def allocate_families(
    model,
    names,
    units,
    covs,
    batches,
    budget: float,
    *,
    rank_per_component: int = 1,
    grid=GRID,
    measure=MEASURE,
    progress: bool = False,
    placement=None,
) -> tuple[dict[str, float], dict[Unit, int]] | None:
    """The allocation across layers *and* structure families (docs/design.md §1, "Block-sparse by neurons"):
    ({name: low-rank FLOP ratio}, {unit: groups kept}), or None when not applicable (as
    :func:`allocate_budgets`).

    Each :class:`Unit` (an FFN pair, an attention layer's four projections) is one unit of the allocation whose
    points are its block-sparse curve (:func:`_kept_curve`) and the Pareto front of its layers' low-rank
    points taken together (:func:`_combined`); every other layer is a unit of its low-rank curve.  One
    multiplier prices every unit's cost (:func:`choose_points`), so a unit is made block-sparse only where that
    loses less at its cost than low rank of its layers.  ``covs`` must give the inputs' means
    (:class:`gblrc.learn.calib.BlockCovariances`)."""
    mods = _linears(model, names, covs, batches)
    if mods is None:
        return None
    from gblrc.nn.replace import as_linear

    curves, ucurves = family_curves(
        model,
        names,
        covs,
        batches,
        units=list(units),
        grid=grid,
        measure=measure,
        rank_per_component=rank_per_component,
        progress=progress,
        placement=placement,
    )
    dense = {n: as_linear(m).weight.shape[0] * as_linear(m).weight.shape[1] for n, m in mods.items()}
    in_unit = {n for u in ucurves for n in u.layers}
    points = {n: c for n, c in curves.items() if n not in in_unit}
    unit_dense = {n: dense[n] for n in points}
    options = {}  # unit -> its points' meanings, in order: ("kept", groups) | ("lowrank", (i per layer))
    for u, uc in ucurves.items():
        pts = [(c, l, ("kept", k)) for c, l, k in uc]
        pts += [(c, l, ("lowrank", idx)) for c, l, idx in _combined([curves[n] for n in u.layers])]
        pts.sort(key=lambda t: t[0])  # choose_points wants costs non-decreasing
        points[u] = [(c, l) for c, l, _ in pts]
        options[u] = [o for _, _, o in pts]
        unit_dense[u] = sum(dense[n] for n in u.layers)
    pick = choose_points(points, unit_dense, budget)
    ratios, keeps = {}, {}

    def ratio(n, i):
        return min(1.0, (curves[n][i][0] + 0.5) / dense[n])

    for key, i in pick.items():
        if key not in options:
            ratios[key] = ratio(key, i)
        elif options[key][i][0] == "kept":
            keeps[key] = options[key][i][1]
        else:
            ratios.update({n: ratio(n, j) for n, j in zip(key.layers, options[key][i][1])})
    return ratios, keeps


def uniform_time_ratios(shapes: dict, budget: float, unit, rank_per_component: int = 1) -> dict[str, float]:
    """{name: FLOP ratio} of the largest low rank (whole components) whose estimated time as lowered is
    <= budget x its dense time, for {name: (in, out, bias)}: the uniform allocation of a time budget.
    A layer that cannot get under it keeps one component (a warning is the caller's)."""
    out = {}
    r = rank_per_component
    for n, (n_in, n_out, bias) in shapes.items():
        cap, k = budget * unit.dense_shape(n_in, n_out, bias), r
        hi = (n_in * n_out) // (r * (n_in + n_out)) * r
        while k + r <= hi and unit.lowrank(n_in, n_out, k + r, bias) <= cap:
            k += r
        out[n] = min(1.0, (k * (n_in + n_out) + 0.5) / (n_in * n_out))
    return out
