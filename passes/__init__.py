"""ONNX graph passes that compile GBLRLinear nodes into standard ONNX ops (installs as gblrc.passes).

    out_model, results = default_pipeline()(model)        # a Pipeline (PassManager) of configured passes
    out_model, results = Pipeline([LowerGBLR(cost_model), Cleanup()])(model)
    out_model, results = run_pipeline(model, ["lower-gblr", "cleanup"])   # by name (passes_from_names)

Decision passes rewrite GBLRLinear nodes IR -> IR (merge-blocks, choose-products), dense-fallback
and the lowering passes (lower-gblr by the static cost model, lower-timed by timing ORT) replace them
by standard ops reusing the original output tensor, cleanup folds, sorts and infers shapes.  Each
pass declares the graph properties it requires/ensures/invalidates; a Pipeline tracks them and a
violated precondition raises PassError("pass '<name>': ...").  Whether a layer is lowered structured
or dense is gblrc.ir.cost.lowering_decision's to say.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassConfig, PassError, PassManager, PassResult, Pipeline, UnknownPassError
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .pipeline import (
    DEFAULT_PIPELINE,
    PASS_TYPES,
    PASSES,
    TIMED_PIPELINE,
    default_pipeline,
    passes_from_names,
    run_pipeline,
    timed_pipeline,
)
from .timing import DEFAULT_TIMING, TimingConfig
from .tune import TuneConfig, run_tuned_pipeline, tuned_pipeline

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # graph-surgeon's info/warning chatter is not for our users

__all__ = [
    "PASSES",
    "PASS_TYPES",
    "DEFAULT_PIPELINE",
    "TIMED_PIPELINE",
    "run_pipeline",
    "Pass",
    "PassError",
    "UnknownPassError",
    "PassResult",
    "PassConfig",
    "Pipeline",
    "PassManager",
    "passes_from_names",
    "default_pipeline",
    "timed_pipeline",
    "CostModel",
    "DEFAULT_COST_MODEL",
    "TimingConfig",
    "DEFAULT_TIMING",
    "TuneConfig",
    "run_tuned_pipeline",
    "tuned_pipeline",
]
