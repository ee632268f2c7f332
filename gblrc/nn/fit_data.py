"""Data-aware GBLR structure search (experimental): fitting a dense weight in the metric of the layer's inputs.

:func:`fit_inputs` (W, C, budget, r=1, tile=, seed_frac=, refit_rounds=) fits What = sum_k U_k V_k, each
component a rank-r matrix nonzero only on a cyclic interval of output rows x a cyclic interval of input
columns, minimising the output error on the calibration inputs, tr((W - What) C (W - What)^T), at cost
sum_k r (row_width_k + col_width_k) <= budget * n_in * n_out.

Algorithm
---------
C_d = C + 0.01 mean(diag C) I = L L^T (Cholesky; the damping ``_DAMP``).
1. Whitened SVD (data-aware low rank): SVD of W L, top k_svd (the rank the budget buys), mapped back by
   L^-1.  This is also the fallback: the result is the best of {search, whitened SVD} in tr(E C E^T);
   it is returned directly when the budget buys no whitened-SVD rank and less than 2 r (no block fits).
2. Seed: whitened SVD at a smaller rank k0 = floor(seed_frac * k_svd) (full-width components).
3. Greedy fill of the remaining budget, in scoring passes over all candidate blocks.  For a block reading
   columns S and writing rows R on residual E, the best rank-r update is a reduced-rank regression
       min_B ||E_R L - B L_S||_F,   L_S = rows S of L,
   with gain = sum of the top r eigenvalues of Z_R Z_R^T, Z = (E C_d)[:, S] chol(C_d[S,S])^-T,
   and solution B = P_r Sigma_r Q_r^T chol(C_d[S,S])^-1 from the SVD Z_R = P Sigma Q^T.
   Candidates: cyclic intervals of widths tile * 2^j and n/4, n/2 (when they divide n and are >= tile),
   starts every tile (every half width, on the tile grid, for widths >= 2 tile), and the full axis.
   Scores are approximate gains (subspace iteration), ranked by gain per cost.  If full width x full
   width ranks first, the next whitened-SVD directions of the residual are added instead: every one whose
   gain per cost beats the best other candidate, at least one, as many as fit (if none fits, the pass
   goes on to the blocks).  Otherwise the pass walks the ranking and solves exactly each candidate that
   still fits in the budget: row-disjoint blocks do not interact (the metric sums over output rows), so
   a block on untouched rows is accepted; one on rows already taken this pass (at most ``_PER_ROW``
   blocks per row and pass) only if its exact gain per cost is still >= ``_STALE`` x its score.  The
   fill stops when a pass accepts nothing or less than 2 r of budget is left.
4. Joint refit: ``refit_rounds`` sweeps of block coordinate descent: the full-width part re-solved as one
   whitened truncated SVD of its residual, then each block re-solved in closed form on the residual of
   all others.
5. Return the best of {this, whitened SVD at the full budget} on the calibration metric.

The result is a :class:`gblrc.nn.fit.Fitted`; ``GBLRLinear.from_dense(linear, budget, inputs=X)`` uses it.
Measured on MiniLM (docs/results.md, "Data-aware structure"): 2-6% below whitened SVD's held-out error per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from gblrc.nn.fit import Fitted, check_budget, svd_rank_for_budget

__all__ = [
    "fit_inputs",
    "whitened_decomposition",
    "whitened_svd",
    "whitened_svd_fit",
    "output_error",
    "second_moment",
    "refit_kept",
]

_DAMP = 1e-2  # C_d = C + _DAMP * mean(diag C) I: the metric every fit here is solved in
_PER_ROW = 2  # blocks one output row may take in one greedy pass
_STALE = 0.7  # a block on rows taken earlier in the pass is kept if exact gain/cost >= _STALE x its score
_TINY = 1e-30  # gains at or below this are no gain


# ---------------------------------------------------------------------------------------- helpers
def _damped(C: torch.Tensor, damp: float) -> torch.Tensor:
    n = C.shape[0]
    return C + damp * C.diagonal().mean().clamp_min(1e-12) * torch.eye(n, dtype=C.dtype, device=C.device)


def _cyc(start: int, width: int, n: int) -> torch.Tensor:
    return (torch.arange(width) + int(start)) % n


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    """Candidate cyclic intervals (start, width) on an axis of length n: the full axis first."""
    t = max(1, min(int(tile), n))
    widths = set()
    w = t
    while w < n:
        widths.add(w)
        w *= 2
    for f in (4, 2):
        if n % f == 0 and n // f >= t:
            widths.add(n // f)
    out = [(0, n)]
    for w in sorted(widths):
        step = t if w < 2 * t else max(t, (w // 2) // t * t)
        out += [(s, w) for s in range(0, n, step)]
    return out


@dataclass(frozen=True, eq=False)
class _Component:
    """One rank-r term of the fit: U (rw, r) @ V (r, cw) on the cyclic output rows [rs, rs + rw) x input
    columns [cs, cs + cw) of an (n_out, n_in) weight."""

    rs: int
    rw: int
    cs: int
    cw: int
    U: torch.Tensor
    V: torch.Tensor
    n_out: int
    n_in: int

    @property
    def full(self) -> bool:
        """Full width on both axes: a whitened-SVD direction."""
        return self.rw == self.n_out and self.cw == self.n_in

    @property
    def rows(self) -> torch.Tensor:
        return _cyc(self.rs, self.rw, self.n_out)

    @property
    def cols(self) -> torch.Tensor:
        return _cyc(self.cs, self.cw, self.n_in)


def _cost(comps: list[_Component], r: int) -> int:
    return sum(r * (c.rw + c.cw) for c in comps)


def _dense(comps: list[_Component], like: torch.Tensor) -> torch.Tensor:
    What = torch.zeros_like(like)
    for c in comps:
        What[c.rows[:, None], c.cols[None, :]] += c.U @ c.V
    return What


def _cal_err(W: torch.Tensor, C: torch.Tensor, comps: list[_Component]) -> float:
    """tr(E C E^T), E = W - sum of comps: the calibration metric."""
    E = W - _dense(comps, W)
    return float(torch.einsum("ij,jk,ik->", E, C, E))


def whitened_decomposition(W: torch.Tensor, C: torch.Tensor, damp: float = _DAMP):
    """(U, S, Vh, L): svd(W L) with damped C = L L^T, the metric of the layer's inputs (float64)."""
    L = torch.linalg.cholesky(_damped(C.double(), damp))
    U, S, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    return U, S, Vh, L


def whitened_svd(W: torch.Tensor, C: torch.Tensor, k: int, damp: float = _DAMP):
    """(Uf (out,k), Vf (k,in)): best rank-k fit of W in the metric of damped C."""
    U, S, Vh, L = whitened_decomposition(W, C, damp)
    k = min(k, S.numel())
    s = S[:k].sqrt()
    Uf = U[:, :k] * s
    Vf = torch.linalg.solve_triangular(L, Vh[:k] * s[:, None], upper=False, left=False)
    return Uf, Vf


def output_error(W, What, Ch) -> float:
    """sqrt(tr(E Ch E^T) / tr(W Ch W^T)) = ||X (W - What)^T||_F / ||X W^T||_F when Ch = X^T X / n."""
    E = (W - What).double()
    num = torch.einsum("ij,jk,ik->", E, Ch, E)
    den = torch.einsum("ij,jk,ik->", W.double(), Ch, W.double())
    return math.sqrt(max(float(num), 0.0) / float(den))


def _pack(comps: list[_Component], n_out: int, n_in: int, r: int) -> Fitted:
    K = len(comps)
    U = torch.zeros(K, n_out, r, dtype=torch.float64)
    V = torch.zeros(K, r, n_in, dtype=torch.float64)
    for k, c in enumerate(comps):
        U[k][c.rows] = c.U.double()
        V[k][:, c.cols] = c.V.double()
    return Fitted(
        n_in,
        n_out,
        r,
        tuple(int(c.cw) for c in comps),
        tuple(int(c.cs) % n_in for c in comps),
        tuple(int(c.rw) for c in comps),
        tuple(int(c.rs) % n_out for c in comps),
        U,
        V,
    )


def second_moment(X: torch.Tensor) -> torch.Tensor:
    """C = X^T X / n of input rows X (n, in), float64: ||X E^T||^2 = n tr(E C E^T) for any error E."""
    X = X.detach().reshape(-1, X.shape[-1]).double()
    return X.t() @ X / max(1, X.shape[0])


def _svd_comps(W: torch.Tensor, C: torch.Tensor, k: int, r: int, damp: float) -> list[_Component]:
    """The first k whitened-SVD components of rank r, full width (fewer if W's rank is smaller)."""
    if k <= 0:
        return []
    n_out, n_in = W.shape
    Uf, Vf = whitened_svd(W, C, k * r, damp)
    return [
        _Component(0, n_out, 0, n_in, Uf[:, i * r : (i + 1) * r], Vf[i * r : (i + 1) * r], n_out, n_in)
        for i in range(Uf.shape[1] // r)
    ]


def whitened_svd_fit(W: torch.Tensor, C: torch.Tensor, budget: float, r: int = 1, damp: float = _DAMP) -> Fitted:
    """Data-aware low rank: whitened truncated SVD at the budget, as full-width components of rank r."""
    n_out, n_in = W.shape
    comps = _svd_comps(W, C, svd_rank_for_budget(n_in, n_out, check_budget(budget), r), r, damp)
    return _pack(comps, n_out, n_in, r)


def _topr_eig(G: torch.Tensor, r: int) -> torch.Tensor:
    """Sum of the top-r eigenvalues of each (batched) symmetric PSD matrix."""
    ev = torch.linalg.eigvalsh(G)
    return ev[..., -r:].sum(-1)


def _topr_power(B: torch.Tensor, r: int, iters: int = 5) -> torch.Tensor:
    """Approximate sum of the top-r eigenvalues of each PSD matrix in the batch (nb, m, m):
    subspace iteration with r+2 vectors from a fixed start, then Rayleigh-Ritz."""
    nb, m, _ = B.shape
    if m <= 8:
        return _topr_eig(B, r)
    p = min(m, r + 2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(m, p, generator=g, dtype=B.dtype).expand(nb, m, p)
    X = B @ X
    for _ in range(iters):
        X, _ = torch.linalg.qr(X)
        X = B @ X
    X, _ = torch.linalg.qr(X)
    H = X.transpose(1, 2) @ (B @ X)
    return _topr_eig(H, r)


# ------------------------------------------------------------------------------------------ search
class _Search:
    """The candidate blocks of one (W, C, r, tile) and the residual algebra on EC = (W - What) C_d."""

    def __init__(self, W: torch.Tensor, C: torch.Tensor, r: int, tile: int):
        self.n_out, self.n_in = W.shape
        self.r = r
        self.Cd = _damped(C, _DAMP)
        self.L = torch.linalg.cholesky(self.Cd)
        self.rows = _spans(self.n_out, tile)
        self.cols = _spans(self.n_in, tile)
        # per column span: index, Cholesky of C_d[S,S]
        self.col_idx, self.col_L = [], []
        for s, w in self.cols:
            idx = _cyc(s, w, self.n_in)
            self.col_idx.append(idx)
            self.col_L.append(self.L if w == self.n_in else torch.linalg.cholesky(self.Cd[idx][:, idx]))
        self._chol = dict(zip(self.cols, self.col_L))
        # row spans grouped by width: (width, starts tensor, gather index (nR, w))
        by_w = {}
        for s, w in self.rows:
            by_w.setdefault(w, []).append(s)
        self.row_groups = [
            (w, torch.tensor(st), torch.stack([_cyc(s, w, self.n_out) for s in st])) for w, st in sorted(by_w.items())
        ]
        # tile-aligned rows (all starts and widths multiples of t, t | n_out): column Grams by prefix sums
        t = max(1, min(int(tile), self.n_out))
        self.row_tile = t if (self.n_out % t == 0 and all(s % t == 0 and w % t == 0 for s, w in self.rows)) else 0

    def component(self, rs: int, rw: int, cs: int, cw: int, U: torch.Tensor, V: torch.Tensor) -> _Component:
        return _Component(rs, rw, cs, cw, U, V, self.n_out, self.n_in)

    def solve_block(self, EC, rs, rw, cs, cw):
        """Best rank-r block on rows [rs, rs + rw) x columns [cs, cs + cw) for residual EC: (U, V, exact gain)."""
        r = self.r
        ri, ci = _cyc(rs, rw, self.n_out), _cyc(cs, cw, self.n_in)
        Lss = self._chol[(cs % self.n_in, cw)]
        Z = torch.linalg.solve_triangular(Lss, EC[ri][:, ci].t(), upper=False).t()  # (rw, cw)
        P, Sg, Qh = torch.linalg.svd(Z, full_matrices=False)
        k = min(r, Sg.numel())
        Ub = torch.zeros(rw, r, dtype=Z.dtype)
        Vb = torch.zeros(r, cw, dtype=Z.dtype)
        Ub[:, :k] = P[:, :k] * Sg[:k]
        Vb[:k] = torch.linalg.solve_triangular(Lss, Qh[:k], upper=False, left=False)  # Qh Lss^-1
        return Ub, Vb, float((Sg[:k] ** 2).sum())

    def whitened_svd(self, EC):
        """svd(E L) of the residual E, from EC = E C_d (E L = EC L^-T)."""
        E_L = torch.linalg.solve_triangular(self.L, EC.t(), upper=False).t()
        return torch.linalg.svd(E_L, full_matrices=False)

    def apply(self, EC, c: _Component, sign: int):
        """EC -= sign * U V C_d[S, :] on rows R (sign=+1 removes the component from the residual)."""
        EC[c.rows] -= sign * (c.U @ (c.V @ self.Cd[c.cols]))

    def score(self, EC, remaining):
        """All candidates' (gain/cost, gain, rs, rw, cs, cw) that fit in ``remaining``; best first.

        Gains are top-r eigenvalue sums of the smaller Gram side, by batched subspace iteration (a
        slight underestimate, used only for ranking; accepted blocks are solved exactly)."""
        r = self.r
        ratios, metas = [], []
        for (cs, cw), ci, Lss in zip(self.cols, self.col_idx, self.col_L):
            Z = torch.linalg.solve_triangular(Lss, EC[:, ci].t(), upper=False).t()  # (out, cw)
            P = None
            for w, starts, gidx in self.row_groups:
                c = r * (w + cw)
                if c > remaining:
                    continue
                if w <= cw:
                    Zr = Z[gidx]  # (nR, w, cw)
                    B = Zr @ Zr.transpose(1, 2)
                elif self.row_tile:
                    if P is None:  # prefix sums of tile Grams
                        T = Z.reshape(-1, self.row_tile, cw)
                        T = T.transpose(1, 2) @ T  # (ntiles, cw, cw)
                        P = torch.cat([torch.zeros(1, cw, cw, dtype=Z.dtype), T.cumsum(0)])
                    t = self.row_tile
                    a = starts // t
                    b = a + w // t
                    nt = P.shape[0] - 1
                    B = torch.where(
                        (b <= nt)[:, None, None], P[b.clamp(max=nt)] - P[a], P[nt] - P[a] + P[(b - nt).clamp(min=0)]
                    )
                else:
                    Zr = Z[gidx]
                    B = Zr.transpose(1, 2) @ Zr
                g = _topr_power(B, r)
                ratios.append(g / c)
                metas.append(
                    torch.stack(
                        [g, starts.double(), torch.full_like(g, w), torch.full_like(g, cs), torch.full_like(g, cw)], 1
                    )
                )
        if not ratios:
            return []
        ratio = torch.cat(ratios)
        meta = torch.cat(metas)
        order = torch.argsort(ratio, descending=True)
        ratio, meta = ratio[order].tolist(), meta[order].tolist()
        return [(q, m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for q, m in zip(ratio, meta)]


# ------------------------------------------------------------------------------------ the steps
def _extend_low_rank(S: _Search, comps: list[_Component], EC, cands, remaining: int) -> int:
    """Step 3, full width ranked first: add the next whitened-SVD directions of the residual, every one
    whose gain/cost beats the best other candidate (at least one, as many as fit).  Returns the cost spent."""
    r, n_out, n_in = S.r, S.n_out, S.n_in
    nxt = next((c for c in cands if not (c[3] == n_out and c[5] == n_in)), None)
    bar = nxt[0] if nxt is not None else 0.0
    Uw, Sw, Vw = S.whitened_svd(EC)
    fc = r * (n_in + n_out)
    gains = (Sw**2).reshape(-1)[: (Sw.numel() // r) * r].reshape(-1, r).sum(1)
    m = int(((gains / fc) >= bar).sum().clamp(min=1))
    m = min(m, remaining // fc)
    for i in range(m):
        sl = slice(i * r, (i + 1) * r)
        Vb = torch.linalg.solve_triangular(S.L, Vw[sl], upper=False, left=False)
        c = S.component(0, n_out, 0, n_in, Uw[:, sl] * Sw[sl], Vb)
        S.apply(EC, c, +1)
        comps.append(c)
    return m * fc


def _accept_blocks(S: _Search, comps: list[_Component], EC, cands, remaining: int) -> int:
    """Step 3, one pass down the ranking: solve each candidate that fits exactly and accept it unless its
    rows are saturated (``_PER_ROW``) or, on rows already taken this pass, its exact gain went stale
    (``_STALE``).  Returns the cost spent (0: nothing accepted)."""
    taken_rows = torch.zeros(S.n_out, dtype=torch.long)  # blocks accepted on each row this pass
    spent = 0
    for ratio, gain, rs, rw, cs, cw in cands:
        cost = S.r * (rw + cw)
        if cost > remaining - spent or gain <= _TINY:
            continue
        ri = _cyc(rs, rw, S.n_out)
        hit = int(taken_rows[ri].max())
        if hit >= _PER_ROW:
            continue
        Ub, Vb, g = S.solve_block(EC, rs, rw, cs, cw)
        if hit > 0 and g / cost < _STALE * ratio:  # stale gain: rows changed this pass
            continue
        c = S.component(rs, rw, cs, cw, Ub, Vb)
        S.apply(EC, c, +1)
        comps.append(c)
        spent += cost
        taken_rows[ri] += 1
        if bool((taken_rows >= _PER_ROW).all()):
            break
    return spent


def _greedy_fill(S: _Search, comps: list[_Component], EC, cap: int) -> int:
    """Step 3: spend the budget left after the seed; ``comps`` and the residual EC grow in place.
    Returns the number of scoring passes."""
    used = _cost(comps, S.r)
    passes = 0
    while cap - used >= 2 * S.r:
        cands = S.score(EC, cap - used)
        passes += 1
        if not cands or cands[0][1] <= _TINY:
            break
        if cands[0][3] == S.n_out and cands[0][5] == S.n_in:
            spent = _extend_low_rank(S, comps, EC, cands, cap - used)
            used += spent
            if spent:
                continue
        spent = _accept_blocks(S, comps, EC, cands, cap - used)
        if not spent:
            break
        used += spent
    return passes


def _joint_refit(S: _Search, comps: list[_Component], EC, rounds: int) -> list[_Component]:
    """Step 4: ``rounds`` sweeps of block coordinate descent with the structure fixed (EC kept in step):
    the full-width part as one whitened truncated SVD, then each block in closed form."""
    r = S.r
    comps = list(comps)
    for _ in range(rounds):
        full = [i for i, c in enumerate(comps) if c.full]
        if full:
            for i in full:
                S.apply(EC, comps[i], -1)  # add back to residual
            Uw, Sw, Vw = S.whitened_svd(EC)
            k = len(full) * r
            s = Sw[:k].sqrt()
            Uf = Uw[:, :k] * s
            Vf = torch.linalg.solve_triangular(S.L, Vw[:k] * s[:, None], upper=False, left=False)
            for j, i in enumerate(full):
                comps[i] = replace(comps[i], U=Uf[:, j * r : (j + 1) * r], V=Vf[j * r : (j + 1) * r])
                S.apply(EC, comps[i], +1)
        for i, c in enumerate(comps):
            if not c.full:
                S.apply(EC, c, -1)
                Ub, Vb, _ = S.solve_block(EC, c.rs, c.rw, c.cs, c.cw)
                comps[i] = replace(c, U=Ub, V=Vb)
                S.apply(EC, comps[i], +1)
    return comps


def fit_inputs(
    W: torch.Tensor,
    C: torch.Tensor,
    budget: float,
    r: int = 1,
    *,
    tile: int = 32,
    seed_frac: float = 0.85,
    refit_rounds: int = 3,
    return_info: bool = False,
):
    """Data-aware GBLR fit of W (out, in) for inputs with second-moment C (in, in) at ``budget``.

    Experimental: an opt-in research search (``GBLRLinear.from_dense(..., inputs=X)``); its options,
    diagnostics and speed (seconds to minutes per MiniLM layer) may change.

    Returns a :class:`Fitted` (cost <= budget * dense, calibration error <= whitened SVD's); with
    ``return_info`` also a dict of diagnostics (errors, blocks, which fit was chosen).  Options: ``tile``
    (candidate widths and starts on this grid), ``seed_frac`` (share of the whitened-SVD rank kept as
    the seed; lower spends more on blocks), ``refit_rounds`` (joint refits; the gain over SVD comes from
    them: seed 0.5 and 25 rounds reached 0.87-0.95 x SVD's error on MiniLM layers, 5-15 x slower).
    """
    budget = check_budget(budget)
    W = W.detach().double().cpu()
    C = C.detach().double().cpu()
    n_out, n_in = W.shape
    r = int(r)
    cap = int(math.floor(float(budget) * n_in * n_out))
    k_svd = svd_rank_for_budget(n_in, n_out, budget, r)
    base = _svd_comps(W, C, k_svd, r, _DAMP)  # step 1, the fallback
    e_base = _cal_err(W, C, base)
    info = {"cal_err_svd": e_base}
    if k_svd == 0 and cap < r * 2:
        out = _pack(base, n_out, n_in, r)
        return (out, info) if return_info else out

    S = _Search(W, C, r, tile)
    k0 = int(math.floor(seed_frac * k_svd))
    comps = _svd_comps(W, C, k0, r, _DAMP)  # step 2, the seed
    EC = (W - _dense(comps, W)) @ S.Cd
    info["passes"] = _greedy_fill(S, comps, EC, cap)
    info["cal_err_greedy"] = _cal_err(W, C, comps)
    comps = _joint_refit(S, comps, EC, refit_rounds)
    e_fit = _cal_err(W, C, comps)  # step 5, the choice
    info.update(
        cal_err_fit=e_fit,
        n_blocks=sum(not c.full for c in comps),
        n_full=sum(c.full for c in comps),
        k_svd=k_svd,
        k0=k0,
        cost=_cost(comps, r),
        cap=cap,
    )
    if _cost(comps, r) > cap:  # cannot happen: every accepted block fits in what is left
        comps = base
    best = comps if e_fit < e_base else base
    info["chose"] = "gblr" if e_fit < e_base else "svd"
    out = _pack(best, n_out, n_in, r)
    return (out, info) if return_info else out


@torch.no_grad()
def refit_kept(
    W: torch.Tensor, b, C: torch.Tensor, mean, kept: torch.Tensor, damp: float = 1e-6, *, cross=None, target_mean=None
):
    """(W_K, b_K): the map from the inputs ``kept`` alone closest to the dense layer, by ridge least squares on
    the inputs' moments: W_K (out x |K|) and b_K minimise E||a_K W_K^T + b_K - (t W^T + b)||^2 for inputs a of
    second moment ``C`` = E[a a^T] and mean ``mean`` = E[a] (``b`` None: no bias, ``mean`` unused; ridge
    ``damp`` x the mean diagonal).  The dense layer's inputs t are a itself, or -- given ``cross`` = E[t a^T]
    and ``target_mean`` = E[t] -- another model's (the dense model's, for the sequential refit).  Float64."""
    W, C, kept = W.double(), C.double(), torch.as_tensor(kept, dtype=torch.long, device=C.device)
    cross = C if cross is None else cross.double()
    k = kept.numel()
    g = C[kept][:, kept]
    rhs = cross[:, kept].t() @ W.t()  # E[a_K (t W^T)^T]
    if b is not None:
        m, b = mean.double(), b.double()
        mt = m if target_mean is None else target_mean.double()
        g = torch.cat([torch.cat([g, m[kept, None]], 1), torch.cat([m[kept], m.new_ones(1)])[None]], 0)
        rhs = torch.cat([rhs + m[kept, None] * b[None], (mt @ W.t() + b)[None]], 0)
    g = g + damp * g.diagonal().mean().clamp_min(1e-30) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    sol = torch.linalg.solve(g, rhs)  # (|K| [+ 1], out)
    return sol[:k].t(), (sol[k] if b is not None else None)
