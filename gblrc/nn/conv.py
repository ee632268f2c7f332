"""GBLRConv2d: a 2-D convolution whose kernel, as the matrix W (out x in*kh*kw), is a GBLR matrix.

``nn.Conv2d.weight.reshape(out, -1)`` is that matrix (column c*kh*kw + i*kw + j); a convolution applies
it to every receptive field (the columns of ``F.unfold(x)``).  GBLRConv2d is a :class:`GBLRLinear` with
``in_features = in_channels*kh*kw`` and ``out_features = out_channels``, so the masks, initialisation,
trainer, budget and structure IR work on it unchanged; only the forward (a convolution) and the cost
differ.  Cost: the matrix's multiply-adds per vector times the number of output positions H_out*W_out
(the ``positions`` buffer, recorded by every forward; 1 before the first one), so that the global cost
ratio of a model mixing convolutions and linear layers counts real multiply-adds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gblrc.ir.conv import ConvGeometry
from gblrc.nn.layer import GBLRLinear

__all__ = ["GBLRConv2d", "conv_as_linear", "conv_geometry", "conv_pads", "unsupported_conv"]


def _pair(v, what: str) -> tuple[int, int]:
    t = tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
    return t


def _pads(padding, kernel, dilation, stride) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, a pair, a 4-tuple, 'valid' or 'same' (torch's rule)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            th, tw = (d * (k - 1) for d, k in zip(dilation, kernel))
            return (th // 2, tw // 2, th - th // 2, tw - tw // 2)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    p = tuple(int(x) for x in padding) if isinstance(padding, (tuple, list)) else (int(padding),) * 2
    if len(p) == 2:
        p = p + p
    if len(p) != 4 or min(p) < 0:
        raise ValueError(f"padding must be non-negative: an int, a pair or (top, left, bottom, right), got {padding!r}")
    return p


def conv_pads(conv: nn.Module) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) zero padding of an nn.Conv2d or a GBLRConv2d."""
    if isinstance(conv, GBLRConv2d):
        return conv.padding
    return _pads(
        conv.padding,
        _pair(conv.kernel_size, "kernel_size"),
        _pair(conv.dilation, "dilation"),
        _pair(conv.stride, "stride"),
    )


def unsupported_conv(conv: nn.Module) -> str | None:
    """Why ``conv`` (an nn.Conv2d) cannot become a GBLRConv2d, or None when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 convolutions are supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is supported)"
    try:
        conv_pads(conv)
    except ValueError as e:
        return str(e)
    return None


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Keyword arguments of GBLRConv2d for the geometry of ``conv`` (ValueError when unsupported)."""
    why = unsupported_conv(conv)
    if why is not None:
        raise ValueError(f"cannot make a GBLR convolution from this layer: {why}")
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
    }


def conv_as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The matrix of ``conv`` as an nn.Linear (in*kh*kw -> out), weight ``conv.weight.reshape(out, -1)``."""
    conv_geometry(conv)  # validates
    w = conv.weight.detach()
    lin = nn.Linear(w[0].numel(), w.shape[0], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(w.shape[0], -1))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


class GBLRConv2d(GBLRLinear):
    """y = conv2d(x, W.reshape(out, in, kh, kw), b) with W a GBLR matrix (out x in*kh*kw).

    Geometry as nn.Conv2d (``groups`` must be 1; ``padding`` an int, a pair, (top, left, bottom, right),
    'valid' or 'same'); ``num_components``, ``rank_per_component``, ``bias`` as :class:`GBLRLinear`.
    The forward runs V as a convolution with K*r output channels then U as a 1x1 convolution when that
    is cheaper than the dense kernel, else one convolution with the dense kernel ``conv_weight()``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        num_components: int | None = None,
        rank_per_component: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        if groups != 1:
            raise ValueError(f"GBLRConv2d supports only groups=1 convolutions, got groups={groups}")
        kernel = _pair(kernel_size, "kernel_size")
        stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        pads = _pads(padding, kernel, dilation, stride)
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"GBLRConv2d needs positive channel counts, got ({in_channels}, {out_channels})")
        super().__init__(
            int(in_channels) * kernel[0] * kernel[1],
            int(out_channels),
            num_components=num_components,
            rank_per_component=rank_per_component,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.dilation, self.padding = kernel, stride, dilation, pads
        self.groups = 1
        self.register_buffer("positions", torch.tensor(1, dtype=torch.long, device=device))

    # ------------------------------------------------------------ geometry
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.kernel_size, self.stride, self.padding, self.dilation)

    def geometry_kwargs(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
        }

    def conv_weight(self) -> torch.Tensor:
        """The dense kernel (out, in, kh, kw) this layer applies in its current mode."""
        return self.dense_weight().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    # ------------------------------------------------------------- forward
    def _conv(self, x, w, b, stride, dilation):
        t, l, bo, r = self.padding
        if (t, l) == (bo, r):
            return F.conv2d(x, w, b, stride, (t, l), dilation)
        return F.conv2d(F.pad(x, (l, r, t, bo)), w, b, stride, 0, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.factors()  # (out, K r), (K r, in kh kw)
        R, n_in, n_out = V.shape[0], self.in_features, self.out_features
        if R * (n_in + n_out) < n_in * n_out:
            z = self._conv(x, V.reshape(R, self.in_channels, *self.kernel_size), None, self.stride, self.dilation)
            y = F.conv2d(z, U[:, :, None, None], self.bias)
        else:
            w = (U @ V).reshape(n_out, self.in_channels, *self.kernel_size)
            y = self._conv(x, w, self.bias, self.stride, self.dilation)
        self.positions.fill_(int(y.shape[-2]) * int(y.shape[-1]))
        return y

    # ---------------------------------------------------------------- cost
    def flops(self) -> int:
        """Exact multiply-adds of one forward per example: per-vector cost x output positions."""
        return super().flops() * int(self.positions)

    def product_flops(self) -> int:
        return super().product_flops() * int(self.positions)

    def dense_flops(self) -> int:
        return super().dense_flops() * int(self.positions)

    def cost(self) -> torch.Tensor:
        return super().cost() * float(self.positions)

    # -------------------------------------------------------- construction
    def new_like(self, *, num_components: int) -> "GBLRConv2d":
        """An empty layer with this geometry, sizes, dtype, device and recorded positions."""
        p = self.U
        new = GBLRConv2d(
            **self.geometry_kwargs(),
            num_components=num_components,
            rank_per_component=self.rank_per_component,
            bias=self.bias is not None,
            device=p.device,
            dtype=p.dtype,
        )
        new.positions.copy_(self.positions)
        return new

    @classmethod
    @torch.no_grad()
    def from_gblr(
        cls, layer: GBLRLinear, *, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1
    ) -> "GBLRConv2d":
        """A GBLRConv2d with the factors and structure of ``layer`` (in_features = in*kh*kw)."""
        kh, kw = _pair(kernel_size, "kernel_size")
        if layer.in_features != in_channels * kh * kw or layer.out_features != out_channels:
            raise ValueError(
                f"a {layer.out_features}x{layer.in_features} GBLR matrix is not the kernel of a "
                f"{in_channels}->{out_channels} {kh}x{kw} convolution"
            )
        p = layer.U
        new = cls(
            in_channels,
            out_channels,
            (kh, kw),
            stride,
            padding,
            dilation,
            num_components=layer.num_components,
            rank_per_component=layer.rank_per_component,
            bias=layer.bias is not None,
            device=p.device,
            dtype=p.dtype,
        )
        for name in ("U", "V", "widths", "locations", "sigma") + (("bias",) if layer.bias is not None else ()):
            getattr(new, name).copy_(getattr(layer, name))
        if isinstance(layer, GBLRConv2d):
            new.positions.copy_(layer.positions)
        for attr in ("tile", "hard_forward", "frozen_structure", "family"):  # instance overrides of the class defaults
            if attr in layer.__dict__:
                setattr(new, attr, layer.__dict__[attr])
        return new.train(layer.training)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, budget: float, *, fit=None, **kwargs) -> "GBLRConv2d":
        """A GBLR convolution (eval mode) fitted to ``conv``'s kernel matrix at ``budget`` x its dense multiply-adds.

        ``fit`` (default :func:`gblrc.nn.layer.fit_dense`; e.g. :func:`gblrc.nn.layer.svd_layer`) is applied to the
        nn.Linear view of the kernel (:func:`conv_as_linear`) with ``kwargs``.
        """
        from gblrc.nn.layer import fit_dense

        geo = conv_geometry(conv)
        g = (fit or fit_dense)(conv_as_linear(conv), budget, **kwargs)
        return cls.from_gblr(g, **geo).to(device=conv.weight.device).eval()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, budget: float, **kwargs) -> "GBLRConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"GBLRConv2d.from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        return cls.from_conv(conv, budget, **kwargs)

    def extra_repr(self) -> str:
        pads = self.padding if self.padding[:2] != self.padding[2:] else self.padding[:2]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={pads}, dilation={self.dilation}, num_components={self.num_components}, "
            f"rank_per_component={self.rank_per_component}, bias={self.bias is not None}"
        )
