"""The passes that exist and the pipelines built from them.

    out_model, results = default_pipeline()(model)                  # a Pipeline of configured passes
    out_model, results = timed_pipeline(calibrated, timing)(model)  # gblrc lower --tune's (tune.py)
    passes = passes_from_names(["lower-gblr", "cleanup"])          # names (CLI --passes) -> instances

PASS_TYPES are the registered passes; each builds itself from a PassConfig (``Pass.from_config``).
`passes_from_names` is the one place a pass name is looked up: an unknown name raises UnknownPassError
(a PassError and a ValueError) naming it and listing the known ones.  PASSES holds one default
instance per name (what ``gblrc passes`` lists), DEFAULT_PIPELINE and TIMED_PIPELINE the pipelines'
pass names.
"""

from __future__ import annotations

from typing import Sequence

import onnx

from .base import Pass, PassConfig, PassResult, Pipeline, UnknownPassError
from .choose_products import ChooseProducts
from .cleanup import Cleanup
from .cost_model import DEFAULT_COST_MODEL, CostModel
from .dense_fallback import DenseFallback
from .lower_gblr import LowerGBLR
from .lower_gblr_conv import LowerGBLRConv
from .lower_timed import Measure, TimedLowering
from .merge_blocks import MergeBlocks
from .narrow_pairs import NarrowPairs
from .timing import DEFAULT_TIMING, TimingConfig

__all__ = [
    "PASS_TYPES",
    "PASSES",
    "DEFAULT_PIPELINE",
    "TIMED_PIPELINE",
    "DEFAULT_CONFIG",
    "passes_from_names",
    "default_pipeline",
    "timed_pipeline",
    "run_pipeline",
]

PASS_TYPES: tuple[type[Pass], ...] = (
    NarrowPairs,
    MergeBlocks,
    ChooseProducts,
    DenseFallback,
    LowerGBLRConv,
    LowerGBLR,
    TimedLowering,
    Cleanup,
)
_BY_NAME: dict[str, type[Pass]] = {t.name: t for t in PASS_TYPES}

DEFAULT_CONFIG = PassConfig()  # the default cost model and the default timing config (timing.DEFAULT_TIMING)


def passes_from_names(names: Sequence[str], config: PassConfig = DEFAULT_CONFIG) -> list[Pass]:
    """Pass instances for ``names``, in order, each configured by ``config``; an unknown name raises
    UnknownPassError before any pass is built."""
    names = list(names)
    for n in names:
        if n not in _BY_NAME:
            raise UnknownPassError(n, tuple(_BY_NAME))
    return [_BY_NAME[n].from_config(config) for n in names]


def default_pipeline(cost_model: CostModel = DEFAULT_COST_MODEL) -> Pipeline:
    """The static pipeline: the decision passes, dense-fallback, lower-gblr-conv (GBLRConv nodes -> Conv)
    before lower-gblr (which ensures standard ops only), cleanup; no timing, no onnxruntime."""
    config = PassConfig(cost_model=cost_model)
    return Pipeline(
        t.from_config(config)
        for t in (NarrowPairs, MergeBlocks, ChooseProducts, DenseFallback, LowerGBLRConv, LowerGBLR, Cleanup)
    )


def timed_pipeline(
    cost_model: CostModel = DEFAULT_COST_MODEL, timing: TimingConfig = DEFAULT_TIMING, *, measure: Measure | None = None
) -> Pipeline:
    """The tuned pipeline (autotuning, ``gblrc lower --tune``; TIMED_PIPELINE): the default one with
    dense-fallback dropped (timing decides) and lower-gblr replaced by lower-timed, which times every
    layer's candidate lowerings on ONNX Runtime as ``timing`` says (``measure`` replaces the timing)."""
    config = PassConfig(cost_model=cost_model, timing=timing, measure=measure)
    return Pipeline(
        t.from_config(config) for t in (NarrowPairs, MergeBlocks, ChooseProducts, LowerGBLRConv, TimedLowering, Cleanup)
    )


PASSES: dict[str, Pass] = {t.name: t.from_config(DEFAULT_CONFIG) for t in PASS_TYPES}
DEFAULT_PIPELINE: tuple[str, ...] = default_pipeline().names
TIMED_PIPELINE: tuple[str, ...] = timed_pipeline().names


def run_pipeline(
    model: onnx.ModelProto, names: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run the named passes (default: the default pipeline) in order; unknown names raise UnknownPassError."""
    pipeline = default_pipeline() if names is None else Pipeline(passes_from_names(names))
    return pipeline(model)
