"""The cost budget: the global lambda controller, the proximal step, and the exact final fit.

Cost of a set of GBLR layers, in one of two units (``compress(budget_unit=...)``):

- ``"flops"``: the sum of their hard multiply-adds (``GBLRLinear.flops``) divided by the sum of their
  dense multiply-adds (a convolution's count per vector times its output positions);
- ``"time"``: the compiler's estimate of each layer as the default ``gblrc lower`` lowers it
  (:func:`gblrc.ir.cost.lowered_estimate`: merged blocks, stacked / sliced / segmented or dense) over
  the estimate of its dense MatMul -- what a layer costs once compiled, not on paper.  A stacked
  lowering pays for whole components whatever their widths; a layer kept dense costs its dense time.

One global lambda drives all layers, so the allocation of the budget across layers is learned
(docs/design.md §1, "Training").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gblrc.ir.cost import DEFAULT_COST_MODEL, CostModel, lowered_estimate
from gblrc.ir.structure import Block, Span, Structure
from gblrc.nn.layer import BlockSparseLinear, GBLRLinear

__all__ = [
    "cost_ratio",
    "LambdaController",
    "proximal_step",
    "fit_to_budget",
    "compact",
    "FlopCost",
    "TimeCost",
    "cost_unit",
]


def _weight(m) -> int:
    """Multiply-adds of one unit of per-vector cost: the output positions of a convolution, else 1."""
    return int(getattr(m, "positions", 1))


class FlopCost:
    """Multiply-adds of the hard structure (per vector x output positions)."""

    name = "flops"

    def layer(self, m) -> float:
        return float(m.flops())

    def dense(self, m) -> float:
        return float(m.dense_flops())


class TimeCost:
    """Estimated seconds of the layer as the default lowering compiles it (linear layers only)."""

    name = "time"

    def __init__(self, model: CostModel = DEFAULT_COST_MODEL):
        self.model = model
        self._memo: dict = {}

    def _check(self, m) -> None:
        if hasattr(m, "positions"):
            raise ValueError(
                "the time budget (budget_unit='time') is for linear layers; this model has "
                "convolutions: use budget_unit='flops'"
            )

    def _estimate(self, m) -> tuple[str, float]:
        """(lowering, estimated seconds) of ``m``'s hard structure, remembered per structure."""
        self._check(m)
        key = (m.hard_structure(), m.bias is not None)
        est = self._memo.get(key)
        if est is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            est = self._memo[key] = lowered_estimate(key[0], key[1], self.model)
        return est

    def layer(self, m) -> float:
        return self._estimate(m)[1]

    def dense(self, m) -> float:
        self._check(m)
        return self.dense_shape(m.in_features, m.out_features, m.bias is not None)

    def lowrank(self, n_in: int, n_out: int, rank: int, bias: bool) -> float:
        """Estimated seconds of a full-width rank-``rank`` layer (in -> out) as lowered."""
        full = Structure(n_in, n_out, (Block((Span(0, n_out),), (Span(0, n_in),), int(rank)),) if rank > 0 else ())
        return lowered_estimate(full, bias, self.model)[1]

    def dense_shape(self, n_in: int, n_out: int, bias: bool) -> float:
        """Estimated seconds of the dense layer (in -> out)."""
        return self.model.dense(Structure(n_in, n_out, ()), bias)

    def strategy(self, m) -> str:
        """The lowering the estimate assumes for ``m`` (stacked, sliced, segmented or dense)."""
        return self._estimate(m)[0]


FLOPS = FlopCost()


def cost_unit(unit) -> FlopCost | TimeCost:
    """A cost unit from its name ("flops", "time") or itself."""
    if isinstance(unit, (FlopCost, TimeCost)):
        return unit
    if unit == "flops":
        return FLOPS
    if unit == "time":
        return TimeCost()
    raise ValueError(f"budget_unit must be 'flops' or 'time', got {unit!r}")


def cost_ratio(layers, unit=FLOPS) -> float:
    """Total cost of ``layers`` over their total dense cost, in ``unit``."""
    layers, unit = list(layers), cost_unit(unit)
    return sum(unit.layer(m) for m in layers) / max(1e-30, sum(unit.dense(m) for m in layers))


class LambdaController:
    """lambda rises (x``growth`` per step from ``lam0``) while the cost is above the reference, else 0.

    The reference descends linearly from the initial cost ratio to the budget over the first
    ``reach`` steps, then stays at the budget, so the layers shrink gradually while they learn.
    """

    def __init__(self, budget: float, start_ratio: float, reach: int, lam0: float, growth: float = 1.15):
        self.budget, self.start, self.reach = float(budget), float(start_ratio), max(1, int(reach))
        self.lam0, self.growth, self.lam = float(lam0), float(growth), 0.0

    def reference(self, step: int) -> float:
        t = min(1.0, step / self.reach)
        return self.start + (self.budget - self.start) * t

    def update(self, step: int, ratio: float) -> float:
        if ratio > self.reference(step):
            self.lam = self.lam0 if self.lam <= 0 else self.lam * self.growth
        else:
            self.lam = 0.0
        return self.lam

    def state_dict(self) -> dict:
        return {"lam": self.lam, "start": self.start}

    def load_state_dict(self, d: dict) -> None:
        self.lam, self.start = float(d["lam"]), float(d["start"])


@torch.no_grad()
def proximal_step(layers, shrink: float) -> None:
    """w <- clamp(softshrink(w, shrink), 0, 1); l <- l - floor(l) on every layer whose structure is learned
    (block-sparse layers are left as they are)."""
    for m in layers:
        if m.family != "gblr":
            continue
        w = m.widths
        w.copy_(F.softshrink(w, shrink).clamp_(0.0, 1.0) if shrink > 0 else w.clamp(0.0, 1.0))
        m.locations.sub_(torch.floor(m.locations))


@torch.no_grad()
def _components(layers):
    """[(layer index, component, usefulness, cost, wc, wr)] of the live components (hard form).

    usefulness = (||masked U_k V_k||_F / ||W_layer||_F)^2 / cost_k: relative energy per multiply-add.
    Block-sparse layers (``family`` other than "gblr": their structure is fixed) have none.
    cost_k counts the layer's real multiply-adds (per-vector cost x output positions for convolutions).
    """
    out = []
    for li, m in enumerate(layers):
        if m.family != "gblr":  # a block-sparse layer's structure is fixed: nothing of it is trimmed
            continue
        mc, mr = m.masks() if not m.training else (None, None)
        if mc is None:
            raise RuntimeError("fit_to_budget needs layers in eval mode")
        U = m.U * mr[:, :, None]  # (K, out, r)
        V = m.V * mc[:, None, :]  # (K, r, in)
        gram = (U.transpose(1, 2) @ U) * (V @ V.transpose(1, 2))  # (K, r, r): ||U_k V_k||^2 = sum
        energy = gram.sum((1, 2)).clamp_min(0).double()
        total = float(energy.sum()) + 1e-30
        wc, _, wr, _ = m.hard_intervals()
        r, P = m.rank_per_component, _weight(m)
        for k in range(m.num_components):
            if wc[k] > 0 and wr[k] > 0:
                c = r * P * int(wc[k] + wr[k])
                out.append((li, k, float(energy[k]) / total / c, c, int(wc[k]), int(wr[k])))
    return out


@torch.no_grad()
def fit_to_budget(layers, budget: float, unit=FLOPS) -> float:
    """Make the total hard cost <= floor(budget x dense) and close to it; returns the new cost ratio.

    Over budget: remove the least useful components (smallest usefulness, see ``_components``); the
    last one is narrowed instead when removing it would undershoot.  Far under budget (more than one
    percent): widen the most useful components (their masked-out factor entries come back).
    Layers must be in eval mode (hard structure).  ``unit="time"``: see :func:`_fit_time`.
    """
    everything, unit = list(layers), cost_unit(unit)
    layers = [m for m in everything if m.family == "gblr"]  # block-sparse layers: their cost counts, fixed
    if unit is not FLOPS:
        return _fit_time(everything, budget, unit)
    dense = sum(m.dense_flops() for m in everything)
    limit = math.floor(budget * dense + 1e-9)
    # the fixed layers' cost as they run, the others' as the sum the trimming subtracts from (an upper bound
    # of their cost as they run: a component merged into a full-rank block costs less)
    cost = sum(m.flops() for m in everything if m.family != "gblr") + sum(m.product_flops() for m in layers)
    if cost > limit:
        for li, k, _, c, wc, wr in sorted(_components(layers), key=lambda t: t[2]):
            excess = cost - limit
            if excess <= 0:
                break
            m = layers[li]
            r, t = m.rank_per_component * _weight(m), m.tile
            side, width = (0, wc) if wc >= wr else (1, wr)
            cut = -(-excess // r)
            if t > 1:  # keep widths on the tile grid: cut whole tiles (a partial last tile goes first)
                cut = width - (width - cut) // t * t
            if c - excess > 0.5 * c and cut < width:  # narrowing keeps most of it: narrow this one
                n = m.in_features if side == 0 else m.out_features
                m.widths[side, k] = (width - cut) / n
                cost -= cut * r
            else:
                m.widths[:, k] = 0.0
                cost -= c
    elif cost < limit - 0.01 * dense and layers:
        smallest = min(m.rank_per_component * _weight(m) for m in layers)  # the cheapest possible widening
        for li, k, _, c, wc, wr in sorted(_components(layers), key=lambda t: -t[2]):
            m = layers[li]
            r, t = m.rank_per_component * _weight(m), m.tile
            for side, width, n in ((0, wc, m.in_features), (1, wr, m.out_features)):
                add = min(n - width, (limit - cost) // r)
                if t > 1 and width + add < n:  # stay on the tile grid
                    add = (width + add) // t * t - width
                if add > 0:
                    m.widths[side, k] = (width + add) / n
                    cost += add * r
            if cost >= limit - smallest:
                break
    return cost_ratio(everything)


@torch.no_grad()
def _fit_time(layers, budget: float, unit: TimeCost) -> float:
    """Make the total estimated time <= budget x the dense time, removing whole components.

    A move removes a layer's weakest live components (smallest energy share) -- as few as make its
    estimate drop; more than one where the layer is kept dense until it crosses the lowering's margin --
    and the move with the least energy removed per second saved is made first.  Then removed
    components come back, most useful first, while the total stays within the budget.  Widths are left
    as trained: under a stacked lowering narrowing a component saves no time.
    """
    limit = budget * sum(unit.dense(m) for m in layers)
    share: dict[tuple[int, int], float] = {}
    for li, k, use, c, _, _ in _components(layers):
        share[(li, k)] = use * c
    times = [unit.layer(m) for m in layers]
    removed: list[tuple[int, int, torch.Tensor]] = []  # (layer, component, its widths), in removal order

    def weakest(li):
        return sorted(
            (k for (l, k) in share if l == li and float(layers[li].widths[:, k].min()) > 0),
            key=lambda k: share[(li, k)],
        )

    def move(li):
        """(energy removed per second saved, components, new time) of the layer's cheapest drop, or None."""
        m, order = layers[li], weakest(li)
        saved = m.widths.clone()
        try:
            for j in range(1, len(order) + 1):
                m.widths[:, order[j - 1]] = 0.0
                t = unit.layer(m)
                if t < times[li] - 1e-15:
                    e = sum(share[(li, k)] for k in order[:j])
                    return e / (times[li] - t), order[:j], t
            return None
        finally:
            m.widths.copy_(saved)

    moves = {li: move(li) for li in range(len(layers))}
    while sum(times) > limit * (1 + 1e-9):
        cands = [(mv[0], li) for li, mv in moves.items() if mv is not None]
        if not cands:
            break
        _, li = min(cands)
        _, ks, t = moves[li]
        for k in ks:
            removed.append((li, k, layers[li].widths[:, k].clone()))
            layers[li].widths[:, k] = 0.0
        times[li] = t
        moves[li] = move(li)
    for li, k, w in sorted(removed, key=lambda r: -share[(r[0], r[1])]):  # give back what still fits
        layers[li].widths[:, k] = w
        t = unit.layer(layers[li])
        if sum(times) - times[li] + t <= limit:
            times[li] = t
        else:
            layers[li].widths[:, k] = 0.0
    return cost_ratio(layers, unit)


@torch.no_grad()
def compact(layer: GBLRLinear) -> GBLRLinear:
    """A copy of ``layer`` (eval mode) with only its live components (zero widths dropped); a block-sparse layer
    (one block, nothing to drop) as it is."""
    if isinstance(layer, BlockSparseLinear):
        return layer.eval()
    wc, lc, wr, lr = layer.hard_intervals()
    live = ((wc > 0) & (wr > 0)).nonzero().flatten()
    keep = live if live.numel() else torch.zeros(1, dtype=torch.long)
    p = layer.U
    if hasattr(layer, "new_like"):  # GBLRConv2d: same geometry and recorded positions
        new = layer.new_like(num_components=int(keep.numel()))
    else:
        new = GBLRLinear(
            layer.in_features,
            layer.out_features,
            num_components=int(keep.numel()),
            rank_per_component=layer.rank_per_component,
            bias=layer.bias is not None,
            device=p.device,
            dtype=p.dtype,
        )
    new.U.copy_(layer.U[keep])
    new.V.copy_(layer.V[keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    if live.numel():
        new.set_intervals(wc[keep].tolist(), lc[keep].tolist(), wr[keep].tolist(), lr[keep].tolist())
    else:
        new.set_intervals([0], [0], [0], [0])
    new.sigma.copy_(layer.sigma)
    new.tile, new.family = layer.tile, layer.family
    return new.eval()
