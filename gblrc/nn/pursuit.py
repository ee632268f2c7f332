"""Greedy block pursuit: fit a sum of tiled block-low-rank terms to a dense weight under a cost cap.

Candidate structures are *families*: a cyclic partition of the rows into p intervals and of the
columns into q intervals (p, q from ``scales``), optionally shifted by half a tile so that blocks
wrapping around the end of an axis are candidates too.  A family's term B_f is block-low-rank: tile t
carries k_t components of rank r (cost r * (|rows_t| + |cols_t|) each, exactly GBLRLinear.flops()).

    R = W - sum_f B_f                      (residual)
    round: for every family f, the tile spectra of P_f = R + B_f tell the exact error after refitting
           B_f with k' >= k components (Eckart-Young per tile, tiles are disjoint); pick the family with
           the best error decrease per added cost for a chunk of the budget; refit it, update R.
    backfit: with the allocation fixed, refit every family in turn to its partial residual.

Every step is an exact minimisation over one family's factors, so ||R|| never increases.  Seeding the
(1, 1) family with the truncated-SVD rank makes the result never worse than truncated SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Family", "make_families", "pursuit"]


def _partition(n: int, parts: int, shift: int) -> list[tuple[int, int]]:
    """(start, length) of `parts` cyclic intervals covering 0..n-1, sizes differing by at most 1."""
    base, extra = divmod(n, parts)
    out, s = [], 0
    for i in range(parts):
        ln = base + (1 if i < extra else 0)
        out.append(((s + shift) % n, ln))
        s += ln
    return out


def _index(parts: list[tuple[int, int]], n: int, device) -> torch.Tensor:
    """(len(parts), max length) cyclic indices, padded with n (a zero row/column of the padded matrix)."""
    m = max(ln for _, ln in parts)
    idx = torch.full((len(parts), m), n, dtype=torch.long, device=device)
    for i, (s, ln) in enumerate(parts):
        idx[i, :ln] = (s + torch.arange(ln, device=device)) % n
    return idx


@dataclass
class Family:
    rows: list[tuple[int, int]]  # (start, length) per row tile
    cols: list[tuple[int, int]]
    ridx: torch.Tensor  # (p, a) padded cyclic indices
    cidx: torch.Tensor  # (q, b)
    cost: torch.Tensor  # (p, q) cost of one rank-r component in each tile
    kmax: torch.Tensor  # (p, q) most components per tile
    alloc: torch.Tensor  # (p, q) components allocated
    B: torch.Tensor | None = None  # current dense term (None while nothing is allocated)
    factors: tuple | None = None  # (L, Rt) of the last refit, see refit()

    def tiles(self, P: torch.Tensor) -> torch.Tensor:
        n_out, n_in = P.shape
        Pp = torch.zeros(n_out + 1, n_in + 1, dtype=P.dtype, device=P.device)
        Pp[:n_out, :n_in] = P
        return Pp[self.ridx[:, None, :, None], self.cidx[None, :, None, :]]

    def energies(self, T: torch.Tensor) -> torch.Tensor:
        """(p, q, min(a, b)) squared singular values of each tile, decreasing."""
        a, b = T.shape[-2:]
        G = T @ T.transpose(-1, -2) if a <= b else T.transpose(-1, -2) @ T
        return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0)

    def refit(self, P: torch.Tensor, r: int) -> torch.Tensor:
        """Best term for the allocation on P (truncated SVD per tile, via the smaller Gram matrix).

        Stores balanced factors (L (p, q, a, m), Rt (p, q, m, b)), zero beyond each tile's allocation,
        with L @ Rt the truncated tiles; returns the dense term B.
        """
        T = self.tiles(P)
        a, b = T.shape[-2:]
        keep = (torch.arange(min(a, b), device=P.device) < (self.alloc * r)[..., None]).to(T.dtype)
        if a <= b:
            E = torch.linalg.eigh(T @ T.transpose(-1, -2))[1].flip(-1) * keep[..., None, :]
            L, Rt = E, E.transpose(-1, -2) @ T  # (a, m) orthonormal, (m, b) = S V^T
            s = Rt.norm(dim=-1)  # singular values
        else:
            E = torch.linalg.eigh(T.transpose(-1, -2) @ T)[1].flip(-1) * keep[..., None, :]
            L, Rt = T @ E, E.transpose(-1, -2)  # (a, m) = U S, (m, b) orthonormal
            s = L.norm(dim=-2)
        d = torch.where(s > 0, s, torch.ones_like(s)).sqrt()
        if a <= b:
            L, Rt = L * d[..., None, :], Rt / d[..., :, None]
        else:
            L, Rt = L / d[..., None, :], Rt * d[..., :, None]
        self.factors = (L, Rt)
        n_out, n_in = P.shape
        Bp = torch.zeros(n_out + 1, n_in + 1, dtype=P.dtype, device=P.device)
        Bp[self.ridx[:, None, :, None], self.cidx[None, :, None, :]] = L @ Rt
        self.B = Bp[:n_out, :n_in].clone()
        return self.B


def make_families(n_out: int, n_in: int, r: int, scales=(1, 2, 4), shift: bool = True, device=None) -> list[Family]:
    fams, seen = [], set()
    for p in scales:
        for q in scales:
            if p > n_out or q > n_in or n_out // p < r or n_in // q < r:
                continue
            shifts = [(0, 0)]
            if shift and (p > 1 or q > 1):
                shifts.append(((n_out // p) // 2 if p > 1 else 0, (n_in // q) // 2 if q > 1 else 0))
            for sr, sc in shifts:
                rows, cols = _partition(n_out, p, sr), _partition(n_in, q, sc)
                key = (tuple(rows), tuple(cols))
                if key in seen:
                    continue
                seen.add(key)
                a = torch.tensor([ln for _, ln in rows], device=device)
                b = torch.tensor([ln for _, ln in cols], device=device)
                cost = r * (a[:, None] + b[None, :])
                kmax = torch.minimum(a[:, None], b[None, :]) // r
                fams.append(
                    Family(
                        rows,
                        cols,
                        _index(rows, n_out, device),
                        _index(cols, n_in, device),
                        cost,
                        kmax,
                        torch.zeros_like(cost),
                    )
                )
    return fams


def _proposal(f: Family, ev: torch.Tensor, r: int, chunk: int, left: int):
    """Greedy allocation increase within `chunk` cost, best energy per cost first: (new alloc, added cost)."""
    p, q, m = ev.shape
    kmax = int(f.kmax.max())
    if kmax == 0:
        return None
    ev = torch.nn.functional.pad(ev, (0, kmax * r - m)) if kmax * r > m else ev[..., : kmax * r]
    g = ev.reshape(p, q, kmax, r).sum(-1)  # energy per component
    j = torch.arange(kmax, device=ev.device)
    ok = (j >= f.alloc[..., None]) & (j < f.kmax[..., None])
    ratio = torch.where(ok, g / f.cost[..., None], torch.full_like(g, -1.0)).flatten()
    order = torch.argsort(ratio, descending=True)
    order = order[ratio[order] > 0]
    if order.numel() == 0:
        return None
    cst = f.cost[..., None].expand(p, q, kmax).flatten()[order]
    n = int((torch.cumsum(cst, 0) <= chunk).sum())
    if n > 0:
        take, added = order[:n], int(cst[:n].sum())
    else:  # the chunk is smaller than one component: take the best one that fits what is left
        fits = (cst <= left).nonzero().flatten()
        if fits.numel() == 0:
            return None
        take, added = order[fits[:1]], int(cst[fits[0]])
    add = torch.bincount(take // kmax, minlength=p * q).reshape(p, q)
    return f.alloc + add, added


def pursuit(
    W: torch.Tensor, cap: int, r: int, *, scales=(1, 2, 4), shift=True, rounds=8, sweeps=2, seed_rank: int = 0
) -> tuple[list[Family], float]:
    """Fit W (float64) under total cost <= cap.  Returns (families, squared residual norm).

    ``seed_rank``: components of the (1, 1) family allocated (and fitted) before the greedy rounds.
    """
    n_out, n_in = W.shape
    fams = make_families(n_out, n_in, r, scales, shift, W.device)
    R = W.clone()
    used = 0
    if seed_rank > 0:
        f0 = next((f for f in fams if len(f.rows) == 1 and len(f.cols) == 1), None)
        if f0 is None:
            raise ValueError("seed_rank needs the untiled family: include 1 in scales")
        f0.alloc.fill_(seed_rank)
        R = R - f0.refit(R, r)
        used = int((f0.alloc * f0.cost).sum())
    chunk = max(1, math.ceil((cap - used) / max(rounds, 1)))
    for _ in range(rounds + 8):
        left = cap - used
        if left <= 0:
            break
        rr = float((R * R).sum())
        best = None
        for f in fams:
            P = R if f.B is None else R + f.B
            ev = f.energies(f.tiles(P))
            prop = _proposal(f, ev, r, min(chunk, left), left)
            if prop is None:
                continue
            alloc, added = prop
            j = torch.arange(ev.shape[-1], device=ev.device)
            new_err = float((P * P).sum()) - float((ev * (j < (alloc * r)[..., None])).sum())
            score = (rr - new_err) / added
            if best is None or score > best[0]:
                best = (score, f, alloc, added)
        if best is None:
            break
        _, f, alloc, added = best
        P = R if f.B is None else R + f.B
        f.alloc = alloc
        R = P - f.refit(P, r)
        used += added
    for _ in range(sweeps):
        for f in fams:
            if f.B is None:
                continue
            P = R + f.B
            R = P - f.refit(P, r)
    return [f for f in fams if f.B is not None and int(f.alloc.sum()) > 0], float((R * R).sum())
