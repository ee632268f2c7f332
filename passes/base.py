"""Pass infrastructure: a pass maps an onnx-graphsurgeon graph to a PassResult.

A Pipeline (alias PassManager, as onnx_ir's ``PassManager([...])``) holds configured Pass instances and
runs them in order.  Ordering lives in what each pass requires and ensures (graph properties), checked
by `run_passes`; errors name the pass that failed.  A pass that takes configuration (cost model,
timing settings) gets it in its constructor; ``Pass.from_config(PassConfig)`` builds one from the
configuration a pipeline shares (gblrc.passes.pipeline builds the pipelines and the passes by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gblrc.ir.conv import ONNX_CONV_OP, ConvGeometry, conv_from_onnx_attributes
from gblrc.ir.cost import DEFAULT_COST_MODEL, CostModel
from gblrc.ir.structure import (
    ONNX_DOMAIN,
    ONNX_OP,
    GBLRWeights,
    StructureError,
    from_onnx_attributes,
    unpack_factors,
)

from .timing import DEFAULT_TIMING, TimingConfig

__all__ = [
    "PassResult",
    "PassError",
    "UnknownPassError",
    "PassConfig",
    "Pass",
    "Pipeline",
    "PassManager",
    "gblr_nodes",
    "read_gblr_node",
    "gblr_conv_nodes",
    "read_gblr_conv_node",
    "PROPERTIES",
    "run_passes",
    "established_properties",
]


class PassError(RuntimeError):
    """A pass failed or its precondition does not hold; the message names the pass."""

    def __init__(self, pass_name: str, message: str):
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class UnknownPassError(PassError, ValueError):
    """A pass name that is not registered (gblrc.passes.pipeline.passes_from_names raises it)."""

    def __init__(self, pass_name: str, known: Sequence[str]):
        self.pass_name, self.known = pass_name, tuple(known)
        RuntimeError.__init__(
            self, f"unknown pass {pass_name!r}; choose from: {', '.join(self.known)} (see: gblrc passes)"
        )


@dataclass(frozen=True)
class PassConfig:
    """What configured passes share: the cost model of the decision and lowering passes, and how
    lower-timed times (``measure`` replaces its timing: tests)."""

    cost_model: CostModel = DEFAULT_COST_MODEL
    timing: TimingConfig = DEFAULT_TIMING
    measure: Callable | None = None


@dataclass
class PassResult:
    graph: gs.Graph
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    name: str = ""  # the pass that produced it (filled in by Pass.__call__)
    details: list[dict] = field(default_factory=list)  # per-node records, e.g. lower-timed's measured times


def gblr_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == ONNX_OP and (n.domain or "") == ONNX_DOMAIN]


def read_gblr_node(node: gs.Node) -> GBLRWeights:
    """The IR of a GBLRLinear node; raises StructureError if it is malformed."""
    if len(node.inputs) not in (3, 4):
        raise StructureError(f"node {node.name!r} has {len(node.inputs)} inputs, expected 3 or 4")
    consts = []
    for t in node.inputs[1:]:
        if not isinstance(t, gs.Constant):
            raise StructureError(f"node {node.name!r}: factor input {t.name!r} is not a constant initializer")
        consts.append(np.asarray(t.values))
    s = from_onnx_attributes(dict(node.attrs))
    bias = consts[2] if len(consts) == 3 else None
    return unpack_factors(s, consts[0], consts[1], bias)


def gblr_conv_nodes(graph: gs.Graph) -> list[gs.Node]:
    """GBLRConv nodes: the GBLRLinear passes (merge, choose, fallback, lower-gblr) leave them alone."""
    return [n for n in graph.nodes if n.op == ONNX_CONV_OP and (n.domain or "") == ONNX_DOMAIN]


def read_gblr_conv_node(node: gs.Node) -> tuple[GBLRWeights, ConvGeometry]:
    """The IR (kernel matrix) and convolution geometry of a GBLRConv node; StructureError if malformed."""
    _, geo = conv_from_onnx_attributes(dict(node.attrs))  # validates the geometry against the structure
    return read_gblr_node(node), geo  # the same inputs and structure attributes as a GBLRLinear node


def _has_gblr_nodes(graph: gs.Graph) -> bool:
    return bool(gblr_nodes(graph)) or bool(gblr_conv_nodes(graph))


def _gblr_nodes_invalid(graph: gs.Graph) -> str | None:
    """Why a GBLR node of ``graph`` is malformed, or None when all are valid."""
    try:
        for n in gblr_nodes(graph):
            read_gblr_node(n)
        for n in gblr_conv_nodes(graph):
            read_gblr_conv_node(n)
    except (StructureError, ValueError) as e:
        return str(e)
    return None


def _nonstandard_ops(graph: gs.Graph) -> str | None:
    """Which ops of ``graph`` are outside the default ONNX domain, or None when there are none."""
    bad = sorted({f"{n.domain}::{n.op}" for n in graph.nodes if (n.domain or "") not in ("", "ai.onnx")})
    return f"ops outside the default domain remain: {', '.join(bad)}" if bad else None


# Properties a pass may require or ensure: name -> violation(graph) -> the reason it does not hold, or None.
VIOLATIONS: dict[str, Callable[[gs.Graph], str | None]] = {
    "gblr-nodes-valid": _gblr_nodes_invalid,
    "standard-ops-only": _nonstandard_ops,
}
# name -> checker(graph) -> whether it holds
PROPERTIES: dict[str, Callable[[gs.Graph], bool]] = {
    name: (lambda g, f=f: f(g) is None) for name, f in VIOLATIONS.items()
}


class Pass:
    """Base class: subclasses set name/description/requires/ensures and implement `run`."""

    name: str = ""
    description: str = ""
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()
    invalidates: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: PassConfig) -> "Pass":
        """This pass configured by ``config`` (a pass without settings ignores it)."""
        return cls()

    def run(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_requires(self, graph: gs.Graph) -> None:
        for prop in sorted(self.requires):
            reason = VIOLATIONS[prop](graph)
            if reason is not None:
                raise PassError(self.name, f"precondition '{prop}' does not hold: {reason}")

    def __call__(self, graph: gs.Graph) -> PassResult:
        self.check_requires(graph)
        try:
            result = self.run(graph)
        except PassError:
            raise
        except (StructureError, ValueError, KeyError) as e:
            raise PassError(self.name, str(e)) from e
        except Exception as e:  # e.g. onnx shape inference or graph-surgeon errors: still name the pass
            raise PassError(self.name, f"{type(e).__name__}: {e}") from e
        for prop in sorted(self.ensures):
            reason = VIOLATIONS[prop](result.graph)
            if reason is not None:
                raise PassError(self.name, f"postcondition '{prop}' does not hold: {reason}")
        result.name = self.name
        return result


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph`, keeping the template's opsets; drop the gblrc opset when no GBLR node is left."""
    opsets = {o.domain: o.version for o in template.opset_import}
    if not _has_gblr_nodes(graph):
        opsets.pop(ONNX_DOMAIN, None)
    else:
        opsets.setdefault(ONNX_DOMAIN, 1)
    graph.opset = opsets.get("", opsets.get("ai.onnx", graph.opset))
    model = gs.export_onnx(graph, do_type_check=True)
    del model.opset_import[:]
    for dom, ver in sorted(opsets.items()):
        model.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name or "gblrc"
    return model


def established_properties(graph: gs.Graph) -> tuple[set[str], dict[str, str]]:
    """Properties that hold on `graph`, and for the others the reason they do not."""
    held, why = set(), {}
    for prop, violation in VIOLATIONS.items():
        reason = violation(graph)
        if reason is None:
            held.add(prop)
        else:
            why[prop] = reason
    return held, why


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass]) -> tuple[onnx.ModelProto, list[PassResult]]:
    """Run `passes` in order, tracking the properties established so far.

    Before a pass runs, each property it requires must be established (held by the input
    graph or ensured by an earlier pass and not invalidated since); the pass then also
    verifies it on the graph.  A violation raises PassError naming the pass.
    """
    graph = import_graph(model)
    held, why = established_properties(graph)
    results = []
    for p in passes:
        missing = sorted(p.requires - held)
        if missing:
            prop = missing[0]
            reason = why.get(prop, "an earlier pass invalidated it")
            raise PassError(p.name, f"precondition '{prop}' does not hold: {reason}")
        res = p(graph)
        graph = res.graph
        held = (held - p.invalidates) | p.ensures
        results.append(res)
    return export_graph(graph, model), results


class Pipeline:
    """Configured passes run in order (as onnx_ir's ``PassManager([...])``)::

        out_model, results = Pipeline([MergeBlocks(model), LowerGBLR(model), Cleanup()])(onnx_model)

    Calling it runs :func:`run_passes`: the requires/ensures of each pass are tracked, a violation
    raises PassError naming the pass, and every pass returns its PassResult (one per pass, in order).
    """

    def __init__(self, passes: Iterable[Pass]):
        self.passes: tuple[Pass, ...] = tuple(passes)
        bad = [p for p in self.passes if not isinstance(p, Pass)]
        if bad:
            raise TypeError(f"a Pipeline holds Pass instances, got {type(bad[0]).__name__}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    def __call__(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassResult]]:
        return run_passes(model, self.passes)

    run = __call__

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(self.names)}])"


PassManager = Pipeline  # onnx_ir's name for it
