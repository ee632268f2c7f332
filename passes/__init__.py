"""ONNX graph passes that compile GBLRLinear nodes into standard ONNX ops (installs as gblrc.passes).

    out_model, results = run_pipeline(model)              # DEFAULT_PIPELINE
    out_model, results = run_pipeline(model, ["lower-gblr", "cleanup"])

Decision passes rewrite GBLRLinear nodes IR -> IR (merge-blocks, choose-products), dense-fallback
and the lowering passes (lower-gblr by the static cost model, lower-timed by timing ORT) replace them
by standard ops reusing the original output tensor, cleanup folds, sorts and infers shapes.  Each
pass declares the graph properties it requires/ensures/invalidates; run_pipeline tracks them and a
violated precondition raises PassError("pass '<name>': ...").
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassError, PassResult
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .pipeline import DEFAULT_PIPELINE, PASSES, TIMED_PIPELINE, run_pipeline
from .tune import TuneConfig, run_tuned_pipeline, tuned_pipeline

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # graph-surgeon's info/warning chatter is not for our users

__all__ = [
    "PASSES", "DEFAULT_PIPELINE", "TIMED_PIPELINE", "run_pipeline", "Pass", "PassError", "PassResult", "CostModel",
    "DEFAULT_COST_MODEL", "TuneConfig", "run_tuned_pipeline", "tuned_pipeline",
]
