"""ONNX graph passes that compile GBLRLinear nodes into standard ONNX ops (installs as gblrc.passes)."""
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
from .merge_blocks import MergeBlocks

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # graph-surgeon's info/warning chatter is not for our users

__all__ = ["PASSES", "DEFAULT_PIPELINE", "run_pipeline", "Pass", "PassError", "PassResult", "CostModel"]

PASSES: dict[str, Pass] = {
    p.name: p for p in (MergeBlocks(), ChooseProducts(), DenseFallback(), LowerGBLR(), Cleanup())
}

DEFAULT_PIPELINE: tuple[str, ...] = ("merge-blocks", "choose-products", "dense-fallback", "lower-gblr", "cleanup")


def run_pipeline(model: onnx.ModelProto, names: Sequence[str] | None = None) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the named passes (default: DEFAULT_PIPELINE) in order; unknown names raise PassError."""
    names = list(DEFAULT_PIPELINE if names is None else names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise PassError(unknown[0], f"unknown pass; known passes: {', '.join(PASSES)}")
    return run_passes(model, [PASSES[n] for n in names])
