"""Layer structures of gblrc outputs: ONNX files (GBLRLinear nodes or lowered with gblrc metadata)
and compressed models (.gblr.pt).  Used by `gblrc inspect` and by `gblrc.lower` (metadata)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from gblrc.errors import GblrcError
from gblrc.ir.conv import ONNX_CONV_OP
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP, Structure, StructureError, from_onnx_attributes, to_onnx_attributes
from gblrc.export.metadata import get_json, set_metadata

__all__ = [
    "gblr_nodes",
    "layer_name",
    "structures_from_onnx",
    "structures_from_compressed",
    "attach_metadata",
    "load_onnx",
    "format_structures",
    "METADATA_KEY",
    "EXAMPLE_SHAPES_KEY",
]

METADATA_KEY = "gblrc.structures"
EXAMPLE_SHAPES_KEY = "gblrc.example_shapes"  # the example inputs' shapes `gblrc lower` checked with (JSON)


def gblr_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """GBLRLinear and GBLRConv nodes (a convolution's structure is that of its kernel matrix)."""
    return [n for n in model.graph.node if n.domain == ONNX_DOMAIN and n.op_type in (ONNX_OP, ONNX_CONV_OP)]


def layer_name(node: onnx.NodeProto) -> str:
    """Module path of the layer a GBLRLinear node came from (from its factor initializer name)."""
    u = node.input[1] if len(node.input) > 1 else ""
    if u.endswith("._gblrc_u_flat"):
        name = u[: -len("._gblrc_u_flat")]
        return name[len("model.") :] if name.startswith("model.") else name
    return node.name or "?"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def structures_from_onnx(model: onnx.ModelProto) -> list[tuple[str, Structure]]:
    """[(layer name, structure)] from GBLRLinear nodes, else from gblrc metadata; [] when neither."""
    nodes = gblr_nodes(model)
    try:
        if nodes:
            return [(layer_name(n), from_onnx_attributes(_attrs(n))) for n in nodes]
        recorded = get_json(model, METADATA_KEY)
        if recorded is not None:
            return [(d["name"], from_onnx_attributes(d["attributes"])) for d in recorded]
    except (StructureError, KeyError, TypeError, ValueError) as e:
        raise GblrcError(f"the ONNX file has an invalid GBLRLinear structure ({e})") from None
    return []


def attach_metadata(model: onnx.ModelProto, structures: list[tuple[str, Structure]]) -> None:
    """Record the layer structures in the model's metadata (survives lowering)."""
    set_metadata(model, {METADATA_KEY: [{"name": n, "attributes": to_onnx_attributes(s)} for n, s in structures]})


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    p = Path(path)
    if p.is_dir():
        raise GblrcError(f"{str(p)!r} is a folder; give an ONNX file")
    if not p.is_file():
        raise GblrcError(f"ONNX file {str(p)!r} does not exist")
    try:
        return onnx.load(os.fspath(p))
    except Exception as e:
        msg = " ".join(str(e).split())[:120] or type(e).__name__
        raise GblrcError(f"{str(p)!r} is not a valid ONNX file ({msg})") from None


def structures_from_compressed(path: str | os.PathLike, *, trust: bool = False) -> list[tuple[str, Structure]]:
    from gblrc.io.modelio import load
    from gblrc.nn.layer import GBLRLinear

    model = load(path, trust_pickle=trust)
    return [(n, m.structure().structure) for n, m in model.named_modules() if isinstance(m, GBLRLinear)]


def _spans(spans) -> str:
    return "+".join(f"[{s.start},{s.stop})" for s in spans)


def format_structures(structures: list[tuple[str, Structure]], *, blocks: bool = True) -> str:
    """A table: one row per layer (shape, blocks, rank, cost, ratio), its blocks below it."""
    lines = [f"{'layer':<44}{'out x in':>12}{'blocks':>8}{'rank':>6}{'cost':>12}{'ratio':>8}"]
    tot, dense = 0, 0
    for name, s in structures:
        tot, dense = tot + s.cost(), dense + s.dense_cost
        lines.append(
            f"{name[-44:]:<44}{f'{s.out_features}x{s.in_features}':>12}{len(s.blocks):>8}"
            f"{s.total_rank:>6}{s.cost():>12}{s.cost_ratio():>8.4f}"
        )
        if blocks:
            for i, b in enumerate(s.blocks):
                lines.append(
                    f"    block {i}: rows {_spans(b.rows)} x cols {_spans(b.cols)}, rank {b.rank}, cost {b.cost()}"
                )
            if not s.blocks:
                lines.append("    (no blocks: output is the bias, or zeros)")
    ratio = tot / dense if dense else 0.0
    lines.append(
        f"{len(structures)} GBLR layers: cost {tot} of dense {dense} multiply-adds per vector (ratio {ratio:.4f})"
    )
    return "\n".join(lines)
