"""`gblrc lower`, `gblrc opt`, `gblrc passes`, `gblrc inspect`: from a compressed model to ONNX."""

from __future__ import annotations

import dataclasses
import os
import re
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import click

from gblrc.cli._errors import api_errors
from gblrc.errors import GblrcError
from gblrc.export.inputs import reshape_inputs
from gblrc.export.options import ATOL, ATTENTION_OPTIONS, PRECISIONS, QUANT_MODES, RTOL, LowerConfig, at_least

__all__ = ["lower", "opt", "passes_cmd", "inspect_cmd", "parse_input_shapes", "reshape_inputs"]

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# `lower`'s defaults are LowerConfig's (written once, in the dataclass)
_DEFAULTS = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(LowerConfig)})
_PER_CHANNEL = {"on": True, "off": False, "auto": "auto"}
_PER_CHANNEL_DEFAULT = next(k for k, v in _PER_CHANNEL.items() if v == _DEFAULTS.per_channel)
_TRUST = click.option(
    "--trust-pickle",
    "trust",
    is_flag=True,
    help="Allow model classes outside torch.nn/gblrc (runs code from the file). Only for files you trust.",
)


def _tune_options(f):
    """--tune, --tokens, --threads, --provider (shared by lower and opt)."""
    f = click.option(
        "--provider",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default=None,
        help="With --tune: the ONNX Runtime provider to tune for [default: auto, CUDA when available].",
    )(f)
    f = click.option(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="With --tune: intra-op threads to tune for [default: one per core].",
    )(f)
    f = click.option(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="With --tune: rows of X (batch x sequence) to time with [default: from the example inputs].",
    )(f)
    f = click.option(
        "--tune",
        is_flag=True,
        help="Calibrate the cost model on the provider and time each layer's lowerings (dense "
        "among them), keeping the fastest; cached in $GBLRC_CACHE_DIR or ~/.cache/gblrc.",
    )(f)
    return f


def _tune_config(tune: bool, tokens, threads, provider):
    """A TuneConfig for --tune (None without it); --tokens/--threads/--provider need --tune."""
    _only_with("--tune", tune, ("--tokens", tokens), ("--threads", threads), ("--provider", provider))
    if not tune:
        return None
    from gblrc.export.lowering import tune_config

    with api_errors():
        return tune_config(tokens, threads, provider)


def _only_with(needed: str, given: bool, *options) -> None:
    """GblrcError naming the first of ``options`` ((flag, value or None)) given without ``needed``."""
    if not given:
        for flag, value in options:
            if value is not None:
                raise GblrcError(f"{flag} only applies with {needed}")


def _load_compressed(path: str, *, trust: bool = False):
    """The compressed model (`gblrc compress` output) as an nn.Module with gblrc_example_inputs."""
    from gblrc.io.modelio import load

    return load(path, trust_pickle=trust)


def _split_passes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise GblrcError("--passes is empty; give pass names separated by commas (see: gblrc passes)")
    return names


def parse_input_shapes(specs: tuple[str, ...], option: str = "--input-shape") -> "OrderedDict[str, tuple[int, ...]]":
    """``NAME=D0xD1x...`` (several separated by commas or given repeatedly) -> {name: shape}; errors name ``option``."""
    out: "OrderedDict[str, tuple[int, ...]]" = OrderedDict()
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            m = re.fullmatch(r"([A-Za-z_][\w.]*)=(\d+(?:x\d+)*)", item)
            if not m:
                raise GblrcError(f"{option} {item!r} is not NAME=D0xD1x...; e.g. input_ids=8x128")
            shape = tuple(int(d) for d in m.group(2).split("x"))
            if any(d < 1 for d in shape):
                raise GblrcError(f"{option} {item!r}: every dimension must be at least 1")
            out[m.group(1)] = shape
    return out


@click.command("lower", context_settings=_CTX)
@click.argument("model", metavar="IN")
@click.option("-o", "--output", metavar="OUT.onnx", help="Output ONNX file [default: IN's name with .onnx].")
@click.option(
    "--opset", type=str, default=_DEFAULTS.opset, show_default=True, metavar="N", help="ONNX opset (14 to 20)."
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D0xD1,...",
    help="Example input shapes for export and the parity check (default: the stored examples).",
)
@click.option("--passes", "passes", metavar="a,b,...", help="Pass pipeline [default: the default pipeline].")
@click.option(
    "--keep-gblr-ops",
    is_flag=True,
    default=_DEFAULTS.keep_gblr_ops,
    help="Do not lower: keep gblrc.GBLRLinear nodes (not runnable in ORT).",
)
@click.option(
    "--rtol",
    type=float,
    default=None,
    help=f"Parity tolerance, relative to max |output| [default: {RTOL:g}; with --precision fp16: 1e-2 for the "
    f"fp16 graph, the fp32 graph still at {RTOL:g}].",
)
@click.option("--atol", type=float, default=None, help=f"Parity tolerance, absolute [default: {ATOL:g}; fp16: 1e-3].")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=_DEFAULTS.precision,
    show_default=True,
    help="fp16: weights and compute in half precision (ONNX Runtime's float16 converter; LayerNorm, "
    "Softmax and reductions stay fp32; inputs/outputs keep their types), for the CUDA provider. "
    "Checked against PyTorch at the fp16 tolerance.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="int8: quantise the lowered fp32 graph with ONNX Runtime (MatMul/Gemm/Conv weights), for CPUs; "
    "prints and records (metadata gblrc.quantization) its fidelity to the fp32 lowered graph.",
)
@click.option(
    "--quant-mode",
    type=click.Choice(QUANT_MODES),
    default=None,
    help="With --quantize: dynamic (activations quantised at run time; no data) or static QDQ "
    f"(activation ranges calibrated on --data) [default: {_DEFAULTS.quant_mode}].",
)
@click.option(
    "--per-channel",
    type=click.Choice(list(_PER_CHANNEL)),
    default=None,
    help="With --quantize: per-output-channel weight scales; auto quantises both ways and keeps the one "
    f"closer to the fp32 graph [default: {_PER_CHANNEL_DEFAULT}].",
)
@click.option(
    "--data",
    "data_spec",
    metavar="D",
    help="With --quantize: calibration batches (static) and extra inputs for the fidelity check: a .pt "
    "file (a tensor or dict of input tensors, or {'inputs': ...}) or module:function.",
)
@click.option(
    "--calib-batches", type=int, default=None, metavar="N", help="With --data: batches of --data to use [default: 8]."
)
@click.option(
    "--with-dense",
    "with_dense",
    metavar="DENSE.onnx",
    help="Also write the dense reference of the same model (every GBLR layer as its dense MatMul, same "
    "precision and quantisation, checked the same way): the baseline for `gblrc bench`.",
)
@click.option(
    "--attention",
    type=click.Choice(ATTENTION_OPTIONS),
    default=_DEFAULTS.attention,
    show_default=True,
    help="Attention form of models that have several (Hugging Face eager / SDPA): auto exports both and "
    "keeps the one the provider runs faster (timed on the example inputs; the dense reference is "
    "exported the same way); recorded in the metadata (gblrc.attention).",
)
@click.option(
    "--optimize",
    is_flag=True,
    default=_DEFAULTS.optimize,
    help="Run ONNX Runtime's transformer optimizer on the lowered graph (BERT-like encoders): its fusions "
    "(SkipLayerNormalization, BiasGelu; Attention where dense Q/K/V time faster, per block), with "
    "com.microsoft ops, are kept unless that graph times slower than the unfused one on the provider "
    "(then the unfused graph is written; the output says which).",
)
@click.option(
    "--hf-folder",
    "hf_folder",
    metavar="OUT/",
    help="Write a folder that sentence-transformers (backend='onnx') and Optimum load: config.json, the "
    "source's tokenizer and sentence-transformers files, onnx/model.onnx (inputs input_ids, "
    "attention_mask[, token_type_ids], output last_hidden_state). Instead of -o.",
)
@click.option(
    "--hf-source",
    "hf_source",
    metavar="DIR",
    help="With --hf-folder: the Hugging Face folder to take the tokenizer and module files from "
    "[default: the folder the model was compressed from, as recorded in it].",
)
@_tune_options
@_TRUST
def lower(
    model,
    output,
    opset,
    input_shapes,
    passes,
    keep_gblr_ops,
    rtol,
    atol,
    precision,
    quantize,
    quant_mode,
    per_channel,
    data_spec,
    calib_batches,
    with_dense,
    attention,
    optimize,
    hf_folder,
    hf_source,
    tune,
    tokens,
    threads,
    provider,
    trust,
):
    """Compile a compressed model (IN, from `gblrc compress`) to an ONNX file of standard ops,
    checked against PyTorch on the example inputs (batch and sequence axes stay dynamic).

    \b
    Deployment forms (see README, "Deploying: fp16, int8 and gblrc bench"):
      gblrc lower m.gblr.pt -o m16.onnx --precision fp16          # GPUs (CUDA provider)
      gblrc lower m.gblr.pt -o m8.onnx --quantize int8 --with-dense d8.onnx   # CPUs
      gblrc bench m8.onnx --against d8.onnx --shape input_ids=8x128 --shape attention_mask=8x128
    """
    from gblrc.export.inputs import calibration_feeds

    out = _lower_target(Path(model), output, hf_folder, hf_source, keep_gblr_ops)
    _only_with(
        "--quantize int8",
        quantize,
        ("--quant-mode", quant_mode),
        ("--per-channel", per_channel),
        ("--data", data_spec),
        ("--calib-batches", calib_batches),
    )
    _only_with("--data", data_spec is not None, ("--calib-batches", calib_batches))
    tuning = _tune_config(tune, tokens, threads, provider)
    with api_errors(_FLAGS):
        at_least("calib_batches", calib_batches, 1)  # calibration_feeds's own setting, checked before the loading
        config = LowerConfig(
            passes=_split_passes(passes),
            opset=int(opset) if opset.isdigit() else opset,
            keep_gblr_ops=keep_gblr_ops,
            rtol=rtol,
            atol=atol,
            tune=tuning if tuning is not None else False,
            precision=precision,
            quantize=quantize,
            quant_mode=quant_mode or _DEFAULTS.quant_mode,
            per_channel=_PER_CHANNEL[per_channel] if per_channel is not None else _DEFAULTS.per_channel,
            calib_feeds=_DATA_TO_COME if data_spec is not None else None,
            with_dense=with_dense,
            attention=attention,
            attention_provider=tuning.provider if tuning is not None else _DEFAULTS.attention_provider,
            attention_threads=(tuning.threads or None) if tuning is not None else _DEFAULTS.attention_threads,
            optimize=optimize,
        )
        config.check_paths(None if hf_folder is not None else out)
    if config.passes is not None and not keep_gblr_ops:
        from gblrc.export.lowering import check_pass_names

        check_pass_names(config.passes)  # before the (slow) loading and export
    m, inputs = _model_and_inputs(model, input_shapes, trust)
    with api_errors(_FLAGS):
        calibration = None if data_spec is None else calibration_feeds(data_spec, m, inputs, calib_batches, trust=trust)
        config = config.replace(calib_feeds=calibration)
    if hf_folder is not None:
        from gblrc.export.hf_folder import source_folder, write_hf_folder

        rep = write_hf_folder(m, inputs, hf_folder, source_folder(m, hf_source), config=config)
    else:
        from gblrc.export.lowering import lower as lower_api

        rep = lower_api(m, inputs, out, config)
    _print_lowered(rep, out, keep_gblr_ops, hf_folder)


_FLAGS = {"input_shapes": "--input-shape", "calib_feeds": "--data"}  # settings whose flag is not --setting-name
# what LowerConfig holds for --data's calibration batches until the model is loaded and they can be cut from it
_DATA_TO_COME = ({},)


def _lower_target(src: Path, output, hf_folder, hf_source, keep_gblr_ops: bool) -> Path:
    """The ONNX file `lower` writes: -o, IN's name with .onnx, or onnx/model.onnx in --hf-folder."""
    if hf_folder is None:
        _only_with("--hf-folder", False, ("--hf-source", hf_source))
        return Path(output) if output else src.with_name(src.name.removesuffix(".pt").removesuffix(".gblr") + ".onnx")
    if output:
        raise GblrcError("give -o OUT.onnx or --hf-folder OUT/, not both (the folder holds onnx/model.onnx)")
    from gblrc.export.hf_folder import check_hf_folder_target

    with api_errors(_FLAGS):
        check_hf_folder_target(hf_folder, keep_gblr_ops)
    return Path(hf_folder) / "onnx" / "model.onnx"


def _model_and_inputs(path: str, input_shapes, trust: bool):
    """The compressed model and its example inputs at the --input-shape shapes, checked to run."""
    from gblrc.export.inputs import check_runs

    shapes = parse_input_shapes(input_shapes)
    m = _load_compressed(path, trust=trust)
    examples = OrderedDict(getattr(m, "gblrc_example_inputs", None) or {})
    with api_errors(_FLAGS):
        inputs = reshape_inputs(examples, shapes)
    check_runs(m, inputs, bool(shapes))
    return m, inputs


def _print_lowered(rep, out: Path, keep_gblr_ops: bool, hf_folder) -> None:
    if rep.attention is not None:
        click.echo(rep.attention.line())
    for line in rep.tune_lines():
        click.echo(line)
    for line in rep.fusion.lines() if rep.fusion is not None else []:
        click.echo(line)
    click.echo(rep.parity_line())
    for line in rep.precision_lines():
        click.echo(line)
    click.echo(rep.op_table())
    for r in rep.passes:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items())
        click.echo(f"pass {r['name']}: {'changed' if r['changed'] else 'no change'}{f' ({counts})' if counts else ''}")
    form = {"fp32": "", "fp16": ", fp16"}.get(rep.precision, f", {rep.precision}")
    click.echo(f"wrote {out} ({rep.gblr_layers} GBLRLinear nodes {'kept' if keep_gblr_ops else 'lowered'}{form})")
    if hf_folder is not None:
        click.echo(
            f"wrote {hf_folder} (config, tokenizer and module files; load with "
            f"sentence_transformers.SentenceTransformer({str(hf_folder)!r}, backend='onnx'))"
        )
    if rep.dense_path:
        click.echo(
            f"wrote {rep.dense_path} (dense reference: every GBLR layer as its dense MatMul{form}; "
            f"fp32 parity vs PyTorch: max rel error {rep.dense_max_rel_err:.3g})"
        )


@click.command("opt", context_settings=_CTX)
@click.argument("model", metavar="IN.onnx")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="Output ONNX file.")
@click.option("--passes", "passes", metavar="a,b,...", help="Pass pipeline [default: the default pipeline].")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Compare the result with the input model on generated inputs.",
)
@_tune_options
def opt(model, output, passes, check, tune, tokens, threads, provider):
    """Run a pass pipeline on an ONNX file (e.g. one written with `gblrc lower --keep-gblr-ops`)."""
    import onnx

    from gblrc.export.inspection import load_onnx
    from gblrc.export.lowering import check_pass_names, compare_models, op_counts, op_table, opt_onnx
    from gblrc.io.fileio import atomic_path, check_output_path

    out = check_output_path(output)
    if Path(model).exists() and out.exists() and out.resolve() == Path(model).resolve():
        raise GblrcError("-o would overwrite the input file; choose another output path")
    names = _split_passes(passes)
    config = _tune_config(tune, tokens, threads, provider)
    if names is not None:
        names = check_pass_names(names)
    src = load_onnx(model)
    new, results, lines = opt_onnx(src, names, config)
    for line in lines:
        click.echo(line)
    if check:
        rep = compare_models(src, new, hint="; use --no-check to skip")
        click.echo(
            f"parity vs input model on {rep.provider}: max abs error {rep.max_abs:.3g}, max rel error {rep.max_rel:.3g}"
        )
    with atomic_path(out) as tmp:
        onnx.save(new, os.fspath(tmp))
    click.echo(op_table(op_counts(src), op_counts(new)))
    for r in results:
        click.echo(f"pass {r['name']}: {'changed' if r['changed'] else 'no change'}")
    click.echo(f"wrote {out}")


@click.command("passes", context_settings=_CTX)
def passes_cmd():
    """List the ONNX passes, what each requires and ensures, and the default pipeline."""
    from gblrc.export.lowering import load_passes

    P = load_passes()
    PASSES, DEFAULT_PIPELINE = P.PASSES, P.DEFAULT_PIPELINE
    for name, p in PASSES.items():
        click.echo(f"{name}: {getattr(p, 'description', '')}")
        req, ens = list(getattr(p, "requires", ()) or ()), list(getattr(p, "ensures", ()) or ())
        click.echo(f"    requires: {', '.join(map(str, req)) or '-'}; ensures: {', '.join(map(str, ens)) or '-'}")
    click.echo(f"default pipeline: {','.join(DEFAULT_PIPELINE)}")


@click.command("inspect", context_settings=_CTX)
@click.argument("path", metavar="FILE")
@click.option("--no-blocks", is_flag=True, help="One line per layer; do not list the blocks.")
@_TRUST
def inspect_cmd(path, no_blocks, trust):
    """Show each GBLR layer's shape, blocks (spans, ranks), cost and cost ratio, from an ONNX file
    (with GBLRLinear nodes, or lowered by gblrc) or a compressed model (.gblr.pt)."""
    from gblrc.export.inspection import format_structures, load_onnx, structures_from_compressed, structures_from_onnx

    p = Path(path)  # the loaders say when it does not exist
    if p.suffix.lower() == ".onnx":
        structures = structures_from_onnx(load_onnx(p))
        if not structures:
            raise GblrcError(f"{path!r} has no GBLRLinear nodes and no gblrc metadata: not a gblrc output")
    else:
        structures = structures_from_compressed(p, trust=trust)
        if not structures:
            raise GblrcError(f"{path!r} has no GBLR layers; make one with: gblrc compress MODEL --budget B")
    click.echo(format_structures(structures, blocks=not no_blocks))
