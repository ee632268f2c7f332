"""The structure IR: the contract between the PyTorch frontend and the ONNX passes.

Plain frozen data (integer spans, blocks, ranks) plus the numeric factors kept
apart.  Depends on numpy only, never on torch or on the rest of gblrc.

A GBLR weight W (out_features x in_features) is a sum of blocks.  Block b has
row spans R_b and column spans C_b (each a tuple of non-overlapping, sorted,
half-open integer intervals; a cyclic interval that wraps around the end of
the axis is two spans), a rank r_b, and factors U_b (|R_b| x r_b) and
V_b (r_b x |C_b|) whose rows/columns follow the span order:

    W[rows(R_b), cols(C_b)] += U_b @ V_b

Cost per input vector, in multiply-adds: sum_b min(r_b * (|C_b| + |R_b|), |R_b| * |C_b|) -- a block runs as
two thin products (x_cols V_b^T, then U_b) or, where that is cheaper, as one dense tile (x_cols (U_b V_b)^T):
the lowering (passes/choose_products.py) picks the same, so the cost the budget charges, the report and
`gblrc inspect` show and the lowered graph runs is one number (:meth:`Block.cost`).  A block-sparse member
(kept FFN neurons, kept heads: docs/design.md §1) is a full-rank block and costs its dense product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Span",
    "Block",
    "Structure",
    "GBLRWeights",
    "cyclic_spans",
    "StructureError",
    "to_onnx_attributes",
    "from_onnx_attributes",
    "pack_factors",
    "unpack_factors",
]


class StructureError(ValueError):
    """A structure or its factors are inconsistent."""


@dataclass(frozen=True, order=True)
class Span:
    """Half-open integer interval [start, stop)."""

    start: int
    stop: int

    def __post_init__(self):
        if not (isinstance(self.start, (int, np.integer)) and isinstance(self.stop, (int, np.integer))):
            raise StructureError(f"span bounds must be integers, got {self.start!r}, {self.stop!r}")
        if self.start < 0 or self.stop <= self.start:
            raise StructureError(f"span [{self.start}, {self.stop}) is empty or negative")
        object.__setattr__(self, "start", int(self.start))
        object.__setattr__(self, "stop", int(self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

    def indices(self) -> np.ndarray:
        return np.arange(self.start, self.stop)


def cyclic_spans(start: int, width: int, n: int) -> tuple[Span, ...]:
    """Spans covering the cyclic interval {(start + j) mod n : 0 <= j < width}.

    Returns () for width 0, (Span(0, n),) for width >= n, two spans when the
    interval wraps around the end of the axis.  The order of the returned
    spans is the order of the cyclic indices (start first).
    """
    if n <= 0:
        raise StructureError(f"axis length must be positive, got {n}")
    width = int(width)
    if width <= 0:
        return ()
    if width >= n:
        return (Span(0, n),)
    start = int(start) % n
    end = start + width
    if end <= n:
        return (Span(start, end),)
    return (Span(start, n), Span(0, end - n))


def _spans_len(spans: Sequence[Span]) -> int:
    return sum(len(s) for s in spans)


def _spans_index(spans: Sequence[Span]) -> np.ndarray:
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([s.indices() for s in spans])


def _check_spans(spans: Sequence[Span], n: int, what: str) -> None:
    if not spans:
        raise StructureError(f"{what}: a block needs at least one span")
    for s in spans:
        if s.stop > n:
            raise StructureError(f"{what}: span [{s.start}, {s.stop}) exceeds axis length {n}")
    idx = _spans_index(spans)
    if len(np.unique(idx)) != len(idx):
        raise StructureError(f"{what}: spans overlap: {[(s.start, s.stop) for s in spans]}")


@dataclass(frozen=True)
class Block:
    """A rank-`rank` product on rows(row_spans) x cols(col_spans)."""

    rows: tuple[Span, ...]
    cols: tuple[Span, ...]
    rank: int

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "cols", tuple(self.cols))
        if int(self.rank) < 1:
            raise StructureError(f"block rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "rank", int(self.rank))

    @property
    def n_rows(self) -> int:
        return _spans_len(self.rows)

    @property
    def n_cols(self) -> int:
        return _spans_len(self.cols)

    def row_index(self) -> np.ndarray:
        return _spans_index(self.rows)

    def col_index(self) -> np.ndarray:
        return _spans_index(self.cols)

    def cost(self) -> int:
        """Multiply-adds per input vector as the block runs: the two thin products, or one dense tile where
        that multiplies less (a block of rank >= |R||C| / (|R| + |C|))."""
        return min(self.product_cost(), self.tile_cost())

    def product_cost(self) -> int:
        """Multiply-adds per input vector of the two thin products."""
        return self.rank * (self.n_rows + self.n_cols)

    def tile_cost(self) -> int:
        """Multiply-adds per input vector of one dense tile."""
        return self.n_rows * self.n_cols


@dataclass(frozen=True)
class Structure:
    """Integer structure of one GBLR layer: shapes and blocks, no numbers."""

    in_features: int
    out_features: int
    blocks: tuple[Block, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "in_features", int(self.in_features))
        object.__setattr__(self, "out_features", int(self.out_features))

    def validate(self) -> "Structure":
        if self.in_features < 1 or self.out_features < 1:
            raise StructureError(f"layer shape must be positive, got in={self.in_features}, out={self.out_features}")
        for i, b in enumerate(self.blocks):
            _check_spans(b.rows, self.out_features, f"block {i} rows")
            _check_spans(b.cols, self.in_features, f"block {i} cols")
        return self

    @property
    def dense_cost(self) -> int:
        return self.in_features * self.out_features

    def cost(self) -> int:
        return sum(b.cost() for b in self.blocks)

    def cost_ratio(self) -> float:
        return self.cost() / self.dense_cost

    @property
    def total_rank(self) -> int:
        return sum(b.rank for b in self.blocks)


@dataclass(frozen=True, eq=False)
class GBLRWeights:
    """A structure with its numeric factors (kept apart) and optional bias.

    U[b] has shape (blocks[b].n_rows, rank_b); V[b] has shape (rank_b, blocks[b].n_cols).
    """

    structure: Structure
    U: tuple[np.ndarray, ...]
    V: tuple[np.ndarray, ...]
    bias: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "U", tuple(np.asarray(u) for u in self.U))
        object.__setattr__(self, "V", tuple(np.asarray(v) for v in self.V))
        if self.bias is not None:
            object.__setattr__(self, "bias", np.asarray(self.bias))

    def validate(self) -> "GBLRWeights":
        s = self.structure.validate()
        if len(self.U) != len(s.blocks) or len(self.V) != len(s.blocks):
            raise StructureError(f"{len(s.blocks)} blocks but {len(self.U)} U and {len(self.V)} V factors")
        for i, (b, u, v) in enumerate(zip(s.blocks, self.U, self.V)):
            if u.shape != (b.n_rows, b.rank):
                raise StructureError(f"block {i}: U has shape {u.shape}, expected {(b.n_rows, b.rank)}")
            if v.shape != (b.rank, b.n_cols):
                raise StructureError(f"block {i}: V has shape {v.shape}, expected {(b.rank, b.n_cols)}")
            if not (np.all(np.isfinite(u)) and np.all(np.isfinite(v))):
                raise StructureError(f"block {i}: factors contain NaN or Inf")
        if self.bias is not None and self.bias.shape != (s.out_features,):
            raise StructureError(f"bias has shape {self.bias.shape}, expected {(s.out_features,)}")
        return self

    def dense(self, dtype=np.float64) -> np.ndarray:
        """The full (out_features x in_features) matrix."""
        s = self.structure
        W = np.zeros((s.out_features, s.in_features), dtype=dtype)
        for b, u, v in zip(s.blocks, self.U, self.V):
            W[np.ix_(b.row_index(), b.col_index())] += u.astype(dtype) @ v.astype(dtype)
        return W

    def apply(self, x: np.ndarray) -> np.ndarray:
        """y = x W^T + bias over the last axis of x (reference implementation)."""
        y = x @ self.dense(dtype=np.result_type(x.dtype, np.float32)).T
        if self.bias is not None:
            y = y + self.bias
        return y


def merge_same_intervals(
    blocks: Iterable[tuple[tuple[Span, ...], tuple[Span, ...], np.ndarray, np.ndarray]],
) -> tuple[list[Block], list[np.ndarray], list[np.ndarray]]:
    """Group (rows, cols, U, V) components that share both intervals into one block.

    Order of first appearance is kept.
    """
    groups: dict[tuple, list] = {}
    for rows, cols, u, v in blocks:
        key = (tuple(rows), tuple(cols))
        groups.setdefault(key, []).append((u, v))
    out_b, out_u, out_v = [], [], []
    for (rows, cols), parts in groups.items():
        u = np.concatenate([p[0] for p in parts], axis=1)
        v = np.concatenate([p[1] for p in parts], axis=0)
        out_b.append(Block(rows, cols, u.shape[1]))
        out_u.append(u)
        out_v.append(v)
    return out_b, out_u, out_v


# ---------------------------------------------------------------------------
# ONNX serialisation: a GBLRLinear node in domain "gblrc" carries the integer
# structure as attributes and the factors as two flat inputs (U_flat, V_flat).
# ---------------------------------------------------------------------------

ONNX_DOMAIN = "gblrc"
ONNX_OP = "GBLRLinear"


def to_onnx_attributes(s: Structure) -> dict[str, object]:
    """Integer attributes describing `s` (all lists of ints, or ints)."""
    row_counts, col_counts, row_spans, col_spans, ranks = [], [], [], [], []
    for b in s.blocks:
        ranks.append(b.rank)
        row_counts.append(len(b.rows))
        col_counts.append(len(b.cols))
        for sp in b.rows:
            row_spans += [sp.start, sp.stop]
        for sp in b.cols:
            col_spans += [sp.start, sp.stop]
    attrs = {
        "in_features": s.in_features,
        "out_features": s.out_features,
        "ranks": ranks,
        "row_span_counts": row_counts,
        "row_spans": row_spans,
        "col_span_counts": col_counts,
        "col_spans": col_spans,
    }
    # ONNX cannot type an empty list attribute: a structure with no blocks omits them (read back as []).
    return {k: v for k, v in attrs.items() if not (isinstance(v, list) and not v)}


def from_onnx_attributes(attrs: dict) -> Structure:
    """Inverse of `to_onnx_attributes`; validates the result."""
    try:
        ranks = list(attrs.get("ranks", []))
        rc, cc = list(attrs.get("row_span_counts", [])), list(attrs.get("col_span_counts", []))
        rs, cs = list(attrs.get("row_spans", [])), list(attrs.get("col_spans", []))
        if not (len(ranks) == len(rc) == len(cc)):
            raise StructureError("ranks, row_span_counts and col_span_counts differ in length")
        if len(rs) != 2 * sum(rc) or len(cs) != 2 * sum(cc):
            raise StructureError("span lists do not match the span counts")
        blocks, ri, ci = [], 0, 0
        for r, nr, nc in zip(ranks, rc, cc):
            rows = tuple(Span(rs[2 * (ri + j)], rs[2 * (ri + j) + 1]) for j in range(nr))
            cols = tuple(Span(cs[2 * (ci + j)], cs[2 * (ci + j) + 1]) for j in range(nc))
            ri, ci = ri + nr, ci + nc
            blocks.append(Block(rows, cols, r))
        s = Structure(int(attrs["in_features"]), int(attrs["out_features"]), tuple(blocks))
    except KeyError as e:
        raise StructureError(f"missing GBLRLinear attribute {e}") from None
    return s.validate()


def pack_factors(w: GBLRWeights, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Flatten all U_b (row-major) into one vector, and all V_b into another."""
    u = [x.astype(dtype).ravel() for x in w.U]
    v = [x.astype(dtype).ravel() for x in w.V]
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=dtype)
    return cat(u), cat(v)


def unpack_factors(s: Structure, u_flat: np.ndarray, v_flat: np.ndarray, bias: np.ndarray | None = None) -> GBLRWeights:
    """Inverse of `pack_factors`; validates sizes."""
    u_flat, v_flat = np.asarray(u_flat).ravel(), np.asarray(v_flat).ravel()
    nu = sum(b.n_rows * b.rank for b in s.blocks)
    nv = sum(b.n_cols * b.rank for b in s.blocks)
    if u_flat.size != nu or v_flat.size != nv:
        raise StructureError(
            f"packed factors have {u_flat.size} and {v_flat.size} values, structure needs {nu} and {nv}"
        )
    U, V, iu, iv = [], [], 0, 0
    for b in s.blocks:
        U.append(u_flat[iu : iu + b.n_rows * b.rank].reshape(b.n_rows, b.rank))
        V.append(v_flat[iv : iv + b.rank * b.n_cols].reshape(b.rank, b.n_cols))
        iu += b.n_rows * b.rank
        iv += b.rank * b.n_cols
    return GBLRWeights(s, tuple(U), tuple(V), bias).validate()
