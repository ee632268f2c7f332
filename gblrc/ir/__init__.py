"""The structure IR: plain frozen data (integer spans, blocks, ranks, factors) and conv geometry,
and the pure functions on it that both sides use: block merging (``merge``) and the cost model's
time estimates (``cost``: what a layer costs as the default lowering compiles it).

Shared by the PyTorch side (``gblrc.nn``, ``gblrc.learn``: the time budget) and the compiler passes
(``gblrc.passes``: merge-blocks and the lowering decisions).
May import: numpy and the standard library only; no torch, no other gblrc subpackage.
"""
