"""The convolution geometry of a GBLR Conv2d layer and its ONNX serialisation (numpy only).

A GBLR convolution is the GBLR matrix W (out x in*kh*kw) of :mod:`gblrc.ir.structure` applied to every
receptive field of the input: the dense kernel is ``W.reshape(out, in, kh, kw)`` (column index
c*kh*kw + i*kw + j, the order of ``torch.nn.Conv2d.weight.reshape(out, -1)`` and of ``F.unfold``).

ONNX: one ``gblrc::GBLRConv`` node with inputs X (N, in, H, W), U_flat, V_flat and an optional bias,
exactly like ``gblrc::GBLRLinear`` (:func:`gblrc.ir.structure.to_onnx_attributes` + ``pack_factors``),
plus the standard ONNX Conv attributes ``kernel_shape``, ``strides``, ``pads`` (top, left, bottom,
right) and ``dilations``.  Depends on numpy and the structure IR only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gblrc.ir.structure import Structure, StructureError, from_onnx_attributes, to_onnx_attributes

__all__ = ["ONNX_CONV_OP", "CONV_ATTRIBUTES", "ConvGeometry", "conv_to_onnx_attributes", "conv_from_onnx_attributes"]

ONNX_CONV_OP = "GBLRConv"
CONV_ATTRIBUTES = ("kernel_shape", "strides", "pads", "dilations")


def _pair(v, what: str) -> tuple[int, int]:
    t = tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))
    if len(t) != 2:
        raise StructureError(f"{what} needs 2 values, got {list(t)}")
    return t


@dataclass(frozen=True)
class ConvGeometry:
    """kernel (kh, kw), strides (sh, sw), pads (top, left, bottom, right), dilations (dh, dw)."""

    kernel_shape: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    def __post_init__(self):
        object.__setattr__(self, "kernel_shape", _pair(self.kernel_shape, "kernel_shape"))
        object.__setattr__(self, "strides", _pair(self.strides, "strides"))
        object.__setattr__(self, "dilations", _pair(self.dilations, "dilations"))
        p = tuple(int(x) for x in self.pads)
        if len(p) == 2:
            p = p + p
        if len(p) != 4:
            raise StructureError(f"pads needs 4 values (top, left, bottom, right), got {list(p)}")
        object.__setattr__(self, "pads", p)
        if min(self.kernel_shape + self.strides + self.dilations) < 1 or min(p) < 0:
            raise StructureError(f"invalid convolution geometry {self}")

    @property
    def kernel_size(self) -> int:
        return self.kernel_shape[0] * self.kernel_shape[1]

    def in_channels(self, in_features: int) -> int:
        """Input channels of a layer whose matrix has ``in_features`` columns."""
        if in_features % self.kernel_size:
            raise StructureError(
                f"in_features {in_features} is not a multiple of the kernel size "
                f"{self.kernel_shape[0]}x{self.kernel_shape[1]}"
            )
        return in_features // self.kernel_size

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_shape, self.strides, self.dilations
        t, l, b, r = self.pads
        return (h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1


def conv_to_onnx_attributes(s: Structure, g: ConvGeometry) -> dict[str, object]:
    """The GBLRLinear attributes of ``s`` plus the Conv attributes of ``g``."""
    g.in_channels(s.in_features)  # validates
    return {
        **to_onnx_attributes(s),
        "kernel_shape": list(g.kernel_shape),
        "strides": list(g.strides),
        "pads": list(g.pads),
        "dilations": list(g.dilations),
    }


def conv_from_onnx_attributes(attrs: dict) -> tuple[Structure, ConvGeometry]:
    """Inverse of :func:`conv_to_onnx_attributes`; validates the result."""
    try:
        g = ConvGeometry(
            tuple(attrs["kernel_shape"]),
            tuple(attrs.get("strides", (1, 1))),
            tuple(attrs.get("pads", (0, 0, 0, 0))),
            tuple(attrs.get("dilations", (1, 1))),
        )
    except KeyError as e:
        raise StructureError(f"missing GBLRConv attribute {e}") from None
    except TypeError as e:
        raise StructureError(f"invalid GBLRConv attribute: {e}") from None
    s = from_onnx_attributes({k: v for k, v in attrs.items() if k not in CONV_ATTRIBUTES})
    g.in_channels(s.in_features)
    return s, g
