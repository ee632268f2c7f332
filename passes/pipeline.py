"""The pass registry and the named pipelines: which passes exist and in which order they run."""
from __future__ import annotations

from typing import Sequence

import onnx

from .base import Pass, PassError, PassResult, run_passes
from .choose_products import ChooseProducts
from .cleanup import Cleanup
from .dense_fallback import DenseFallback
from .lower_gblr import LowerGBLR
from .lower_gblr_conv import LowerGBLRConv
from .lower_timed import TimedLowering
from .merge_blocks import MergeBlocks

__all__ = ["PASSES", "DEFAULT_PIPELINE", "TIMED_PIPELINE", "run_pipeline"]

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
