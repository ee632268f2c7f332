"""Data-aware initialisation: truncated SVD in the metric of each layer's input activations.

For a layer W (out x in) with inputs X (in x tokens) and input covariance C = X X^T / tokens, the rank-k
W_k minimising ||(W - W_k) X||_F is U_k S_k V_k^T L^{-1}, where C = L L^T and U S V^T = svd(W L)
(the whitening trick of activation-aware SVD compression).  Plain truncated SVD minimises
||W - W_k||_F instead, which ignores which input directions the data actually uses.
"""
from __future__ import annotations

import torch

from .data import call_model
from .layer import GBLRLinear
from .replace import get_module

__all__ = ["input_covariances", "whiten_layer"]


@torch.no_grad()
def input_covariances(model, names, batches, device=None) -> dict[str, torch.Tensor]:
    """{name: C (in x in, float64)} averaged over the rows of the inputs of each named layer."""
    sums, counts, hooks = {}, {}, []

    def rec(name):
        def hook(_m, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for n in names:
        hooks.append(get_module(model, n).register_forward_hook(rec(n)))
    try:
        for x in batches:
            call_model(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def whiten_layer(layer: GBLRLinear, W: torch.Tensor, C: torch.Tensor, damp: float = 1e-2) -> bool:
    """Refit the full-width components of ``layer`` to ``W`` in the metric of ``C``; False if not applicable."""
    wc, _, wr, _ = layer.hard_intervals()
    live = ((wc > 0) & (wr > 0)).nonzero().flatten()
    n_in, n_out, r = layer.in_features, layer.out_features, layer.rank_per_component
    if live.numel() == 0 or not bool(((wc[live] == n_in) & (wr[live] == n_out)).all()):
        return False
    if not bool((live == torch.arange(live.numel())).all()):
        return False
    k = live.numel() * r
    W = W.double()
    C = C.double().to(W.device)
    C = C + damp * C.diagonal().mean().clamp_min(1e-12) * torch.eye(n_in, dtype=C.dtype, device=C.device)
    L = torch.linalg.cholesky(C)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    k = min(k, S.numel())
    s = S[:k].sqrt()
    Uf = U[:, :k] * s                                                   # (out, k)
    # Vf = (s Vh_k) L^{-1}: solve X L = s Vh_k for X (k x in)
    Vf = torch.linalg.solve_triangular(L, Vh[:k] * s[:, None], upper=False, left=False)
    m = k // r
    dt = layer.U.dtype
    layer.U.zero_()
    layer.V.zero_()
    layer.U[:m].copy_(Uf[:, :m * r].t().reshape(m, r, n_out).transpose(1, 2).to(dt))
    layer.V[:m].copy_(Vf[:m * r].reshape(m, r, n_in).to(dt))
    return True
