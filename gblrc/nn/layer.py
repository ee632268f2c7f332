"""GBLRLinear: a linear layer whose weight is a Generalized Block Low-Rank matrix."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from gblrc.nn.fit import Fitted, fit_weight, weight_and_bias
from gblrc.nn.masks import boxcar_mask, gaudi_mask, hard_locations, hard_widths, quantize_ste
from gblrc.ir.structure import Block, GBLRWeights, Structure, cyclic_spans, merge_same_intervals

__all__ = ["GBLRLinear", "BlockSparseLinear", "fit_dense", "svd_layer"]


class GBLRLinear(nn.Module):
    """y = x W^T + b with W = sum_k (U_k * m_row_k)(V_k * m_col_k).

    Parameters
    ----------
    in_features, out_features: layer shape.
    num_components: K, the number of components (default min(in, out)).
    rank_per_component: r, the rank of each component (the paper uses 1).
    bias: whether to learn an additive bias.

    Learnable: ``U`` (K, out, r), ``V`` (K, r, in), ``widths`` and
    ``locations`` (2, K) as fractions of the axis length; row 0 is the input
    (column) side, row 1 the output (row) side.  ``sigma`` is a buffer that
    the trainer sets (σ homotopy).  Train mode uses Gaudi masks with widths
    and locations rounded to the 1/n grid by a straight-through estimator;
    eval mode uses hard boxcar masks, widths under 1/n being zero (so does train mode once the
    trainer has frozen the structure, ``frozen_structure``).
    """

    hard_forward = False  # train mode: boxcar values with Gaudi-mask gradients (set by the trainer)
    frozen_structure = False  # hardened by the cool-down: boxcar masks in train mode too (content still trains)
    tile = 1  # widths and starts are multiples of ``tile`` elements (compiler-friendly structure)
    # "gblr": the structure is learned (trained, trimmed to the budget).  "neurons" / "heads": a block-sparse
    # member made by gblrc.learn.neurons (kept FFN neurons or attention heads as one full-rank block): its
    # structure is fixed -- boxcar masks, never trimmed -- and its content trains
    family = "gblr"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_components: int | None = None,
        rank_per_component: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"GBLRLinear needs positive sizes, got ({in_features}, {out_features})")
        K = int(num_components) if num_components is not None else min(in_features, out_features)
        r = int(rank_per_component)
        if K < 1 or r < 1:
            raise ValueError(f"num_components and rank_per_component must be >= 1, got {K}, {r}")
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_components, self.rank_per_component = K, r
        bound = 1.0 / math.sqrt(in_features)
        self.V = nn.Parameter(torch.empty(K, r, in_features, **fk).uniform_(-bound, bound))
        self.U = nn.Parameter(torch.empty(K, out_features, r, **fk).uniform_(-bound, bound) / math.sqrt(K * r))
        self.widths = nn.Parameter(torch.ones(2, K, **fk))
        self.locations = nn.Parameter(torch.zeros(2, K, **fk))
        self.bias = nn.Parameter(torch.zeros(out_features, **fk)) if bias else None
        self.register_buffer("sigma", torch.tensor(1.0, dtype=torch.float64))

    # ------------------------------------------------------------------ masks
    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column masks (K, in), row masks (K, out)) for the current mode."""
        n_in, n_out = self.in_features, self.out_features
        dt = self.V.dtype
        if self.training and not self.frozen_structure and self.family == "gblr":
            s = float(self.sigma)
            t = self.tile
            wc = quantize_ste(self.widths[0], n_in, min_one=True, step=t)
            wr = quantize_ste(self.widths[1], n_out, min_one=True, step=t)
            lc = quantize_ste(self.locations[0], n_in, step=t)
            lr = quantize_ste(self.locations[1], n_out, step=t)
            mc, mr = gaudi_mask(wc, lc, n_in, s).to(dt), gaudi_mask(wr, lr, n_out, s).to(dt)
            if self.hard_forward:  # forward with the eval-mode boxcar, gradients of the Gaudi mask
                mc = boxcar_mask(self.widths[0], self.locations[0], n_in, dt, t) + (mc - mc.detach())
                mr = boxcar_mask(self.widths[1], self.locations[1], n_out, dt, t) + (mr - mr.detach())
            return mc, mr
        return (
            boxcar_mask(self.widths[0], self.locations[0], n_in, dt, self.tile),
            boxcar_mask(self.widths[1], self.locations[1], n_out, dt, self.tile),
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked factors as two matrices: V_all (K r, in) and U_all (out, K r)."""
        mc, mr = self.masks()
        K, r = self.num_components, self.rank_per_component
        V = (self.V * mc[:, None, :]).reshape(K * r, self.in_features)
        U = (self.U * mr[:, :, None]).permute(1, 0, 2).reshape(self.out_features, K * r)
        return U, V

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies in its current mode."""
        U, V = self.factors()
        return U @ V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.factors()
        y = (x @ V.t()) @ U.t()
        if self.bias is not None:
            y = y + self.bias
        return y

    # ------------------------------------------------------------------ cost
    def hard_intervals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer (col widths, col starts, row widths, row starts), each (K,)."""
        n_in, n_out = self.in_features, self.out_features
        t = self.tile
        return (
            hard_widths(self.widths[0], n_in, t),
            hard_locations(self.locations[0], n_in, t),
            hard_widths(self.widths[1], n_out, t),
            hard_locations(self.locations[1], n_out, t),
        )

    def flops(self) -> int:
        """Exact multiply-adds per input vector of the hard (eval-mode) structure as it runs once lowered:
        :meth:`gblrc.ir.structure.Structure.cost` (a block of full rank costs its dense tile)."""
        return self.hard_structure().cost()

    def product_flops(self) -> int:
        """Multiply-adds per input vector of the live components as thin products, r (w_c + w_r) each: the
        sum the component-wise budget fit trims (>= :meth:`flops`)."""
        wc, _, wr, _ = self.hard_intervals()
        live = (wc > 0) & (wr > 0)
        return int((self.rank_per_component * (wc + wr) * live).sum())

    def dense_flops(self) -> int:
        return self.in_features * self.out_features

    def cost(self) -> torch.Tensor:
        """Differentiable cost (multiply-adds per vector): r * sum_k (w_c n_in + w_r n_out)."""
        w = self.widths.clamp(0.0, 1.0)
        return self.rank_per_component * (w[0].sum() * self.in_features + w[1].sum() * self.out_features)

    # ----------------------------------------------------------- structure
    @torch.no_grad()
    def set_intervals(self, col_widths, col_starts, row_widths, row_starts) -> "GBLRLinear":
        """Set the structure from integer widths/starts (in elements), each of length K."""
        n_in, n_out = self.in_features, self.out_features
        t = lambda v: torch.as_tensor(
            np.asarray(v, dtype=np.float64), dtype=self.widths.dtype, device=self.widths.device
        )
        self.widths[0].copy_(t(col_widths) / n_in)
        self.widths[1].copy_(t(row_widths) / n_out)
        self.locations[0].copy_(torch.remainder(t(col_starts), n_in) / n_in)
        self.locations[1].copy_(torch.remainder(t(row_starts), n_out) / n_out)
        return self

    @torch.no_grad()
    def hard_structure(self) -> Structure:
        """The hard structure alone (no factors), as :meth:`structure` gives it: components sharing both
        intervals are one block of their summed rank.  Cheap: the time budget estimates it every step."""
        wc, lc, wr, lr = (t.cpu().tolist() for t in self.hard_intervals())
        ranks: dict[tuple, int] = {}
        for k in range(self.num_components):
            if wc[k] == 0 or wr[k] == 0:
                continue
            key = (cyclic_spans(lr[k], wr[k], self.out_features), cyclic_spans(lc[k], wc[k], self.in_features))
            ranks[key] = ranks.get(key, 0) + self.rank_per_component
        return Structure(
            self.in_features, self.out_features, tuple(Block(rows, cols, r) for (rows, cols), r in ranks.items())
        )

    @torch.no_grad()
    def structure(self) -> GBLRWeights:
        """The hard structure with its factors as the IR (float64 numpy factors)."""
        wc, lc, wr, lr = (t.cpu().numpy() for t in self.hard_intervals())
        U = self.U.detach().cpu().double().numpy()
        V = self.V.detach().cpu().double().numpy()
        comps = []
        for k in range(self.num_components):
            if wc[k] == 0 or wr[k] == 0:
                continue
            rows = cyclic_spans(lr[k], wr[k], self.out_features)
            cols = cyclic_spans(lc[k], wc[k], self.in_features)
            ri = np.concatenate([s.indices() for s in rows])
            ci = np.concatenate([s.indices() for s in cols])
            comps.append((rows, cols, U[k][ri, :], V[k][:, ci]))
        blocks, Us, Vs = merge_same_intervals(comps)
        bias = None if self.bias is None else self.bias.detach().cpu().double().numpy()
        s = Structure(self.in_features, self.out_features, tuple(blocks))
        return GBLRWeights(s, tuple(Us), tuple(Vs), bias).validate()

    @classmethod
    @torch.no_grad()
    def from_fitted(cls, f: Fitted, bias: torch.Tensor | None = None, *, dtype=None, device=None) -> "GBLRLinear":
        """A layer holding the fitted components ``f`` (and ``bias``); one empty component if ``f`` has none."""
        K = f.num_components
        layer = cls(
            f.n_in,
            f.n_out,
            num_components=max(K, 1),
            rank_per_component=f.r,
            bias=bias is not None,
            dtype=dtype,
            device=device,
        )
        layer.U.zero_()
        layer.V.zero_()
        if K == 0:
            layer.set_intervals([0], [0], [0], [0])
        else:
            layer.U.copy_(f.U.to(layer.U))
            layer.V.copy_(f.V.to(layer.V))
            layer.set_intervals(f.col_widths, f.col_starts, f.row_widths, f.row_starts)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, budget: float, *, rank_per_component: int = 1, inputs=None, **kwargs
    ) -> "GBLRLinear":
        """A GBLR layer fitted to ``linear``'s weight at ``budget`` x its dense multiply-adds, in eval mode.

        Without ``inputs``: in Frobenius norm, never worse than truncated SVD (options:
        :func:`gblrc.nn.fit.fit_weight`).  With ``inputs`` (rows of the layer's inputs, (n, in)): in the
        metric of those inputs, ||X (W - W^)^T||, never worse than whitened (data-aware) SVD on them
        (options: :func:`gblrc.nn.fit_data.fit_inputs`).  The ``inputs`` search is experimental: its
        options and speed (seconds to minutes per layer) may change.
        """
        W, b = weight_and_bias(linear)
        if inputs is not None:
            from gblrc.nn.fit_data import fit_inputs, second_moment

            if inputs.shape[-1] != W.shape[1]:
                raise ValueError(f"inputs have {inputs.shape[-1]} features, the layer takes {W.shape[1]}")
            f = fit_inputs(W, second_moment(inputs), budget, rank_per_component, **kwargs)
        else:
            f = fit_weight(W, budget, rank_per_component, **kwargs)
        return cls.from_fitted(f, b, dtype=W.dtype, device=W.device).eval()

    @classmethod
    def from_tile(cls, tile: torch.Tensor, n_out: int, n_in: int, **kw) -> "BlockSparseLinear":
        """A block-sparse layer: :class:`BlockSparseLinear` (``tile`` at ``row_start``, ``col_start``)."""
        return BlockSparseLinear(tile, n_out, n_in, **kw)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_components={self.num_components}, rank_per_component={self.rank_per_component}, "
            f"bias={self.bias is not None}"
        )


def fit_dense(linear: nn.Linear, budget: float, *, rank_per_component: int = 1, **kwargs) -> GBLRLinear:
    """:meth:`GBLRLinear.from_dense` as a function (the ``fit`` callback of replacement and conv)."""
    return GBLRLinear.from_dense(linear, budget, rank_per_component=rank_per_component, **kwargs)


def svd_layer(linear: nn.Linear, budget: float, *, rank_per_component: int = 1) -> GBLRLinear:
    """Truncated SVD at the budget, as a GBLR layer of full-width components (in train mode)."""
    W, b = weight_and_bias(linear)
    f = fit_weight(W, budget, rank_per_component, method="svd")
    return GBLRLinear.from_fitted(f, b, dtype=W.dtype, device=W.device)


class BlockSparseLinear(GBLRLinear):
    """A GBLR layer of one dense block at rows [row_start, +|R|) x columns [col_start, +|C|) of an (out x in)
    weight, zero elsewhere -- the block-sparse member (kept FFN neurons, kept heads: gblrc.learn.neurons).  As a
    GBLR layer it is r = min(|R|, |C|) rank-1 components sharing both intervals (one full-rank block, costing
    its dense product |R| |C|); it stores those components' factors on the block alone, ``u`` (|R| x r) and
    ``v`` (r x |C|), the block being u v (a kept FFN slice as full-length masked factors held more numbers
    than the dense layer).  ``family`` names the member ("neurons", "heads"); the structure is fixed (widths
    and locations are buffers: never trained, trimmed or moved); the factors and the bias train, as the
    components of a GBLR layer do."""

    def __init__(
        self,
        tile: torch.Tensor,
        n_out: int,
        n_in: int,
        *,
        row_start: int = 0,
        col_start: int = 0,
        bias=None,
        family: str = "neurons",
    ):
        nn.Module.__init__(self)
        n_rows, n_cols = tile.shape
        if not (0 <= row_start and row_start + n_rows <= n_out and 0 <= col_start and col_start + n_cols <= n_in):
            raise ValueError(f"a {n_rows} x {n_cols} tile at ({row_start}, {col_start}) is outside {n_out} x {n_in}")
        if family == "gblr":
            raise ValueError("a block-sparse layer's family names its member ('neurons', 'heads'), not 'gblr'")
        self.in_features, self.out_features = int(n_in), int(n_out)
        k = self.num_components = min(n_rows, n_cols)
        self.rank_per_component, self.family = 1, family
        fk = {"dtype": tile.dtype, "device": tile.device}
        self.u = nn.Parameter(torch.zeros(n_rows, k, **fk))
        self.v = nn.Parameter(torch.zeros(k, n_cols, **fk))
        self.bias = nn.Parameter(bias.detach().clone().to(tile)) if bias is not None else None
        self.register_buffer("widths", torch.tensor([[n_cols / n_in] * k, [n_rows / n_out] * k], **fk))
        self.register_buffer("locations", torch.tensor([[col_start / n_in] * k, [row_start / n_out] * k], **fk))
        self.register_buffer("sigma", torch.tensor(1.0, dtype=torch.float64))
        self.row_start, self.col_start = int(row_start), int(col_start)
        self.set_tile(tile)
        self.eval()

    def tile_spans(self) -> tuple[slice, slice]:
        """(rows, cols) of the block."""
        return slice(self.row_start, self.row_start + self.u.shape[0]), slice(
            self.col_start, self.col_start + self.v.shape[1]
        )

    @torch.no_grad()
    def set_tile(self, tile: torch.Tensor) -> "BlockSparseLinear":
        """The block made ``tile`` exactly: the identity on its shorter side, the tile on the other."""
        n_rows, n_cols = self.u.shape[0], self.v.shape[1]
        if tuple(tile.shape) != (n_rows, n_cols):
            raise ValueError(f"tile of shape {tuple(tile.shape)} for a block of {n_rows} x {n_cols}")
        eye = torch.eye(self.num_components, dtype=self.u.dtype, device=self.u.device)
        if n_cols <= n_rows:
            self.u.copy_(tile.to(self.u))
            self.v.copy_(eye)
        else:
            self.u.copy_(eye)
            self.v.copy_(tile.to(self.v))
        return self

    @property
    def block(self) -> torch.Tensor:
        """The block, u v (|R| x |C|)."""
        return self.u @ self.v

    # the components' factors, as GBLRLinear holds them (full length, zero outside the block), made on demand
    @property
    def U(self) -> torch.Tensor:  # (K, out, 1)
        rows, _ = self.tile_spans()
        U = self.u.new_zeros(self.num_components, self.out_features, 1)
        U[:, rows, 0] = self.u.t()
        return U

    @property
    def V(self) -> torch.Tensor:  # (K, 1, in)
        _, cols = self.tile_spans()
        V = self.v.new_zeros(self.num_components, 1, self.in_features)
        V[:, 0, cols] = self.v
        return V

    def dense_weight(self) -> torch.Tensor:
        rows, cols = self.tile_spans()
        W = self.u.new_zeros(self.out_features, self.in_features)
        W[rows, cols] = self.block
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.tile_spans()
        y = x[..., cols] @ self.block.t()
        if (rows.start, rows.stop) != (0, self.out_features):
            y = nn.functional.pad(y, (rows.start, self.out_features - rows.stop))
        return y + self.bias if self.bias is not None else y

    @torch.no_grad()
    def structure(self) -> GBLRWeights:
        rows, cols = self.tile_spans()
        (n_rows, k), n_cols = self.u.shape, self.v.shape[1]
        u, v = self.u.detach().cpu().double().numpy(), self.v.detach().cpu().double().numpy()
        blk = Block(
            cyclic_spans(rows.start, n_rows, self.out_features), cyclic_spans(cols.start, n_cols, self.in_features), k
        )
        bias = None if self.bias is None else self.bias.detach().cpu().double().numpy()
        s = Structure(self.in_features, self.out_features, (blk,))
        return GBLRWeights(s, (u,), (v,), bias).validate()

    def spec(self) -> dict:
        """What :func:`gblrc.io.modelio.load` needs to rebuild the layer (its block's place and family)."""
        return {
            "rows": [self.row_start, int(self.u.shape[0])],
            "cols": [self.col_start, int(self.v.shape[1])],
            "family": self.family,
        }

    def extra_repr(self) -> str:
        rows, cols = self.tile_spans()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, family={self.family}, "
            f"block rows [{rows.start}, {rows.stop}) x cols [{cols.start}, {cols.stop}), bias={self.bias is not None}"
        )
