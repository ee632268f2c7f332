"""PyTorch modules with learnable GBLR structure: GBLRLinear, GBLRConv2d, the Gaudi masks, fitting a
dense weight to a structure (``fit``, ``pursuit``), replacing a model's layers, the Monarch baseline.

May import: torch, numpy, ``gblrc.ir`` and ``gblrc.errors``.
"""
