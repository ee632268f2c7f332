"""Initialisation of GBLR layers from dense weights (DESIGN.md §1, "Initialisation")."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layer import GBLRLinear

__all__ = ["fit_dense", "svd_rank_for_budget", "svd_layer", "relative_error"]


def svd_rank_for_budget(n_in: int, n_out: int, budget: float, rank_per_component: int = 1) -> int:
    """Largest number of full-width components whose cost is <= budget * n_in * n_out."""
    return int(np.floor(budget * n_in * n_out / (rank_per_component * (n_in + n_out)) + 1e-9))


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


def fit_dense(linear: nn.Linear, budget: float, *, rank_per_component: int = 1, **kwargs) -> GBLRLinear:
    """Fit a GBLR layer to a dense Linear under ``budget`` (fraction of dense multiply-adds)."""
    if not (0.0 < float(budget) <= 1.0):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return svd_layer(linear, budget, rank_per_component=rank_per_component).eval()
