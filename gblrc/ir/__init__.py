"""The structure IR: plain frozen data (integer spans, blocks, ranks, factors) and conv geometry.

Shared by the PyTorch side (``gblrc.nn``) and the compiler passes (``gblrc.passes``).
May import: numpy and the standard library only; no torch, no other gblrc subpackage.
"""
