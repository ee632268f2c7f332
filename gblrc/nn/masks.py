"""Gaudi masks (docs/design.md §1): frequency-domain masks differentiable in width and location."""

from __future__ import annotations

import math

import torch

_EPS = 1e-6  # tolerance for "under one element" on the 1/n grid

__all__ = ["gaudi_mask", "boxcar_mask", "quantize_ste", "hard_widths", "hard_locations"]


def gaudi_mask(width: torch.Tensor, location: torch.Tensor, n: int, sigma: float | None = None) -> torch.Tensor:
    """Masks of length ``n`` for each (width, location) pair.

    ``width`` and ``location`` are fractions of the axis length with the same
    shape (any leading shape, e.g. (K,)); the result has that shape plus (n,).
    The spectrum for f = 0..n//2 is

        M[f] = w sinc(f w) / sinc(f/n) exp(-f^2 / (2 sigma^2)) exp(i(-2 pi f l + pi f (1/n - w)))

    and the mask is ``irfft(M, n, norm="forward")``.  With ``sigma=None`` (no
    Gaussian factor) and w*n, l*n integers it is exactly the cyclic boxcar
    m[i] = 1 if (i - l n) mod n < w n else 0.  Differentiable in both inputs.
    """
    width = torch.as_tensor(width)
    location = torch.as_tensor(location, dtype=width.dtype, device=width.device)
    if not width.is_floating_point():
        width = width.double()
        location = location.double()
    if n < 1:
        raise ValueError(f"mask length must be positive, got {n}")
    f = torch.arange(n // 2 + 1, dtype=width.dtype, device=width.device)
    w = width.unsqueeze(-1)
    l = location.unsqueeze(-1)
    amp = w * torch.sinc(f * w) / torch.sinc(f / n)
    if sigma is not None:
        amp = amp * torch.exp(-(f * f) / (2.0 * float(sigma) ** 2))
    phase = -2.0 * math.pi * f * l + math.pi * f * (1.0 / n - w)
    spec = torch.complex(amp * torch.cos(phase), amp * torch.sin(phase))
    return torch.fft.irfft(spec, n=n, norm="forward")


def _grid(elements: torch.Tensor, n: int, step: int) -> torch.Tensor:
    """Round a position or length in elements to a multiple of ``step`` (at most n; n itself stays n)."""
    if step <= 1:
        return torch.round(elements)
    q = (torch.round(elements / step) * step).clamp_max(n)
    return torch.where(elements >= n - 0.5, torch.full_like(q, n), q)


def quantize_ste(x: torch.Tensor, n: int, *, min_one: bool = False, step: int = 1) -> torch.Tensor:
    """Round fractions to the 1/n grid (multiples of ``step`` elements) in the forward pass; identity
    gradient (straight-through).

    With ``min_one`` values under 1/n become 0 (widths under one element are zero).
    """
    q = _grid(x.detach() * n, n, step) / n
    if min_one:
        q = torch.where(x.detach() * n < 1.0 - _EPS, torch.zeros_like(q), q)
    return x + (q - x).detach()


def hard_widths(width: torch.Tensor, n: int, step: int = 1) -> torch.Tensor:
    """Integer widths in elements: round(w n) (to a multiple of ``step``) clipped to [0, n]; widths
    under 1/n are zero."""
    w = width.detach().double() * n
    k = _grid(w, n, step).clamp(0, n)
    return torch.where(w < 1.0 - _EPS, torch.zeros_like(k), k).long()


def hard_locations(location: torch.Tensor, n: int, step: int = 1) -> torch.Tensor:
    """Integer start positions in elements: round(l n) (to a multiple of ``step``) mod n."""
    return torch.remainder(_grid(location.detach().double() * n, n, step), n).long()


def boxcar_mask(
    width: torch.Tensor, location: torch.Tensor, n: int, dtype=torch.float32, step: int = 1
) -> torch.Tensor:
    """Hard cyclic boxcar masks from fractional widths/locations (eval mode)."""
    wi = hard_widths(width, n, step)
    li = hard_locations(location, n, step)
    i = torch.arange(n, device=width.device)
    return (torch.remainder(i - li.unsqueeze(-1), n) < wi.unsqueeze(-1)).to(dtype)
