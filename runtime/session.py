"""ONNX Runtime sessions: the CUDA provider when it is usable, else the CPU provider.

Imports onnxruntime and numpy only (no torch, no other part of gblrc), so that a deployed
model needs nothing but this package and ONNX Runtime.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import onnxruntime as ort

__all__ = ["make_session", "default_providers", "session_provider"]

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def default_providers(*, exact: bool = False) -> list[Any]:
    """[CUDA, CPU] when this ONNX Runtime build has the CUDA provider, else [CPU].

    ``exact=True`` turns TF32 off on CUDA (parity checks need full float32 products).
    """
    if CUDA in ort.get_available_providers():
        return [(CUDA, {"use_tf32": "0"}) if exact else CUDA, CPU]
    return [CPU]


def session_provider(session: ort.InferenceSession) -> str:
    """The provider that runs the session's nodes first in priority (the one actually used)."""
    return session.get_providers()[0]


def _model_bytes(model_or_path) -> bytes | str:
    if isinstance(model_or_path, (str, os.PathLike)):
        return os.fspath(model_or_path)
    if isinstance(model_or_path, (bytes, bytearray)):
        return bytes(model_or_path)
    if hasattr(model_or_path, "SerializeToString"):  # onnx.ModelProto, without importing onnx
        return model_or_path.SerializeToString()
    raise TypeError(f"expected an ONNX model, its bytes or a path, got {type(model_or_path).__name__}")


def make_session(
    model_or_path,
    *,
    providers: Sequence[Any] | None = None,
    optimize: bool = True,
    threads: int | None = None,
    log: bool = True,
    exact: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession for ``model_or_path`` (ModelProto, bytes or file path).

    providers: ONNX Runtime providers in priority order (default: :func:`default_providers`).
    optimize: ORT_ENABLE_ALL graph optimisations (else none).  threads: intra-op threads
    (default: ONNX Runtime's choice).  log: print one line on stderr naming the provider used.
    exact: no TF32 on CUDA (used by the parity harness).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3  # errors only: no provider-assignment chatter
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    provs = list(providers) if providers is not None else default_providers(exact=exact)
    sess = ort.InferenceSession(_model_bytes(model_or_path), sess_options=so, providers=provs)
    if log:
        used = session_provider(sess)
        note = (
            ""
            if used == CUDA or CUDA not in [p[0] if isinstance(p, tuple) else p for p in provs]
            else " (CUDA provider requested but unavailable)"
        )
        print(f"gblrc.runtime: ONNX Runtime {ort.__version__} running on {used}{note}", file=sys.stderr)
    return sess
