"""Models, data and files in and out: reading user models and data files, saving and loading compressed
models (``.gblr.pt``, old module paths included), atomic writes, the offline zoo (MiniLM, text).

May import: ``gblrc.nn``, ``gblrc.ir``, ``gblrc.errors`` (and torch, transformers).
"""
