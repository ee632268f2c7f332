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

from typing import Sequence

import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassError, PassResult, run_passes
from .choose_products import ChooseProducts
from .cleanup import Cleanup
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .dense_fallback import DenseFallback
from .lower_gblr import LowerGBLR
from .lower_gblr_conv import LowerGBLRConv
from .lower_timed import TimedLowering
from .merge_blocks import MergeBlocks
from .tune import TuneConfig, run_tuned_pipeline, tuned_pipeline

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # graph-surgeon's info/warning chatter is not for our users

__all__ = [
    "PASSES", "DEFAULT_PIPELINE", "TIMED_PIPELINE", "run_pipeline", "Pass", "PassError", "PassResult", "CostModel",
    "DEFAULT_COST_MODEL", "TuneConfig", "run_tuned_pipeline", "tuned_pipeline",
]

PASSES: dict[str, Pass] = {
    p.name: p for p in (MergeBlocks(), ChooseProducts(), DenseFallback(), LowerGBLRConv(), LowerGBLR(), TimedLowering(),
                        Cleanup())
}

# lower-gblr-conv (GBLRConv nodes -> Conv) runs before lower-gblr, which ensures standard ops only.
DEFAULT_PIPELINE: tuple[str, ...] = ("merge-blocks", "choose-products", "dense-fallback", "lower-gblr-conv", "lower-gblr",
                                     "cleanup")

# Autotuning: the lowering of every layer is chosen by timing it on ONNX Runtime CPU (slower, needs onnxruntime).
TIMED_PIPELINE: tuple[str, ...] = ("merge-blocks", "choose-products", "lower-gblr-conv", "lower-timed", "cleanup")


def run_pipeline(model: onnx.ModelProto, names: Sequence[str] | None = None) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the named passes (default: DEFAULT_PIPELINE) in order; unknown names raise PassError."""
    names = list(DEFAULT_PIPELINE if names is None else names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise PassError(unknown[0], f"unknown pass; known passes: {', '.join(PASSES)}")
    return run_passes(model, [PASSES[n] for n in names])
