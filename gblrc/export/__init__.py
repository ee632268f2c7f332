"""Compiling: export to ONNX (TorchScript, GBLR symbolics), the lowering driver that runs the passes
and checks parity, fp16 / int8, ONNX inspection and the dense reference, ``gblrc bench``.

May import: ``gblrc.passes``, ``gblrc.runtime``, ``gblrc.io``, ``gblrc.nn``, ``gblrc.ir``,
``gblrc.errors``; not ``gblrc.learn``.
"""
