"""The compiler's cost model for the decision passes (the estimates themselves: :mod:`gblrc.ir.cost`,
pure functions on the structure IR that the learning side uses too, ``compress --budget-unit time``;
the structured-or-dense decision: :func:`gblrc.ir.cost.lowering_decision`)."""

from __future__ import annotations

from gblrc.ir.cost import (
    DEFAULT_COST_MODEL,
    DENSE_MARGIN,
    STACKED_MARGIN,
    TOKENS,
    CostModel,
    Segment,
    dense_by_flops,
    is_full_width,
    lowering_decision,
    plan_segments,
    segmented_cost,
)

__all__ = [
    "CostModel",
    "DEFAULT_COST_MODEL",
    "TOKENS",
    "DENSE_MARGIN",
    "STACKED_MARGIN",
    "Segment",
    "plan_segments",
    "segmented_cost",
    "is_full_width",
    "dense_by_flops",
    "lowering_decision",
    "CostModelPass",
]


class CostModelPass:
    """Mixin for decision passes over valid GBLR nodes that consult a cost model."""

    requires = frozenset({"gblr-nodes-valid"})
    ensures = frozenset({"gblr-nodes-valid"})

    def __init__(self, model: CostModel = DEFAULT_COST_MODEL):
        self.model = model

    @classmethod
    def from_config(cls, config):
        """The pass with ``config.cost_model`` (a gblrc.passes.base.PassConfig)."""
        return cls(config.cost_model)
