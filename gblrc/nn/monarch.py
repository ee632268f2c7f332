"""Monarch matrices (Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate
Training", ICML 2022): a baseline for GBLR at the same multiply-add budget.

A Monarch matrix is ``M = P L P^T R`` with R and L block-diagonal and P a fixed "reshape-transpose"
permutation.  The rectangular form used here is that of the authors' code (``MonarchLinear`` of the
HazyResearch/fly repository): with ``b = nblocks`` blocks, input block size ``p = ceil(n_in / b)``,
output block size ``s = ceil(n_out / b)`` and ``q = min(p, s)``:

* x (n_in, zero-padded to ``b*p``) is cut into b blocks of p; block k is multiplied by
  ``R[k]`` (q x p)                                      -> b*q intermediate values, index j = k*q + i;
* the permutation reads the intermediate vector as a (q, b) array: j = r*b + l (``P^T``);
* block l (the q values with j = l mod b) is multiplied by ``L[l]`` (s x q) -> output block l
  (``P`` brings the blocks back in order); the padded outputs beyond n_out are dropped.

Every intermediate value j links exactly one input block k = j // q with one output block
l = j mod b, so the (l, k) block of the dense matrix (s x p) is a sum of rank-1 terms, one per linking
j, and no parameter is shared between two blocks.  The best Monarch approximation of a dense weight
(in Frobenius norm) is therefore a truncated SVD of each (l, k) block at the number of its links
(:func:`monarch_project`): rank 1 per block pair in the square case ``n = b^2`` of the paper.

Cost per input vector, in multiply-adds: ``b*q*p + b*s*q`` (:func:`monarch_cost`; padding counted).
It is quantised by the block count, so :func:`nblocks_for_budget` picks the b whose cost is the
largest one not above the budget, and the achieved ratio is reported as it is.

The forward pass uses only Pad (when n_in is not a multiple of b), Reshape, Transpose, MatMul, Slice
(when n_out is not a multiple of b) and Add, so it exports to ONNX with standard ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gblrc.nn.replace import as_linear, find_linears, is_linear, set_module

__all__ = [
    "MonarchLinear",
    "monarch_shapes",
    "monarch_cost",
    "monarch_links",
    "monarch_project",
    "nblocks_for_budget",
    "replace_with_monarch",
]


def monarch_shapes(n_in: int, n_out: int, nblocks: int) -> tuple[int, int, int]:
    """(p, q, s): input block size, intermediate values per block, output block size."""
    n_in, n_out, b = int(n_in), int(n_out), int(nblocks)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"in and out features must be >= 1, got {n_in}, {n_out}")
    if b < 1 or b > max(n_in, n_out):
        raise ValueError(f"nblocks must be in [1, max(in, out)] = [1, {max(n_in, n_out)}], got {nblocks}")
    p, s = math.ceil(n_in / b), math.ceil(n_out / b)
    return p, min(p, s), s


def monarch_cost(n_in: int, n_out: int, nblocks: int) -> int:
    """Multiply-adds per input vector of a MonarchLinear (zero padding included): b*q*(p + s)."""
    p, q, s = monarch_shapes(n_in, n_out, nblocks)
    return int(nblocks) * q * (p + s)


def monarch_links(nblocks: int, q: int) -> list[list[tuple[int, int]]]:
    """For each (output block l, input block k) pair, the list of (r, i) linking it:
    intermediate j = k*q + i = r*b + l, i the row of R[k], r the column of L[l].  Indexed [l][k]."""
    b = int(nblocks)
    links = [[[] for _ in range(b)] for _ in range(b)]
    for j in range(b * q):
        k, i = divmod(j, q)
        r, l = divmod(j, b)
        links[l][k].append((r, i))
    return links


class MonarchLinear(nn.Module):
    """y = M x + bias with M a (rectangular) Monarch matrix of ``nblocks`` blocks (module doc).

    Parameters: ``blkdiag1`` = R, shape (b, q, p); ``blkdiag2`` = L, shape (b, s, q); ``bias`` (out,).
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.nblocks = int(in_features), int(out_features), int(nblocks)
        p, q, s = monarch_shapes(in_features, out_features, nblocks)
        self.p, self.q, self.s = p, q, s
        kw = {"device": device, "dtype": dtype}
        self.blkdiag1 = nn.Parameter(torch.empty(nblocks, q, p, **kw))
        self.blkdiag2 = nn.Parameter(torch.empty(nblocks, s, q, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # the variance of nn.Linear's default init for the product: each factor ~ U(-1/sqrt(fan_in), ..)
        for w, fan in ((self.blkdiag1, self.p), (self.blkdiag2, self.q)):
            w.uniform_(-1.0 / math.sqrt(fan), 1.0 / math.sqrt(fan))
        if self.bias is not None:
            self.bias.uniform_(-1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, q, s = self.nblocks, self.p, self.q, self.s
        lead = x.shape[:-1]
        pad = b * p - self.in_features
        if pad:
            x = nn.functional.pad(x, (0, pad))
        h = x.reshape(-1, b, p).transpose(0, 1)  # (b, N, p)
        h = torch.matmul(h, self.blkdiag1.transpose(1, 2))  # (b, N, q): block k of R
        h = h.transpose(0, 1).reshape(-1, q, b).permute(2, 0, 1)  # (b, N, q): j = k*q+i -> (r, l) -> l
        h = torch.matmul(h, self.blkdiag2.transpose(1, 2))  # (b, N, s): block l of L
        y = h.transpose(0, 1).reshape(-1, b * s)
        if b * s != self.out_features:
            y = y[:, : self.out_features]
        y = y.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) dense matrix M (padding removed)."""
        eye = torch.eye(self.in_features, dtype=self.blkdiag1.dtype, device=self.blkdiag1.device)
        bias, self.bias = self.bias, None
        try:
            return self.forward(eye).t().contiguous()
        finally:
            self.bias = bias

    def flops(self) -> int:
        return monarch_cost(self.in_features, self.out_features, self.nblocks)

    def dense_flops(self) -> int:
        return self.in_features * self.out_features

    @classmethod
    def from_dense(cls, linear: nn.Module, nblocks: int) -> "MonarchLinear":
        """The Monarch projection of a linear layer (nn.Linear or HF Conv1D), bias copied."""
        lin = as_linear(linear)
        w = lin.weight.detach()
        m = cls(lin.in_features, lin.out_features, nblocks, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        r, l = monarch_project(w, nblocks)
        with torch.no_grad():
            m.blkdiag1.copy_(r)
            m.blkdiag2.copy_(l)
            if lin.bias is not None:
                m.bias.copy_(lin.bias.detach())
        return m

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}, cost_ratio={self.flops() / self.dense_flops():.3f}"
        )


@torch.no_grad()
def monarch_project(weight: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) = (blkdiag1 (b, q, p), blkdiag2 (b, s, q)) of the Monarch matrix nearest to ``weight``
    (out x in) in Frobenius norm: each (output block, input block) tile of the zero-padded weight is
    replaced by its truncated SVD at the number of intermediate values linking the two blocks, the
    singular values split evenly (sqrt) between the two factors.  In the dtype of ``weight``."""
    n_out, n_in = weight.shape
    b = int(nblocks)
    p, q, s = monarch_shapes(n_in, n_out, b)
    wp = weight.new_zeros(b * s, b * p)
    wp[:n_out, :n_in] = weight
    R = weight.new_zeros(b, q, p)
    L = weight.new_zeros(b, s, q)
    links = monarch_links(b, q)
    for l in range(b):
        for k in range(b):
            pairs = links[l][k]
            if not pairs:
                continue
            tile = wp[l * s : (l + 1) * s, k * p : (k + 1) * p]
            u, sv, vh = torch.linalg.svd(tile, full_matrices=False)
            for c, (r, i) in enumerate(pairs):
                if c >= sv.numel():
                    break  # rank of the tile below the links: the remaining terms stay zero
                root = sv[c].sqrt()
                L[l, :, r] = u[:, c] * root
                R[k, i, :] = vh[c] * root
    return R, L


def nblocks_for_budget(n_in: int, n_out: int, budget: float) -> int:
    """The block count whose Monarch cost is <= budget x n_in x n_out and closest to it (ties: fewer
    blocks).  ValueError when no block count fits the budget."""
    budget = float(budget)
    if not (0.0 < budget <= 1.0):
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    limit = budget * n_in * n_out
    best, best_cost = None, -1
    for b in range(1, max(n_in, n_out) + 1):
        c = monarch_cost(n_in, n_out, b)
        if c <= limit + 1e-9 and c > best_cost:
            best, best_cost = b, c
    if best is None:
        raise ValueError(
            f"no Monarch block count fits a {n_out}x{n_in} layer under budget {budget} "
            f"(the cheapest costs "
            f"{min(monarch_cost(n_in, n_out, b) for b in range(1, max(n_in, n_out) + 1)) / (n_in * n_out):.3f})"
        )
    return best


def replace_with_monarch(
    model: nn.Module, budget: float, include: str | None = None, exclude: str | None = None
) -> tuple[nn.Module, dict]:
    """Replace (in place) the linear layers that :func:`gblrc.nn.replace.find_linears` selects by their
    Monarch projections, each at the block count of :func:`nblocks_for_budget`.

    Convolutions that find_linears selects are left dense (listed in the report's ``skipped``); so are
    layers where no block count fits the budget.  Returns (model, report) with the report's
    ``achieved_ratio`` = Monarch cost / dense cost over the replaced layers (the same definition as
    gblrc.compress's report)."""
    rows, skipped = [], []
    for name, m in find_linears(model, include, exclude):
        if not is_linear(m):
            skipped.append({"name": name, "reason": f"{type(m).__name__} is not a linear layer"})
            continue
        lin = as_linear(m)
        try:
            b = nblocks_for_budget(lin.in_features, lin.out_features, budget)
        except ValueError as e:
            skipped.append({"name": name, "reason": str(e)})
            continue
        new = MonarchLinear.from_dense(lin, b)
        set_module(model, name, new)
        rows.append(
            {
                "name": name,
                "shape": [lin.out_features, lin.in_features],
                "nblocks": b,
                "dense_cost": new.dense_flops(),
                "monarch_cost": new.flops(),
                "ratio": new.flops() / new.dense_flops(),
            }
        )
    if not rows:
        raise ValueError(
            "no linear layer could be replaced by a Monarch layer under budget "
            f"{budget}" + (f" ({skipped[0]['name']}: {skipped[0]['reason']})" if skipped else "")
        )
    dense = sum(r["dense_cost"] for r in rows)
    cost = sum(r["monarch_cost"] for r in rows)
    return model, {
        "budget": float(budget),
        "achieved_ratio": cost / dense,
        "dense_cost": dense,
        "monarch_cost": cost,
        "layers": rows,
        "skipped": skipped,
    }
