"""Learning: everything that needs data or gradients. Calibration and whitened init refits, sensitivity
allocation, the Gaudi/proximal trainer and its objective, ``compress`` (as named stages), the
fidelity (the one measure of agreement with the dense model) and the compression report.  Learning ends here;
compiling is ``gblrc.export``.

May import: ``gblrc.io``, ``gblrc.nn``, ``gblrc.ir``, ``gblrc.errors``; not ``gblrc.export`` or the passes.
"""
