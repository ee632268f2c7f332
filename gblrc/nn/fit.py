"""Fitting a dense weight to a GBLR structure (docs/design.md §1, "Initialisation"): pure tensor math.

:func:`fit_weight` runs a greedy block pursuit (:mod:`gblrc.nn.pursuit`) over tiled candidate blocks
at several scales (wrap-around included), twice: from scratch, and seeded with the truncated-SVD rank
(spending only the budget SVD leaves over).  Both are refitted jointly with the structure fixed, and
the best of them and plain truncated SVD is returned, so the result's relative Frobenius error is
never larger than truncated SVD's at the same cost.  Cost is counted exactly like
``GBLRLinear.flops()``.

The result is a :class:`Fitted` (integer intervals and zero-padded factors); ``GBLRLinear.from_fitted``
turns it into a layer and ``GBLRLinear.from_dense`` / :func:`gblrc.nn.layer.fit_dense` do both, so this
module never needs the layer class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gblrc.nn.pursuit import pursuit

__all__ = [
    "Fitted",
    "fit_weight",
    "svd_fit",
    "svd_rank_for_budget",
    "relative_error",
    "check_budget",
    "weight_and_bias",
    "FIT_OPTIONS",
]


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1]; OptionError (a ValueError) otherwise, NaN included."""
    from gblrc.errors import OptionError

    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise OptionError("budget", f"must be a number in (0, 1], got {budget!r}") from None
    if not (0.0 < b <= 1.0):
        raise OptionError("budget", f"must be in (0, 1] (a fraction of the dense cost), got {budget}")
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


def weight_and_bias(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Linear's detached (weight, bias); TypeError / ValueError for other modules or non-finite weights."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    W = linear.weight.detach()
    if not torch.isfinite(W).all():
        raise ValueError("the dense weight contains NaN or Inf")
    return W, (None if linear.bias is None else linear.bias.detach())


@dataclass(frozen=True)
class Fitted:
    """K components of rank r as GBLRLinear holds them: integer cyclic intervals (length K each) and
    factors U (K, out, r), V (K, r, in) that are zero outside each component's rows / columns."""

    n_in: int
    n_out: int
    r: int
    col_widths: tuple[int, ...]
    col_starts: tuple[int, ...]
    row_widths: tuple[int, ...]
    row_starts: tuple[int, ...]
    U: torch.Tensor
    V: torch.Tensor

    @property
    def num_components(self) -> int:
        return len(self.col_widths)

    def flops(self) -> int:
        return sum(self.r * (c + w) for c, w in zip(self.col_widths, self.row_widths) if c > 0 and w > 0)

    def dense(self) -> torch.Tensor:
        if self.num_components == 0:
            return torch.zeros(self.n_out, self.n_in, dtype=self.U.dtype)
        return torch.einsum("kor,kri->oi", self.U, self.V)


def svd_fit(W: torch.Tensor, budget: float, r: int = 1) -> Fitted:
    """Truncated SVD at the budget, as full-width components of rank r (float64 factors)."""
    n_out, n_in = W.shape
    K = svd_rank_for_budget(n_in, n_out, budget, r)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    k = min(K * r, S.numel())
    s = S[:k].sqrt()
    Us = torch.zeros(K, n_out, r, dtype=torch.float64)
    Vs = torch.zeros(K, r, n_in, dtype=torch.float64)
    m = k // r if r else 0
    Us[:m] = (U[:, : m * r] * s[: m * r]).T.reshape(m, r, n_out).transpose(1, 2)
    Vs[:m] = (Vh[: m * r] * s[: m * r, None]).reshape(m, r, n_in)
    return Fitted(n_in, n_out, r, (n_in,) * K, (0,) * K, (n_out,) * K, (0,) * K, Us, Vs)


def _from_families(fams, n_in: int, n_out: int, r: int) -> Fitted:
    """One component per allocated rank-r group of every tile of every family."""
    comps = []  # (row start, row len, col start, col len, U (a, r), V (r, b))
    for f in fams:
        L, Rt = f.factors
        for i, (rs, a) in enumerate(f.rows):
            for j, (cs, bl) in enumerate(f.cols):
                for c in range(int(f.alloc[i, j])):
                    sl = slice(c * r, (c + 1) * r)
                    comps.append((rs, a, cs, bl, L[i, j, :a, sl], Rt[i, j, sl, :bl]))
    K = len(comps)
    U = torch.zeros(K, n_out, r, dtype=torch.float64)
    V = torch.zeros(K, r, n_in, dtype=torch.float64)
    for k, (rs, a, cs, bl, u, v) in enumerate(comps):
        U[k, (rs + torch.arange(a)) % n_out, :] = u.double().cpu()
        V[k, :, (cs + torch.arange(bl)) % n_in] = v.double().cpu()
    return Fitted(
        n_in,
        n_out,
        r,
        tuple(c[3] for c in comps),
        tuple(c[2] for c in comps),
        tuple(c[1] for c in comps),
        tuple(c[0] for c in comps),
        U,
        V,
    )


FIT_OPTIONS = {"method": "gblr", "scales": (1, 2, 4), "shift": True, "rounds": 8, "sweeps": 2, "threads": 1}


def fit_weight(W: torch.Tensor, budget: float, rank_per_component: int = 1, **kwargs) -> Fitted:
    """Fit a GBLR structure to the dense weight ``W`` (out, in) under ``budget`` (fraction of dense
    multiply-adds): cost <= budget * dense and relative Frobenius error <= truncated SVD's.

    Options (keywords): ``method`` "gblr" (default, block pursuit) or "svd" (truncated SVD only);
    ``scales`` tile counts per axis (default (1, 2, 4); the SVD-seeded run, which only spends SVD's
    leftover budget, adds twice the largest); ``shift`` also try half-tile shifted tilings (wrap-around
    blocks, default True); ``rounds`` greedy budget chunks (default 8); ``sweeps`` joint refits with
    the structure fixed (default 2); ``threads`` torch intra-op threads during the fit (default 1: the
    pursuit runs thousands of small operations, and on a busy 2-core machine two threads measured
    many times slower than one; None keeps the caller's setting).  The caller's thread count is
    restored afterwards.
    """
    budget = check_budget(budget)
    unknown = set(kwargs) - set(FIT_OPTIONS)
    if unknown:
        raise TypeError(f"fit_dense got unknown options {sorted(unknown)}; known: {sorted(FIT_OPTIONS)}")
    opt = {**FIT_OPTIONS, **kwargs}
    if opt["method"] not in ("gblr", "svd"):
        raise ValueError(f"method must be 'gblr' or 'svd', got {opt['method']!r}")
    r = int(rank_per_component)
    if r < 1:
        raise ValueError(f"rank_per_component must be >= 1, got {rank_per_component}")
    if opt["method"] == "svd":
        return svd_fit(W, budget, r)
    threads = torch.get_num_threads()
    if opt["threads"] is not None:
        torch.set_num_threads(max(1, int(opt["threads"])))
    try:
        return _fit(W, budget, r, opt)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _fit(W: torch.Tensor, budget: float, r: int, opt: dict) -> Fitted:
    best = svd_fit(W, budget, r)
    n_out, n_in = W.shape
    cap = int(math.floor(budget * n_in * n_out))
    W64 = W.double()
    # errors in the layer's own dtype, as the layer will apply it
    err = lambda f: float(torch.linalg.matrix_norm(f.dense().to(W.dtype).double() - W64))
    best_err = err(best)
    seed = svd_rank_for_budget(n_in, n_out, budget, r)
    scales = tuple(sorted({1, *(int(s) for s in opt["scales"])}))
    if scales[0] < 1:
        raise ValueError(f"scales must be positive tile counts, got {opt['scales']}")
    for seed_rank in sorted({0, seed}):
        # seeded with SVD only the leftover is spent (a round or two): finer tiles are affordable
        sc = scales if seed_rank == 0 else scales + (2 * scales[-1],)
        fams, _ = pursuit(
            W64,
            cap,
            r,
            scales=sc,
            shift=bool(opt["shift"]),
            rounds=int(opt["rounds"]),
            sweeps=int(opt["sweeps"]),
            seed_rank=seed_rank,
        )
        cand = _from_families(fams, n_in, n_out, r)
        if cand.flops() > budget * n_in * n_out:  # cannot happen by construction; never exceed the budget
            continue
        e = err(cand)
        if e < best_err:
            best, best_err = cand, e
    return best
