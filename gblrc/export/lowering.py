"""`gblrc.lower`: export a model with GBLR layers to ONNX, run the passes, check, write.

Pipeline: export (one gblrc::GBLRLinear node per layer) -> passes (unless keep_gblr_ops)
-> onnx.checker (full_check) -> parity against PyTorch on the example inputs -> atomic write.
Any failure raises GblrcError and leaves no output file.

Deployment precision (:mod:`gblrc.export.precision`): ``precision="fp16"`` converts the checked fp32 graph
to half precision (LayerNorm, Softmax and reductions kept in fp32) and gates it against PyTorch at
the fp16 tolerance; ``quantize="int8"`` quantises it with ONNX Runtime (dynamic or static QDQ) and
measures and records its fidelity to the fp32 lowered graph.  ``with_dense`` also writes the dense
reference (the same model with every GBLR layer as its dense MatMul, same precision) for `gblrc bench`.

Parity runs in ONNX Runtime (:func:`gblrc.runtime.check_parity`).  A graph that still holds
GBLRLinear nodes (``keep_gblr_ops``, or a pass list that does not lower them) is checked on a
copy whose GBLRLinear nodes are replaced by their dense matrices (gblrc.export.reference).
The PyTorch reference is computed in float64 (a float64 copy of the model) when possible,
so the error reported is that of the ONNX model alone.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
import torch

from gblrc.errors import GblrcError
from gblrc.export.graph import export_onnx, normalize_inputs, wrap_for_export
from gblrc.io.fileio import atomic_path
from gblrc.export.inspection import EXAMPLE_SHAPES_KEY, attach_metadata, structures_from_onnx
from gblrc.export.metadata import get_metadata, set_metadata
from gblrc.export.options import ATOL, PRECISIONS, RTOL, LowerConfig, SettingError, as_lower_config, at_least  # noqa: F401
from gblrc.export.reference import REFERENCE_NOTE, dense_reference_model, reference_run
from gblrc.ir.conv import ONNX_CONV_OP
from gblrc.ir.structure import ONNX_DOMAIN, ONNX_OP

__all__ = [
    "LowerConfig",
    "LowerReport",
    "lower",
    "op_counts",
    "op_table",
    "run_passes",
    "run_tuned",
    "tokens_from_inputs",
    "load_passes",
    "check_pass_names",
    "tune_config",
    "tokens_from_onnx",
    "opt_onnx",
    "reference_check",
    "reference_run",
    "compare_models",
    "record_example_shapes",
    "EXAMPLE_SHAPES_KEY",
]


@dataclass
class LowerReport:
    path: str
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    passes: list[dict] = field(default_factory=list)  # [{"name", "changed", "counts"}]
    max_abs_err: float = float("nan")
    max_rel_err: float = float("nan")
    provider: str = ""
    gblr_layers: int = 0  # GBLRLinear + GBLRConv nodes in the exported graph (layers the forward pass uses)
    tuning: list[dict] = field(default_factory=list)  # with tune: per layer, the measured times and the choice
    calibration: str = ""  # with tune: how the cost model was calibrated
    precision: str = "fp32"  # "fp32", "fp16", "int8-dynamic" or "int8-static": what the file holds
    rtol: float = RTOL  # the parity gate's tolerance (of the fp32 graph; of the fp16 graph with precision fp16)
    atol: float = ATOL
    fp16: dict = field(
        default_factory=dict
    )  # precision fp16: {"max_abs", "max_rel", "provider", "rtol", "atol", "fp32_ops"}
    quantization: dict = field(default_factory=dict)  # int8: {"mode", "per_channel", "fidelity", "rows", "candidates"}
    dense_path: str = ""  # with_dense: the dense reference written beside
    dense_max_rel_err: float = float("nan")  # with_dense: its parity (fp32 graph) against PyTorch
    attention: object = None  # the attention form exported (gblrc.export.attention.AttentionChoice)
    fusion: object = None  # with optimize: what ONNX Runtime's optimizer fused (gblrc.export.fusion.FusionReport)

    def precision_lines(self) -> list[str]:
        """What the precision step did (nothing for plain fp32)."""
        lines = []
        if self.fp16:
            f = self.fp16
            lines.append(
                f"fp16: parity vs PyTorch (float64) on {f['provider']}: max abs error {f['max_abs']:.3g}, "
                f"max rel error {f['max_rel']:.3g} (fp16 tolerance rtol={f['rtol']:g}, atol={f['atol']:g}); "
                f"kept in fp32: {', '.join(f['fp32_ops']) or 'none'}"
            )
        if self.quantization:
            q = self.quantization
            fid = q["fidelity"]
            how = f"per-channel {'on' if q['per_channel'] else 'off'}"
            if len(q.get("candidates", {})) > 1:
                c = q["candidates"]
                how += f" (chosen by fidelity: cosine {c['on']:.4f} on, {c['off']:.4f} off)"
            lines.append(
                f"int8 ({q['mode']}, {how}): fidelity to the fp32 lowered model on {q['inputs']}: "
                f"max rel error {fid['max_rel']:.3g}, cosine mean {fid['cosine_mean']:.4f} "
                f"(min {fid['cosine_min']:.4f}) over {fid['n']} rows"
            )
        return lines

    def tune_lines(self) -> list[str]:
        """With tune: the calibration, one line per tuned layer and a summary (else nothing)."""
        if not self.tuning and not self.calibration:
            return []
        from gblrc.passes.tune import format_tuning

        return ([self.calibration] if self.calibration else []) + format_tuning(self.tuning)

    def parity_line(self) -> str:
        return (
            f"parity vs PyTorch (float64) on {self.provider}: max abs error {self.max_abs_err:.3g}, "
            f"max rel error {self.max_rel_err:.3g}"
        )

    def op_table(self) -> str:
        return op_table(self.ops_before, self.ops_after)


def op_table(before: dict[str, int], after: dict[str, int]) -> str:
    """Node counts by op type before and after, most frequent (after) first, with totals."""
    names = sorted(set(before) | set(after), key=lambda k: (-after.get(k, 0), k))
    rows = [f"{'op':<28}{'before':>8}{'after':>8}"]
    rows += [f"{k:<28}{before.get(k, 0):>8}{after.get(k, 0):>8}" for k in names]
    rows.append(f"{'total':<28}{sum(before.values()):>8}{sum(after.values()):>8}")
    return "\n".join(rows)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type (custom-domain ops as 'domain.Op'), top-level graph."""
    c = Counter((f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in model.graph.node)
    return dict(sorted(c.items()))


def _has_gblr(model: onnx.ModelProto) -> bool:
    return any(n.domain == ONNX_DOMAIN and n.op_type in (ONNX_OP, ONNX_CONV_OP) for n in model.graph.node)


def load_passes():
    """The gblrc.passes module (PASSES, DEFAULT_PIPELINE, run_pipeline, PassError)."""
    try:
        from gblrc import passes

        passes.PASSES, passes.DEFAULT_PIPELINE, passes.run_pipeline, passes.PassError  # noqa: B018
    except (ImportError, AttributeError) as e:
        raise GblrcError(f"the ONNX passes are not available ({' '.join(str(e).split())}); reinstall gblrc") from None
    return passes


def check_pass_names(names: Sequence[str]) -> list[str]:
    """Stripped names; GblrcError naming the first unknown one (gblrc.passes.passes_from_names's check)."""
    P = load_passes()
    names = [n.strip() for n in names if n.strip()]
    try:
        P.passes_from_names(names)
    except P.PassError as e:
        raise GblrcError(str(e)) from None
    return names


def _summarise(results, used: Sequence[str]) -> list[dict]:
    summary = []
    for i, r in enumerate(results):
        name = getattr(r, "name", None) or (used[i] if i < len(used) else f"pass{i}")
        summary.append(
            {
                "name": name,
                "changed": bool(getattr(r, "changed", False)),
                "counts": dict(getattr(r, "counts", {}) or {}),
                "details": list(getattr(r, "details", []) or []),
            }
        )
    return summary


def run_tuned(
    model: onnx.ModelProto, config, names: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, list[dict], str]:
    """Autotuned passes (gblrc.passes.tune: calibrated cost model, timed lowering, cached) configured by
    ``config`` (a TuneConfig); returns the model, the pass summary and the calibration line."""
    P = load_passes()
    if names is not None:
        names = check_pass_names(names)
    try:
        out, results, setup = P.run_tuned_pipeline(model, config, names)
    except P.PassError as e:
        raise GblrcError(f"pass pipeline failed: {e}") from None
    except ValueError as e:  # bad provider, tokens or a calibration that cannot be fitted
        raise GblrcError(f"tuning failed: {e}") from None
    cal = setup.calibration.describe() if setup.calibration is not None else "cost model given (no calibration)"
    return out, _summarise(results, setup.passes), cal


def tune_config(tokens: int | None = None, threads: int | None = None, provider: str | None = None):
    """A gblrc.passes.TuneConfig, its settings checked: tokens (rows of X to time with; None: from the example
    inputs) at least 1, threads 0 (one per core) or more, provider auto (None), cpu or cuda."""
    at_least("tokens", tokens, 1)
    at_least("threads", threads, 0, "0 (one per core) or more")
    return load_passes().TuneConfig(tokens=tokens, threads=threads or 0, provider=provider or "auto")


def tokens_from_onnx(model: onnx.ModelProto) -> int | None:
    """Rows of X for the first graph input when its shape is static (over the last dimension for
    floating inputs); None when it has dynamic dimensions."""
    inits = {t.name for t in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not dims or any(d is None or d < 1 for d in dims):
            return None
        floating = np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type), np.floating)
        return int(np.prod(dims[:-1] if floating and len(dims) >= 2 else dims))
    return None


def opt_onnx(model: onnx.ModelProto, passes: Sequence[str] | None = None, tune=None):
    """`gblrc opt`: the pass pipeline on an ONNX model (tuned when ``tune``, a TuneConfig, is given; its tokens
    default to :func:`tokens_from_onnx`), its gblrc metadata kept, the result checked valid.  Returns
    (model, pass summary, the tuning's lines: the calibration, one per tuned layer, a summary)."""
    structures = structures_from_onnx(model)
    lines: list[str] = []
    if tune is not None:
        import dataclasses

        from gblrc.passes.tune import format_tuning

        if tune.tokens is None:
            tune = dataclasses.replace(tune, tokens=tokens_from_onnx(model))
        new, results, calibration = run_tuned(model, tune, passes)
        lines = [calibration] + format_tuning([d for r in results for d in r.get("details", [])])
    else:
        new, results = run_passes(model, passes)
    if structures:
        attach_metadata(new, structures)
    _check_valid(new, "the optimised model")
    return new, results, lines


def tokens_from_inputs(inputs) -> int | None:
    """Rows of X a linear layer sees for these example inputs: the first input's elements, over its
    last dimension when it is floating point (features), else all of them (token ids)."""
    for t in inputs.values():
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue
        n = t.numel() // (t.shape[-1] if t.is_floating_point() and t.dim() >= 2 else 1)
        return max(int(n), 1)
    return None


def run_passes(model: onnx.ModelProto, names: Sequence[str] | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """Run the pass pipeline (default: gblrc.passes.DEFAULT_PIPELINE); unknown names -> GblrcError."""
    P = load_passes()
    DEFAULT_PIPELINE, PassError, run_pipeline = P.DEFAULT_PIPELINE, P.PassError, P.run_pipeline
    if names is not None:
        names = check_pass_names(names)
    try:
        out, results = run_pipeline(model, names)
    except PassError as e:
        raise GblrcError(f"pass pipeline failed: {e}") from None
    used = list(names) if names is not None else list(DEFAULT_PIPELINE)
    return out, _summarise(results, used)


# ----------------------------------------------------------------- reference evaluation
def reference_check(model: onnx.ModelProto, feeds: dict, reference: list, *, rtol: float, atol: float):
    """Parity of a graph that still holds GBLRLinear nodes (evaluated as their dense matrices)."""
    from gblrc.runtime import check_parity

    rep = check_parity(dense_reference_model(model), feeds, reference, rtol=rtol, atol=atol)
    rep.provider = f"{rep.provider} ({REFERENCE_NOTE})"
    return rep


def _generated_feeds(model: onnx.ModelProto) -> dict:
    """Inputs for every graph input: dynamic dimensions 2, integer inputs 1, floats ~ N(0, 1)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = np.ones(shape, dt) if np.issubdtype(dt, np.integer) else rng.standard_normal(shape).astype(dt)
    return feeds


def compare_models(
    src: onnx.ModelProto, new: onnx.ModelProto, *, rtol: float = RTOL, atol: float = ATOL, hint: str = ""
):
    """Parity of ``new`` with ``src`` (e.g. a pass pipeline's result with its input) on generated inputs
    (:func:`_generated_feeds`); graphs with GBLRLinear nodes run as their dense matrices.  GblrcError when
    they differ, or when they cannot be run (its message ends with ``hint``).  Returns the ParityReport."""
    from gblrc.runtime import check_parity, make_session

    feeds = _generated_feeds(src)
    try:
        ref = reference_run(src, feeds) if _has_gblr(src) else None
        if ref is None:
            ref = make_session(src, log=False).run(None, feeds)
        used = {i.name for i in new.graph.input}
        check = reference_check if _has_gblr(new) else check_parity
        rep = check(new, {k: v for k, v in feeds.items() if k in used}, ref, rtol=rtol, atol=atol)
    except GblrcError:
        raise
    except Exception as e:
        raise GblrcError(f"cannot run the models to compare them ({' '.join(str(e).split())[:200]}){hint}") from None
    if not rep.ok:
        raise GblrcError(
            f"the optimised model differs from the input: max rel error {rep.max_rel:.3g}; no file written"
        )
    return rep


# ----------------------------------------------------------------- the PyTorch reference
@torch.no_grad()
def _torch_reference(module: torch.nn.Module, inputs) -> list[np.ndarray]:
    """Outputs in float64 (a float64 copy of the model); the model's own dtype if that fails."""
    names = list(inputs)
    try:
        m64 = copy.deepcopy(module).double().eval()
        args = tuple(t.double() if t.is_floating_point() else t for t in inputs.values())
        out = wrap_for_export(m64, names)(*args)
    except Exception:
        was = module.training
        module.eval()
        try:
            out = wrap_for_export(module, names)(*inputs.values())
        finally:
            module.train(was)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().double().numpy() for o in outs]


def lower(
    module: torch.nn.Module,
    example_inputs,
    path: str | os.PathLike,
    config: LowerConfig | None = None,
    **options,
) -> LowerReport:
    """Export ``module`` to ONNX at ``path`` with its GBLR layers lowered to standard ops, as ``config`` (a
    :class:`gblrc.export.options.LowerConfig`; None: the defaults) says.

    example_inputs: a tensor, a tuple of tensors or an ordered dict name -> tensor.  The older keyword form
    (``lower(m, x, path, precision="fp16")``) still works: ``options`` are LowerConfig's fields, applied on top
    of ``config``; an unknown one is a TypeError naming the fields.

    The result must match PyTorch within ``max|a-b| <= atol + rtol * max|b|`` per output, else GblrcError and
    no file is written.  keep_gblr_ops: skip the passes (the file keeps gblrc::GBLRLinear nodes; ONNX Runtime
    cannot run it without the passes).  tune: True or a gblrc.passes.TuneConfig: calibrate the cost model on
    the provider and time each layer's candidate lowerings (dense among them), keep the fastest, cache the
    times (see gblrc.passes.tune); its tokens default to the example inputs' rows.

    precision "fp16" (:func:`gblrc.export.precision.to_fp16`): the fp32 graph is checked first, at rtol
    1e-4 / atol 1e-5, then the fp16 graph at ``rtol``/``atol``, default FP16_RTOL / FP16_ATOL.  quantize
    "int8" (:func:`gblrc.export.precision.quantize_int8` with ``quant_mode`` "dynamic" or "static", the latter
    calibrated on ``calib_feeds``; ``per_channel`` True, False or "auto"): its fidelity to the fp32 lowered
    graph, on the example inputs and the calibration feeds, is measured and recorded in the file's metadata
    (``gblrc.quantization``).  with_dense: also write there the dense reference: the exported graph with
    every GBLR layer as its dense MatMul, checked, at the same precision.

    attention: the attention form of models that have several (:mod:`gblrc.export.attention`), recorded in
    the metadata (``gblrc.attention``) of the file and of the dense reference, which is exported in the same
    form.  The example inputs' shapes are recorded too (``gblrc.example_shapes``: what `gblrc bench` feeds
    when given no shapes).  optimize: run ONNX Runtime's transformer optimizer on the lowered graph
    (:mod:`gblrc.export.fusion`; Hugging Face BERT-like encoders) and keep its graph unless it times slower
    than the unfused one (then the unfused graph is written; the report says which).

    The settings are checked when the config is made; the paths before any slow work.
    """
    config = as_lower_config(config, options)
    config.check_paths(path)
    job = _Job.of(module, example_inputs, config)
    exported, attn = _export(job, config)
    model, report, feeds, ref = _lower_and_gate(job, config, exported, attn, path)
    return _deploy_and_write(job, config, exported, model, report, feeds, ref, path)


def _lower_and_gate(job: "_Job", config: LowerConfig, exported, attn, path):
    """``exported`` through the passes (and the optimizer), recorded, validated and gated against PyTorch at
    the fp32 tolerances: the lowered model, its report, the graph's feeds and PyTorch's outputs."""
    rtol32, atol32, _, _ = _tolerances(config)
    before = op_counts(exported)
    model, results, calibration, relower = _run_pipeline(exported, job.inputs, config)
    fusion = None
    if config.optimize:
        model, fusion = _optimize(job, exported, model, relower)
    _record(model, attn, job.named, structures=structures_from_onnx(exported))
    _check_valid(model, "the lowered ONNX model")
    ref = _torch_reference(job.module, job.inputs)
    feeds = _graph_feeds(model, job.feeds)  # inputs the graph does not use are pruned
    rep = _gate(model, feeds, ref, rtol=rtol32, atol=atol32, what="the ONNX model")
    report = LowerReport(
        path=os.fspath(path),
        ops_before=before,
        ops_after=op_counts(model),
        passes=results,
        max_abs_err=rep.max_abs,
        max_rel_err=rep.max_rel,
        provider=rep.provider,
        gblr_layers=before.get(f"{ONNX_DOMAIN}.{ONNX_OP}", 0) + before.get(f"{ONNX_DOMAIN}.{ONNX_CONV_OP}", 0),
        tuning=[d for r in results for d in r.get("details", [])],
        calibration=calibration,
        rtol=rtol32,
        atol=atol32,
        attention=attn,
        fusion=fusion,
    )
    return model, report, feeds, ref


def _deploy_and_write(
    job: "_Job", config: LowerConfig, exported, model, report: LowerReport, feeds: dict, ref: list, path
) -> LowerReport:
    """The gated ``model`` (and the dense reference, with ``with_dense``) at the precision asked for, its
    metadata recorded again, both written (or neither); ``report`` filled in and returned."""
    attn, fusion = report.attention, report.fusion
    out = _deploy(model, feeds, ref, report, config)
    dense = None
    if config.with_dense is not None:
        dense = _dense_reference(job, config, exported, report, feeds, ref)
    for m in (out, dense):
        if m is not None:  # the precision step rebuilt the graph: the facts again
            _record(m, attn, job.named)
    if fusion is not None:
        from gblrc.export.fusion import record_fusion

        record_fusion(out, fusion)
    _write(path, out, config.with_dense, dense)
    report.ops_after = op_counts(out)
    return report


@dataclass
class _Job:
    """What every step of one `lower()` needs: the module, its inputs (by graph input name too, and as
    arrays) and where the attention form and the optimizer's choices are timed."""

    module: torch.nn.Module
    inputs: dict
    named: dict
    provider: str
    threads: int | None

    @property
    def feeds(self) -> dict:
        return {n: t.detach().cpu().numpy() for n, t in self.named.items()}

    @classmethod
    def of(cls, module: torch.nn.Module, example_inputs, config: LowerConfig) -> "_Job":
        """The job of ``module`` on ``example_inputs`` (normalised), named by ``config.input_names`` (default: their
        keys), timed on ``config.attention_provider`` with ``config.attention_threads``."""
        inputs = normalize_inputs(example_inputs)
        names = list(config.input_names) if config.input_names is not None else list(inputs)
        named = dict(zip(names, inputs.values()))
        return cls(module, inputs, named, config.attention_provider, config.attention_threads)


def _tolerances(config: LowerConfig) -> tuple[float, float, float, float]:
    """(rtol, atol) of the fp32 graph's gate, then of the file's (the fp16 graph's with precision fp16)."""
    from gblrc.export.precision import FP16_ATOL, FP16_RTOL

    if config.precision == "fp16":
        rtol = config.rtol if config.rtol is not None else FP16_RTOL
        return RTOL, ATOL, rtol, (config.atol if config.atol is not None else FP16_ATOL)
    rtol32 = config.rtol if config.rtol is not None else RTOL
    atol32 = config.atol if config.atol is not None else ATOL
    return rtol32, atol32, rtol32, atol32


def _export(job: _Job, config: LowerConfig):
    """The exported graph (one GBLRLinear node per layer) in the attention form chosen, and that choice."""
    from gblrc.export.attention import attention_forms, export_in_fastest_form, record_choice

    module, names = job.module, list(job.named)
    attention, optimize = config.attention, config.optimize
    outputs = list(config.output_names) if config.output_names is not None else None
    model, attn = export_in_fastest_form(
        module,
        lambda: export_onnx(
            module,
            job.inputs,
            opset=config.opset,
            input_names=names,
            output_names=outputs,
            dynamic_axes=config.dynamic_axes,
        ),
        attention="eager" if optimize and attention == "auto" and "eager" in attention_forms(module) else attention,
        feeds=job.feeds,
        provider=job.provider,
        threads=job.threads,
    )
    if optimize and attention == "auto" and attn.form == "eager":
        attn.chosen_by = "rule: optimize (ONNX Runtime fuses Attention in the eager form only)"
    record_choice(model, attn)
    record_example_shapes(model, job.named)
    return model, attn


def _run_pipeline(model: onnx.ModelProto, inputs, config: LowerConfig):
    """(lowered model, pass summary, calibration line, how to lower another graph the same way)."""
    if config.keep_gblr_ops:
        return model, [], "", None
    tune, passes = config.tune, (list(config.passes) if config.passes is not None else None)
    if tune:
        import dataclasses

        from gblrc.passes import TuneConfig

        tc = tune if isinstance(tune, TuneConfig) else TuneConfig()
        if tc.tokens is None:
            tc = dataclasses.replace(tc, tokens=tokens_from_inputs(inputs))
        out, results, calibration = run_tuned(model, tc, passes)
        return out, results, calibration, lambda g: run_tuned(g, tc, passes)[0]  # the timings are cached
    out, results = run_passes(model, passes)
    return out, results, "", lambda g: run_passes(g, passes)[0]


def _optimize(job: _Job, exported: onnx.ModelProto, lowered: onnx.ModelProto, relower):
    """ONNX Runtime's transformer optimizer on the lowered graph (:mod:`gblrc.export.fusion`), recorded."""
    from gblrc.export.fusion import optimize_lowered, record_fusion

    model, fusion = optimize_lowered(
        exported, job.module, relower, _graph_feeds(lowered, job.feeds), provider=job.provider, threads=job.threads
    )
    record_fusion(model, fusion)
    return model, fusion


def _record(model: onnx.ModelProto, attn, named: dict, structures=None) -> None:
    """The facts a file carries: its GBLR structures (when given), the attention form, the example shapes."""
    from gblrc.export.attention import record_choice

    if structures is not None:
        attach_metadata(model, structures)
    record_choice(model, attn)
    record_example_shapes(model, named)


def _check_valid(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise GblrcError(f"{what} is invalid: {' '.join(str(e).split())[:300]}") from None


def _graph_feeds(model: onnx.ModelProto, feeds: dict) -> dict:
    used = {i.name for i in model.graph.input}
    return {k: v for k, v in feeds.items() if k in used}


def _dense_reference(
    job: _Job, config: LowerConfig, exported: onnx.ModelProto, report: LowerReport, feeds: dict, ref: list
) -> onnx.ModelProto:
    """The dense reference of ``exported`` (every GBLR layer as its dense MatMul), gated like the model and
    at its precision; its path and parity go into ``report``."""
    rtol32, atol32, _, _ = _tolerances(config)
    dense = dense_reference_model(exported)
    set_metadata(dense, {"gblrc.reference": "dense: every GBLR layer as its dense MatMul"})
    if report.fusion is not None and report.fusion.kept == "fused":
        # like for like: the dense reference through the same optimizer (not when the unfused graph was kept)
        from gblrc.export.fusion import ort_model_type, ort_optimize

        dense = ort_optimize(dense, *ort_model_type(job.module))
    drep = _gate(dense, feeds, ref, rtol=rtol32, atol=atol32, what="the dense reference")
    report.dense_path, report.dense_max_rel_err = os.fspath(config.with_dense), drep.max_rel
    return _deploy(dense, feeds, ref, LowerReport(path="", ops_before={}, ops_after={}), config)


def _write(path, model: onnx.ModelProto, dense_path, dense: onnx.ModelProto | None) -> None:
    """Both files or neither: each is written beside its path and renamed into place (the model last)."""
    with atomic_path(path) as tmp:
        if dense is not None:
            with atomic_path(dense_path) as dtmp:
                onnx.save(dense, os.fspath(dtmp))
        onnx.save(model, os.fspath(tmp))


def record_example_shapes(model: onnx.ModelProto, inputs) -> None:
    """Record the example inputs' shapes (graph inputs only) in the metadata: `gblrc bench`'s default shapes."""
    used = {i.name for i in model.graph.input}
    set_metadata(model, {EXAMPLE_SHAPES_KEY: {k: list(t.shape) for k, t in inputs.items() if k in used}})


def _gate(model: onnx.ModelProto, feeds: dict, ref: list, *, rtol: float, atol: float, what: str):
    """Parity of ``model`` with the PyTorch reference; GblrcError beyond tolerance or when it cannot run."""
    try:
        if _has_gblr(model):
            rep = reference_check(model, feeds, ref, rtol=rtol, atol=atol)
        else:
            from gblrc.runtime import check_parity

            rep = check_parity(model, feeds, ref, rtol=rtol, atol=atol)
    except GblrcError:
        raise
    except Exception as e:
        raise GblrcError(f"running {what} failed: {' '.join(str(e).split())[:300]}") from None
    if not rep.ok:
        raise GblrcError(
            f"{what} does not match PyTorch: max abs error {rep.max_abs:.3g}, "
            f"max rel error {rep.max_rel:.3g} (tolerance rtol={rtol}, atol={atol}); no file written"
        )
    return rep


def _deploy(
    model: onnx.ModelProto, feeds: dict, ref: list, report: LowerReport, config: LowerConfig
) -> onnx.ModelProto:
    """The checked fp32 ``model`` at ``config``'s precision (fp16 gated, int8 measured); fills ``report``."""
    from gblrc.export.precision import FP32_OPS, quantize_checked, to_fp16

    _, _, rtol, atol = _tolerances(config)
    quant_mode = config.quant_mode
    if config.precision == "fp16":
        keep = FP32_OPS
        if any(n.domain == "com.microsoft" for n in model.graph.node):
            # an optimized graph (optimize=True): ORT's fused SkipLayerNormalization accumulates in fp32 itself, and
            # kept in fp32 behind Casts beside a fused Attention it gets mixed input types (ORT rejects the graph)
            keep = tuple(o for o in FP32_OPS if o not in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"))
        m16 = to_fp16(model, keep_fp32=keep)
        _check_valid(m16, "the fp16 model")
        rep = _gate(m16, feeds, ref, rtol=rtol, atol=atol, what="the fp16 ONNX model")
        present = {n.op_type for n in model.graph.node}
        report.precision, report.rtol, report.atol = "fp16", rtol, atol
        report.fp16 = {
            "max_abs": rep.max_abs,
            "max_rel": rep.max_rel,
            "provider": rep.provider,
            "rtol": rtol,
            "atol": atol,
            "fp32_ops": [o for o in keep if o in present],
        }
        return m16
    if config.quantize != "int8":
        return model
    calibration = [{k: np.asarray(v) for k, v in f.items() if k in feeds} for f in (config.calib_feeds or ())]
    check = [feeds] + calibration
    q, pc, fid, candidates = quantize_checked(
        model, check, mode=quant_mode, per_channel=config.per_channel, calibration=calibration
    )
    n_cal = len(check) - 1
    report.precision = f"int8-{quant_mode}"
    report.quantization = {
        "mode": quant_mode,
        "per_channel": pc,
        "fidelity": fid.as_dict(),
        "candidates": candidates,
        "inputs": "the example inputs"
        + (f" and {n_cal} calibration batches" if n_cal else "")
        + (" (padding positions excluded)" if "attention_mask" in feeds else ""),
    }
    set_metadata(q, {**get_metadata(model), **get_metadata(q), "gblrc.quantization": report.quantization})
    return q
