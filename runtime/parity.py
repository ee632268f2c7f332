"""The one parity harness: an ONNX model in ONNX Runtime against reference outputs.

Errors, over all outputs together:

    max_abs = max |a - b|
    max_rel = max |a - b| / max |b|     (b: the reference; one scale per output, not per element,
                                          so that near-zero reference entries do not blow it up)

and the check passes when, for every output, max|a - b| <= atol + rtol * max|b|.  Non-finite
values anywhere, or a shape mismatch, fail the check (errors reported as inf).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .session import make_session, session_provider

__all__ = ["ParityReport", "compare_outputs", "check_parity"]


@dataclass
class ParityReport:
    max_abs: float
    max_rel: float
    ok: bool
    provider: str
    outputs: list = field(default_factory=list, repr=False)  # what the model produced

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity on {self.provider}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g} ({verdict})"
        )


def compare_outputs(
    outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], *, rtol: float, atol: float, provider: str = ""
) -> ParityReport:
    """Errors of ``outputs`` against ``reference`` (see the module docstring for definitions)."""
    if len(outputs) != len(reference):
        return ParityReport(float("inf"), float("inf"), False, provider, list(outputs))
    max_abs = max_rel = 0.0
    ok = True
    for a, b in zip(outputs, reference):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return ParityReport(float("inf"), float("inf"), False, provider, list(outputs))
        if a.size == 0:
            continue
        err = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(b)))
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        ok = ok and err <= atol + rtol * scale
    return ParityReport(max_abs, max_rel, ok, provider, list(outputs))


def check_parity(
    model,
    feeds: Mapping[str, np.ndarray],
    reference: Sequence[np.ndarray],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    optimize: bool = True,
    providers=None,
    log: bool = False,
) -> ParityReport:
    """Run ``model`` (ModelProto, bytes or path) on ``feeds`` in ONNX Runtime and compare every
    output with ``reference`` (same order as the graph outputs)."""
    sess = make_session(model, providers=providers, optimize=optimize, log=log, exact=True)
    outs = sess.run(None, {k: np.asarray(v) for k, v in feeds.items()})
    return compare_outputs(outs, reference, rtol=rtol, atol=atol, provider=session_provider(sess))
