"""`gblrc lower --optimize`: ONNX Runtime's transformer optimizer on the lowered graph, kept unless it is slower.

ONNX Runtime's optimizer (``onnxruntime.transformers.optimizer.optimize_model``, model type ``bert``, its
Python fusions only: ``opt_level=0``, so the file stays provider-neutral) fuses LayerNorm + residual Adds into
SkipLayerNormalization, bias + GELU into BiasGelu, and a whole self-attention block into one Attention node
(com.microsoft domain).  The first two fuse on the lowered graph as they do on the dense one.  The Attention
fusion needs each of Q, K and V as one MatMul + Add on the block's input; a compressed Q/K/V layer lowered as
two products (or sliced, segmented) does not match, so that block's attention stays unfused.

Whether a block's Q/K/V are better kept dense (their dense MatMuls: the block fuses into Attention, at the
dense cost of the three projections) is decided by timing on the provider: the lowered-and-optimized model,
the same with every block's Q/K/V dense, and with each block's alone dense, all in one interleaved run
(gblrc.runtime.timing, on the example inputs).  A block is kept dense when its variant is faster than the
all-lowered model by more than :data:`TIE`; the report gives every block's measured ratio.  (On ONNX Runtime
1.32 CPU the fused Attention gains nothing in fp32 (0.999x on dense MiniLM), so dense Q/K/V, which cost their
full multiply-adds, lose there; on the CUDA provider the fused Attention is where its attention kernels are.)

The optimized graph is then timed against the unfused lowered graph (the file `gblrc lower` writes without
--optimize), in the same interleaved runs; when it is slower by more than :data:`TIE` the unfused graph is
kept instead (ONNX Runtime 1.32 CPU, tiny BERT: the fused graph 1.19-1.36x the unfused one).  The report
(:attr:`FusionReport.kept`, a line, the metadata ``gblrc.fusion``) says which graph the file holds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import onnx

from gblrc.errors import GblrcError
from gblrc.export.inspection import gblr_nodes, layer_name
from gblrc.export.metadata import get_metadata, set_metadata
from gblrc.export.reference import dense_reference_model

__all__ = [
    "FUSED_OPS",
    "TIE",
    "METADATA_KEY",
    "FusionReport",
    "ort_model_type",
    "attention_blocks",
    "ort_optimize",
    "optimize_lowered",
    "fused_counts",
]

FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "EmbedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)
TIE = 0.02
METADATA_KEY = "gblrc.fusion"
# Hugging Face model types whose encoder ONNX Runtime's "bert" optimizer handles, with their Q/K/V layer names
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie"}
# an attention block's projections: Q, K, V and the output projection (ORT's Attention fusion matches the
# path from the residual Add through the output MatMul + Add back to the Q/K/V MatMuls)
_QKV = re.compile(r"^(?P<block>.*attention)\.(?:self\.(?:query|key|value)|output\.dense)$")


@dataclass
class FusionReport:
    model_type: str
    num_heads: int
    hidden_size: int
    fused: dict = field(default_factory=dict)  # com.microsoft op -> count in the optimized graph
    blocks: list = field(default_factory=list)  # per attention block: {"block", "qkv", "time_ratio"}
    provider: str = ""
    threads: int = 0
    seconds: dict = field(default_factory=dict)  # variant -> best median seconds
    note: str = ""
    kept: str = "fused"  # the graph written: "fused" (the optimized one) or "unfused" (it timed slower)

    def lines(self) -> list[str]:
        fused = ", ".join(f"{k} {v}" for k, v in self.fused.items()) or "nothing"
        out = [
            f"optimize: ONNX Runtime transformer optimizer (model type {self.model_type}, {self.num_heads} heads, "
            f"hidden {self.hidden_size}): fused {fused}"
        ]
        base = self.seconds.get("lowered")
        if base and "all dense" in self.seconds:
            out.append(
                "optimize: Q/K/V/O dense in every block (all attention fused): "
                f"{self.seconds['all dense'] / base:.3f}x "
                f"the lowered model on {self.provider}, {self.threads} threads"
            )
        for b in self.blocks:
            r = b.get("time_ratio")
            out.append(
                f"optimize: {b['block']}: Q/K/V/O {b['qkv']}"
                + ("" if r is None else f" (dense Q/K/V/O + fused Attention: {r:.3f}x)")
            )
        if self.note:
            out.append(f"optimize: {self.note}")
        if "final" in self.seconds and "unfused" in self.seconds:
            out.append(
                f"optimize: the optimized graph runs {self.seconds['final'] / self.seconds['unfused']:.3f}x the "
                f"unfused lowered graph on {self.provider}, {self.threads} threads (timed on the example inputs)"
            )
        out.append(
            "optimize: kept the optimized (fused) graph"
            if self.kept == "fused"
            else f"optimize: kept the unfused lowered graph: the optimized one is slower on {self.provider} "
            f"(by more than {TIE:.0%}; the file has no fused ops, as without --optimize)"
        )
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def ort_model_type(module) -> tuple[str, int, int]:
    """(ORT optimizer model type, heads, hidden size) of a Hugging Face BERT-like model; GblrcError otherwise."""
    cfg = getattr(module, "config", None)
    mt = getattr(cfg, "model_type", None)
    if not type(module).__module__.startswith("transformers.") or mt not in _BERT_LIKE:
        what = f"a {mt} model" if mt else "not a Hugging Face model"
        raise GblrcError(
            f"--optimize supports BERT-like Hugging Face encoders ({', '.join(sorted(_BERT_LIKE))}); this is {what}"
        )
    return "bert", int(cfg.num_attention_heads), int(cfg.hidden_size)


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node if n.domain == "com.microsoft" or n.op_type in FUSED_OPS)
    return {k: c[k] for k in FUSED_OPS if c.get(k)}


def attention_blocks(exported: onnx.ModelProto) -> dict[str, list[str]]:
    """Attention block -> the names of its Q/K/V layers that are GBLR nodes in the exported graph."""
    out: dict[str, list[str]] = {}
    for n in gblr_nodes(exported):
        m = _QKV.match(layer_name(n))
        if m:
            out.setdefault(m.group("block"), []).append(layer_name(n))
    return out


def ort_optimize(model: onnx.ModelProto, model_type: str, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """ONNX Runtime's transformer optimizer, its fusions only (opt_level 0), on a copy of ``model``."""
    from onnxruntime.transformers.optimizer import optimize_model

    m = onnx.ModelProto()
    m.CopyFrom(model)
    props = get_metadata(model)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = optimize_model(
                m, model_type=model_type, num_heads=num_heads, hidden_size=hidden_size, opt_level=0, use_gpu=False
            ).model
    except Exception as e:
        raise GblrcError(
            f"ONNX Runtime's transformer optimizer failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    if any(n.domain == "com.microsoft" for n in out.graph.node) and not any(
        o.domain == "com.microsoft" for o in out.opset_import
    ):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    set_metadata(out, props)
    return out


def _densify(exported: onnx.ModelProto, layers: set[str]) -> onnx.ModelProto:
    return dense_reference_model(exported, only=lambda n: layer_name(n) in layers)


def optimize_lowered(
    exported: onnx.ModelProto,
    module,
    lower: Callable[[onnx.ModelProto], onnx.ModelProto],
    feeds: dict,
    *,
    provider: str = "auto",
    threads: int | None = None,
    repeats: int = 10,
    sessions: int = 2,
) -> tuple[onnx.ModelProto, FusionReport]:
    """The lowered graph (``lower(exported)``) fused by ONNX Runtime's optimizer; the attention blocks whose
    dense Q/K/V (fused Attention) time faster get them.  Returns the faster of that graph and the unfused
    lowered graph (the fused one unless it times slower by more than :data:`TIE`), and what was done
    (``kept`` says which)."""
    model_type, heads, hidden = ort_model_type(module)
    rep = FusionReport(model_type=model_type, num_heads=heads, hidden_size=hidden)
    unfused = lower(exported)
    base = ort_optimize(unfused, model_type, heads, hidden)
    blocks = attention_blocks(exported)
    variants = {"unfused": unfused, "lowered": base}
    if not blocks:
        rep.note = "no attention block has compressed Q/K/V/O"
    else:
        variants["all dense"] = ort_optimize(
            lower(_densify(exported, {x for v in blocks.values() for x in v})), model_type, heads, hidden
        )
        if fused_counts(variants["all dense"]).get("Attention", 0) <= fused_counts(base).get("Attention", 0):
            rep.note = "attention does not fuse in this graph even with dense Q/K/V/O: kept lowered"
            rep.blocks = [{"block": b, "qkv": "lowered", "time_ratio": None} for b in blocks]
            del variants["all dense"]
            blocks = {}
        for b, layers in blocks.items():
            variants[b] = ort_optimize(lower(_densify(exported, set(layers))), model_type, heads, hidden)
    from gblrc.runtime.timing import best_of_sessions, effective_threads, resolve_provider

    try:
        prov = resolve_provider(provider)
        t = best_of_sessions(
            variants, feeds, provider=prov, threads=threads, repeats=repeats, sessions=sessions, warmup=2
        )
    except Exception as e:
        raise GblrcError(f"timing the fused forms failed: {' '.join(str(e).split())[:200]}") from None
    rep.provider, rep.threads, rep.seconds = prov, effective_threads(threads), dict(t.best)
    dense_blocks = []
    for b in blocks:  # (empty when attention cannot fuse)
        r = t.best[b] / t.best["lowered"]
        faster = r < 1 - TIE
        rep.blocks.append({"block": b, "qkv": "dense (Attention fused)" if faster else "lowered", "time_ratio": r})
        if faster:
            dense_blocks.append(b)
    if not dense_blocks:
        final = base
    elif len(dense_blocks) == len(blocks):
        final = variants["all dense"]
    else:
        final = ort_optimize(
            lower(_densify(exported, {x for b in dense_blocks for x in blocks[b]})), model_type, heads, hidden
        )
    rep.fused = fused_counts(final)
    if final is not base and final is not variants.get("all dense"):  # a mix: time it against the unfused graph
        t2 = best_of_sessions(
            {"unfused": unfused, "final": final},
            feeds,
            provider=prov,
            threads=threads,
            repeats=repeats,
            sessions=sessions,
            warmup=2,
        )
        rep.seconds["final"] = t2.best["final"] * t.best["unfused"] / t2.best["unfused"]
    else:
        rep.seconds["final"] = t.best["all dense" if final is not base else "lowered"]
    if rep.seconds["final"] > (1 + TIE) * t.best["unfused"]:  # ONNX Runtime's fused kernels are slower here
        rep.kept = "unfused"
        return unfused, rep
    return final, rep


def record_fusion(model: onnx.ModelProto, rep: FusionReport) -> None:
    """Write what the optimizer did, and which graph was kept, into ``model``'s metadata (``gblrc.fusion``)."""
    set_metadata(model, {METADATA_KEY: rep.as_dict()})
