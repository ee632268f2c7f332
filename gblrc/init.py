"""Initialisation of GBLR layers from dense weights (DESIGN.md §1, "Initialisation").

``fit_dense`` runs a greedy block pursuit (:mod:`gblrc.init_pursuit`) over tiled candidate blocks at
several scales (wrap-around included), twice: from scratch, and seeded with the truncated-SVD rank
(spending only the budget SVD leaves over).  Both are refitted jointly with the structure fixed, and
the best of them and plain truncated SVD is returned, so the result's relative Frobenius error is never
larger than truncated SVD's at the same cost.  Cost is counted exactly like ``GBLRLinear.flops()``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .init_pursuit import pursuit
from .layer import GBLRLinear

__all__ = ["fit_dense", "svd_rank_for_budget", "svd_layer", "relative_error", "check_budget"]


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1]; ValueError otherwise (NaN included)."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < b <= 1.0):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return b


def svd_rank_for_budget(n_in: int, n_out: int, budget: float, rank_per_component: int = 1) -> int:
    """Largest number of full-width components whose cost is <= budget * n_in * n_out.

    Integer arithmetic on the cap floor(budget * n_in * n_out), so the cost never exceeds the budget
    (a tolerance here once let a budget just under 1 round up past it).
    """
    cap = int(math.floor(float(budget) * n_in * n_out))
    return max(0, cap // (int(rank_per_component) * (n_in + n_out)))


def relative_error(W: np.ndarray, W_hat: np.ndarray) -> float:
    return float(np.linalg.norm(W - W_hat) / max(np.linalg.norm(W), 1e-30))


def _weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    W = linear.weight.detach()
    if not torch.isfinite(W).all():
        raise ValueError("the dense weight contains NaN or Inf")
    return W, (None if linear.bias is None else linear.bias.detach())


def svd_layer(linear: nn.Linear, budget: float, *, rank_per_component: int = 1) -> GBLRLinear:
    """Truncated SVD at the budget, as a GBLR layer of full-width components."""
    budget = check_budget(budget)
    W, b = _weight_and_bias(linear)
    n_out, n_in = W.shape
    r = rank_per_component
    K = svd_rank_for_budget(n_in, n_out, budget, r)
    layer = GBLRLinear(n_in, n_out, num_components=max(K, 1), rank_per_component=r,
                       bias=b is not None, dtype=W.dtype, device=W.device)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    with torch.no_grad():
        layer.U.zero_(); layer.V.zero_()
        k = min(K * r, S.numel())
        s = S[:k].sqrt()
        Us = (U[:, :k] * s).T.reshape(-1, r, n_out)  # (k/r, r, out)
        Vs = (Vh[:k] * s[:, None]).reshape(-1, r, n_in)
        m = Us.shape[0]
        layer.U[:m].copy_(Us.transpose(1, 2).to(W.dtype))
        layer.V[:m].copy_(Vs.to(W.dtype))
        if K == 0:
            layer.set_intervals([0], [0], [0], [0])
        else:
            layer.set_intervals([n_in] * K, [0] * K, [n_out] * K, [0] * K)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def _layer_from_families(fams, n_in, n_out, r, bias, dtype, device) -> GBLRLinear:
    """A GBLRLinear with one component per allocated rank-r group of every tile of every family."""
    comps = []  # (row start, row len, col start, col len, U (a, r), V (r, b))
    for f in fams:
        L, Rt = f.factors
        for i, (rs, a) in enumerate(f.rows):
            for j, (cs, bl) in enumerate(f.cols):
                for c in range(int(f.alloc[i, j])):
                    sl = slice(c * r, (c + 1) * r)
                    comps.append((rs, a, cs, bl, L[i, j, :a, sl], Rt[i, j, sl, :bl]))
    K = max(len(comps), 1)
    layer = GBLRLinear(n_in, n_out, num_components=K, rank_per_component=r, bias=bias is not None,
                       dtype=dtype, device=device)
    with torch.no_grad():
        layer.U.zero_(); layer.V.zero_()
        if not comps:
            layer.set_intervals([0], [0], [0], [0])
        for k, (rs, a, cs, bl, u, v) in enumerate(comps):
            ri = (rs + torch.arange(a, device=device)) % n_out
            ci = (cs + torch.arange(bl, device=device)) % n_in
            layer.U[k, ri, :] = u.to(dtype)
            layer.V[k, :, ci] = v.to(dtype)
        if comps:
            layer.set_intervals([c[3] for c in comps], [c[2] for c in comps],
                                [c[1] for c in comps], [c[0] for c in comps])
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


_OPTIONS = {"method": "gblr", "scales": (1, 2, 4), "shift": True, "rounds": 8, "sweeps": 2, "threads": 1}


def fit_dense(linear: nn.Linear, budget: float, *, rank_per_component: int = 1, **kwargs) -> GBLRLinear:
    """Fit a GBLR layer to a dense Linear under ``budget`` (fraction of dense multiply-adds).

    Returns an eval-mode GBLRLinear with ``flops() <= budget * dense`` whose relative Frobenius error
    is at most truncated SVD's at the same budget.  Options (keywords): ``method`` "gblr" (default,
    block pursuit) or "svd" (truncated SVD only); ``scales`` tile counts per axis (default (1, 2, 4);
    the SVD-seeded run, which only spends SVD's leftover budget, adds twice the largest);
    ``shift`` also try half-tile shifted tilings (wrap-around blocks, default True); ``rounds`` greedy
    budget chunks (default 8); ``sweeps`` joint refits with the structure fixed (default 2);
    ``threads`` torch intra-op threads during the fit (default 1: the pursuit runs thousands of small
    operations, and on a busy 2-core machine two threads measured many times slower than one;
    None keeps the caller's setting).  The caller's thread count is restored afterwards.
    """
    budget = check_budget(budget)
    unknown = set(kwargs) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"fit_dense got unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    opt = {**_OPTIONS, **kwargs}
    if opt["method"] not in ("gblr", "svd"):
        raise ValueError(f"method must be 'gblr' or 'svd', got {opt['method']!r}")
    r = int(rank_per_component)
    if r < 1:
        raise ValueError(f"rank_per_component must be >= 1, got {rank_per_component}")
    if opt["method"] == "svd":
        return svd_layer(linear, budget, rank_per_component=r).eval()
    threads = torch.get_num_threads()
    if opt["threads"] is not None:
        torch.set_num_threads(max(1, int(opt["threads"])))
    try:
        return _fit(linear, budget, r, opt)
    finally:
        torch.set_num_threads(threads)


def _fit(linear, budget, r, opt) -> GBLRLinear:
    best = svd_layer(linear, budget, rank_per_component=r).eval()
    W, b = _weight_and_bias(linear)
    n_out, n_in = W.shape
    cap = int(math.floor(budget * n_in * n_out))
    W64 = W.double()
    with torch.no_grad():
        best_err = float(torch.linalg.matrix_norm(best.dense_weight().double() - W64))
        seed = svd_rank_for_budget(n_in, n_out, budget, r)
        scales = tuple(sorted({1, *(int(s) for s in opt["scales"])}))
        if scales[0] < 1:
            raise ValueError(f"scales must be positive tile counts, got {opt['scales']}")
        for seed_rank in sorted({0, seed}):
            # seeded with SVD only the leftover is spent (a round or two): finer tiles are affordable
            sc = scales if seed_rank == 0 else scales + (2 * scales[-1],)
            fams, _ = pursuit(W64, cap, r, scales=sc, shift=bool(opt["shift"]),
                              rounds=int(opt["rounds"]), sweeps=int(opt["sweeps"]), seed_rank=seed_rank)
            cand = _layer_from_families(fams, n_in, n_out, r, b, W.dtype, W.device)
            if cand.flops() > budget * n_in * n_out:  # cannot happen by construction; never exceed the budget
                continue
            err = float(torch.linalg.matrix_norm(cand.dense_weight().double() - W64))
            if err < best_err:
                best, best_err = cand, err
    return best.eval()
