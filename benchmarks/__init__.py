"""gblrc's benchmarks: run each from the repository root as ``.venv/bin/python -m benchmarks.NAME [options]``
(``--help`` says what it measures).  Speed is always a ratio against the dense baseline of the same run;
results files start with :func:`benchmarks.common.provenance`."""
