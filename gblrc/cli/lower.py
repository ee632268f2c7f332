"""`gblrc lower`, `gblrc opt`, `gblrc passes`, `gblrc inspect`: from a compressed model to ONNX."""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import click

from gblrc.errors import GblrcError

__all__ = ["lower", "opt", "passes_cmd", "inspect_cmd", "parse_input_shapes", "reshape_inputs"]

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_TRUST = click.option("--trust-pickle", "trust", is_flag=True,
                      help="Allow model classes outside torch.nn/gblrc (runs code from the file). Only for files you trust.")


def _tune_options(f):
    """--tune, --tokens, --threads, --provider (shared by lower and opt)."""
    f = click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                     help="With --tune: the ONNX Runtime provider to tune for [default: auto, CUDA when available].")(f)
    f = click.option("--threads", type=int, default=None, metavar="N",
                     help="With --tune: intra-op threads to tune for [default: one per core].")(f)
    f = click.option("--tokens", type=int, default=None, metavar="N",
                     help="With --tune: rows of X (batch x sequence) to time with [default: from the example inputs].")(f)
    f = click.option("--tune", is_flag=True,
                     help="Calibrate the cost model on the provider and time each layer's lowerings (dense "
                          "among them), keeping the fastest; cached in $GBLRC_CACHE_DIR or ~/.cache/gblrc.")(f)
    return f


def _tune_config(tune: bool, tokens, threads, provider, default_tokens=None):
    """A TuneConfig for --tune (None without it); --tokens/--threads/--provider need --tune."""
    given = [n for n, v in (("--tokens", tokens), ("--threads", threads), ("--provider", provider)) if v is not None]
    if not tune:
        if given:
            raise GblrcError(f"{given[0]} only applies with --tune")
        return None
    if tokens is not None and tokens < 1:
        raise GblrcError(f"--tokens must be at least 1, got {tokens}")
    if threads is not None and threads < 0:
        raise GblrcError(f"--threads must be 0 (one per core) or more, got {threads}")
    from gblrc.export.lowering import load_passes

    TuneConfig = load_passes().TuneConfig
    return TuneConfig(tokens=tokens if tokens is not None else default_tokens, threads=threads or 0,
                      provider=provider or "auto")


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


def _fit(t, shape):
    """``t`` tiled/cropped to ``shape``: values stay valid (token ids, masks)."""
    reps = [-(-s // max(d, 1)) for s, d in zip(shape, t.shape)]
    return t.repeat(*reps)[tuple(slice(0, s) for s in shape)].clone()


def reshape_inputs(examples: "OrderedDict", shapes: "OrderedDict[str, tuple[int, ...]]") -> "OrderedDict":
    """Example inputs with the shapes asked for (tiled from the stored examples, or random floats)."""
    import torch

    if not examples and not shapes:
        raise GblrcError("the model has no example inputs; give them with --input-shape NAME=D0xD1,...")
    out = OrderedDict(examples)
    for name, shape in shapes.items():
        if examples and name not in examples:
            raise GblrcError(f"--input-shape names unknown input {name!r}; the model's inputs are: {', '.join(examples)}")
        ex = examples.get(name)
        if ex is None:
            out[name] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            continue
        if len(shape) != ex.dim():
            raise GblrcError(f"--input-shape {name}: {len(shape)} dimensions given, the input has {ex.dim()} "
                             f"(example shape {'x'.join(map(str, ex.shape)) or 'scalar'})")
        if ex.numel() == 0:
            raise GblrcError(f"the stored example for input {name!r} is empty; it cannot be resized")
        out[name] = _fit(ex, shape)
    return out


def _check_runs(model, inputs, shapes) -> None:
    import torch

    from gblrc.export.graph import wrap_for_export

    try:
        with torch.no_grad():
            wrap_for_export(model, list(inputs))(*inputs.values())
    except Exception as e:
        what = "the input shapes given do not fit the model" if shapes else "the model fails on its example inputs"
        raise GblrcError(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


@click.command("lower", context_settings=_CTX)
@click.argument("model", metavar="IN")
@click.option("-o", "--output", metavar="OUT.onnx", help="Output ONNX file [default: IN's name with .onnx].")
@click.option("--opset", default="17", show_default=True, metavar="N", help="ONNX opset (14 to 20).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D0xD1,...",
              help="Example input shapes for export and the parity check (default: the stored examples).")
@click.option("--passes", "passes", metavar="a,b,...", help="Pass pipeline [default: the default pipeline].")
@click.option("--keep-gblr-ops", is_flag=True, help="Do not lower: keep gblrc.GBLRLinear nodes (not runnable in ORT).")
@click.option("--rtol", type=float, default=None,
              help="Parity tolerance, relative to max |output| [default: 1e-4; with --precision fp16: 1e-2 for the "
                   "fp16 graph, the fp32 graph still at 1e-4].")
@click.option("--atol", type=float, default=None, help="Parity tolerance, absolute [default: 1e-5; fp16: 1e-3].")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: weights and compute in half precision (ONNX Runtime's float16 converter; LayerNorm, "
                   "Softmax and reductions stay fp32; inputs/outputs keep their types), for the CUDA provider. "
                   "Checked against PyTorch at the fp16 tolerance.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8: quantise the lowered fp32 graph with ONNX Runtime (MatMul/Gemm/Conv weights), for CPUs; "
                   "prints and records (metadata gblrc.quantization) its fidelity to the fp32 lowered graph.")
@click.option("--quant-mode", type=click.Choice(["dynamic", "static"]), default=None,
              help="With --quantize: dynamic (activations quantised at run time; no data) or static QDQ "
                   "(activation ranges calibrated on --data) [default: dynamic].")
@click.option("--per-channel", type=click.Choice(["auto", "on", "off"]), default=None,
              help="With --quantize: per-output-channel weight scales; auto quantises both ways and keeps the one "
                   "closer to the fp32 graph [default: auto].")
@click.option("--data", "data_spec", metavar="D",
              help="With --quantize: calibration batches (static) and extra inputs for the fidelity check: a .pt "
                   "file (a tensor or dict of input tensors, or {'inputs': ...}) or module:function.")
@click.option("--calib-batches", type=int, default=None, metavar="N",
              help="With --data: batches of --data to use [default: 8].")
@click.option("--with-dense", "with_dense", metavar="DENSE.onnx",
              help="Also write the dense reference of the same model (every GBLR layer as its dense MatMul, same "
                   "precision and quantisation, checked the same way): the baseline for `gblrc bench`.")
@click.option("--attention", type=click.Choice(["auto", "eager", "sdpa"]), default="auto", show_default=True,
              help="Attention form of models that have several (Hugging Face eager / SDPA): auto exports both and "
                   "keeps the one the provider runs faster (timed on the example inputs; the dense reference is "
                   "exported the same way); recorded in the metadata (gblrc.attention).")
@click.option("--optimize", is_flag=True,
              help="Run ONNX Runtime's transformer optimizer on the lowered graph (BERT-like encoders) and keep "
                   "its fusions (SkipLayerNormalization, BiasGelu; Attention where dense Q/K/V time faster, per "
                   "block); the result has com.microsoft ops.")
@click.option("--hf-folder", "hf_folder", metavar="OUT/",
              help="Write a folder that sentence-transformers (backend='onnx') and Optimum load: config.json, the "
                   "source's tokenizer and sentence-transformers files, onnx/model.onnx (inputs input_ids, "
                   "attention_mask[, token_type_ids], output last_hidden_state). Instead of -o.")
@click.option("--hf-source", "hf_source", metavar="DIR",
              help="With --hf-folder: the Hugging Face folder to take the tokenizer and module files from "
                   "[default: the folder the model was compressed from, as recorded in it].")
@_tune_options
@_TRUST
def lower(model, output, opset, input_shapes, passes, keep_gblr_ops, rtol, atol, precision, quantize, quant_mode,
          per_channel, data_spec, calib_batches, with_dense, attention, optimize, hf_folder, hf_source, tune, tokens,
          threads, provider, trust):
    """Compile a compressed model (IN, from `gblrc compress`) to an ONNX file of standard ops,
    checked against PyTorch on the example inputs (batch and sequence axes stay dynamic).

    \b
    Deployment forms (see README, "Deploying: fp16, int8 and gblrc bench"):
      gblrc lower m.gblr.pt -o m16.onnx --precision fp16          # GPUs (CUDA provider)
      gblrc lower m.gblr.pt -o m8.onnx --quantize int8 --with-dense d8.onnx   # CPUs
      gblrc bench m8.onnx --against d8.onnx --shape input_ids=8x128 --shape attention_mask=8x128
    """
    from gblrc.io.fileio import check_output_path
    from gblrc.export.lowering import lower as lower_api

    if not (opset.isdigit() and 14 <= int(opset) <= 20):
        raise GblrcError(f"--opset must be an integer from 14 to 20 (default 17), got {opset!r}")
    opset = int(opset)
    src = Path(model)
    if not src.exists():
        raise GblrcError(f"input {model!r} does not exist; give the .gblr.pt file written by gblrc compress")
    if hf_folder is not None:
        from gblrc.export.hf_folder import check_hf_folder_target

        if output:
            raise GblrcError("give -o OUT.onnx or --hf-folder OUT/, not both (the folder holds onnx/model.onnx)")
        if keep_gblr_ops:
            raise GblrcError("--hf-folder and --keep-gblr-ops exclude each other (the loaders need a lowered graph)")
        check_hf_folder_target(hf_folder)
        out = Path(hf_folder) / "onnx" / "model.onnx"
    else:
        if hf_source is not None:
            raise GblrcError("--hf-source only applies with --hf-folder")
        out = Path(output) if output else src.with_name(src.name.removesuffix(".pt").removesuffix(".gblr") + ".onnx")
        check_output_path(out)
    if optimize and keep_gblr_ops:
        raise GblrcError("--optimize and --keep-gblr-ops exclude each other (--keep-gblr-ops does not lower)")
    quant = _quant_options(quantize, precision, quant_mode, per_channel, data_spec, calib_batches, keep_gblr_ops)
    if with_dense is not None:
        if keep_gblr_ops:
            raise GblrcError("--with-dense and --keep-gblr-ops exclude each other (--keep-gblr-ops does not lower)")
        check_output_path(with_dense)
        if Path(with_dense).resolve() == out.resolve():
            raise GblrcError("--with-dense names the output file itself; choose another path")
    names = _split_passes(passes)
    config = _tune_config(tune, tokens, threads, provider)
    if config is not None and keep_gblr_ops:
        raise GblrcError("--tune and --keep-gblr-ops exclude each other (--keep-gblr-ops does not lower)")
    if names is not None and not keep_gblr_ops:
        from gblrc.export.lowering import check_pass_names

        names = check_pass_names(names)  # before the (slow) loading and export
    shapes = parse_input_shapes(input_shapes)
    m = _load_compressed(model, trust=trust)
    examples = OrderedDict(getattr(m, "gblrc_example_inputs", None) or {})
    inputs = reshape_inputs(examples, shapes)
    _check_runs(m, inputs, shapes)
    calibration = None
    if quant["data"] is not None:
        calibration = _calibration_feeds(quant["data"], m, inputs, quant["batches"], trust=trust)
    kw = dict(passes=names, opset=opset, keep_gblr_ops=keep_gblr_ops, rtol=rtol, atol=atol,
              tune=config if config is not None else False, precision=precision, quantize=quantize,
              quant_mode=quant["mode"], per_channel=quant["per_channel"], calib_feeds=calibration,
              with_dense=with_dense, attention=attention, optimize=optimize,
              attention_provider=config.provider if config is not None else "auto",
              attention_threads=(config.threads or None) if config is not None else None)
    if hf_folder is not None:
        from gblrc.export.hf_folder import write_hf_folder

        source = hf_source if hf_source is not None else (getattr(m, "gblrc_meta", None) or {}).get("source")
        if hf_source is None and source and not Path(source).is_dir():
            raise GblrcError(f"the folder the model was compressed from ({source!r}) is not here; give the tokenizer's "
                             "folder with --hf-source DIR")
        rep = write_hf_folder(m, inputs, hf_folder, source, **kw)
    else:
        rep = lower_api(m, inputs, out, **kw)
    if rep.attention is not None:
        click.echo(rep.attention.line())
    for line in rep.tune_lines():
        click.echo(line)
    for line in (rep.fusion.lines() if rep.fusion is not None else []):
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
        click.echo(f"wrote {hf_folder} (config, tokenizer and module files; load with "
                   f"sentence_transformers.SentenceTransformer({str(hf_folder)!r}, backend='onnx'))")
    if rep.dense_path:
        click.echo(f"wrote {rep.dense_path} (dense reference: every GBLR layer as its dense MatMul{form}; "
                   f"fp32 parity vs PyTorch: max rel error {rep.dense_max_rel_err:.3g})")


def _quant_options(quantize, precision, mode, per_channel, data_spec, batches, keep_gblr_ops) -> dict:
    """Check the --quantize family of options together (before any slow work)."""
    given = [n for n, v in (("--quant-mode", mode), ("--per-channel", per_channel), ("--data", data_spec),
                            ("--calib-batches", batches)) if v is not None]
    if quantize is None:
        if given:
            raise GblrcError(f"{given[0]} only applies with --quantize int8")
        if keep_gblr_ops and precision != "fp32":
            raise GblrcError("--precision fp16 and --keep-gblr-ops exclude each other (--keep-gblr-ops does not lower)")
        return {"mode": "dynamic", "per_channel": "auto", "data": None, "batches": 0}
    if precision != "fp32":
        raise GblrcError("--quantize int8 and --precision fp16 exclude each other: int8 is for CPUs (from the fp32 "
                         "graph), fp16 for GPUs; choose one")
    if keep_gblr_ops:
        raise GblrcError("--quantize and --keep-gblr-ops exclude each other (--keep-gblr-ops does not lower)")
    mode = mode or "dynamic"
    if mode == "static" and data_spec is None:
        raise GblrcError("--quant-mode static needs calibration batches: give --data D (or use --quant-mode dynamic)")
    if batches is not None and batches < 1:
        raise GblrcError(f"--calib-batches must be at least 1, got {batches}")
    if batches is not None and data_spec is None:
        raise GblrcError("--calib-batches only applies with --data")
    pc = {"auto": "auto", "on": True, "off": False}[per_channel or "auto"]
    return {"mode": mode, "per_channel": pc, "data": data_spec, "batches": batches or 8}


def _calibration_feeds(spec: str, model, examples: "OrderedDict", n: int, *, trust: bool) -> list[dict]:
    """Up to ``n`` batches of ``--data`` as ONNX feeds (input name -> array, in the example inputs' dtypes)."""
    import itertools
    from types import SimpleNamespace

    import torch

    from gblrc.io.datafiles import load_data

    data = load_data(spec, SimpleNamespace(kind="module", tokenizer=None, model=model), trust=trust, batch_size=32)
    train = data.train
    if isinstance(train, dict) and "inputs" in train:
        x = train["inputs"]
        rows = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
        batches = ({k: v[i:i + 32] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 32]
                   for i in range(0, rows, 32))
    else:
        batches = iter(train() if callable(train) else train)
    names = list(examples)
    feeds = []
    for b in itertools.islice(batches, n):
        if isinstance(b, (tuple, list)) and len(b) == 2:
            b = b[0]
        if isinstance(b, torch.Tensor):
            b = {names[0]: b}
        if not isinstance(b, dict):
            raise GblrcError(f"--data batches must be tensors or dicts of tensors, got {type(b).__name__}")
        missing = [k for k in names if k not in b]
        if missing:
            raise GblrcError(f"--data batches lack the model input {missing[0]!r} (they have: {', '.join(map(str, b))})")
        feed = {}
        for k in names:
            t = b[k]
            if not isinstance(t, torch.Tensor):
                raise GblrcError(f"--data input {k!r} is a {type(t).__name__}, not a tensor")
            ex = examples[k]
            if t.dim() != ex.dim() or (ex.dim() and t.shape[-1] != ex.shape[-1] and ex.is_floating_point()):
                raise GblrcError(f"--data input {k!r} has shape {'x'.join(map(str, t.shape))}; the model's example "
                                 f"has {'x'.join(map(str, ex.shape))}")
            feed[k] = t.detach().cpu().to(ex.dtype).numpy()
        feeds.append(feed)
    if not feeds:
        raise GblrcError(f"--data {spec!r} gave no batches")
    return feeds


@click.command("opt", context_settings=_CTX)
@click.argument("model", metavar="IN.onnx")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="Output ONNX file.")
@click.option("--passes", "passes", metavar="a,b,...", help="Pass pipeline [default: the default pipeline].")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare the result with the input model on generated inputs.")
@_tune_options
def opt(model, output, passes, check, tune, tokens, threads, provider):
    """Run a pass pipeline on an ONNX file (e.g. one written with `gblrc lower --keep-gblr-ops`)."""
    import onnx

    from gblrc.io.fileio import atomic_path, check_output_path
    from gblrc.export.inspection import attach_metadata, load_onnx, structures_from_onnx
    from gblrc.export.lowering import check_pass_names, op_counts, op_table, run_passes

    out = check_output_path(output)
    if Path(model).exists() and out.exists() and out.resolve() == Path(model).resolve():
        raise GblrcError("-o would overwrite the input file; choose another output path")
    names = _split_passes(passes)
    config = _tune_config(tune, tokens, threads, provider)
    if names is not None:
        names = check_pass_names(names)
    src = load_onnx(model)
    structures = structures_from_onnx(src)
    if config is not None:
        import dataclasses

        from gblrc.export.lowering import run_tuned

        if config.tokens is None:
            config = dataclasses.replace(config, tokens=_onnx_tokens(src))
        new, results, calibration = run_tuned(src, config, names)
        from gblrc.passes.tune import format_tuning

        for line in [calibration] + format_tuning([d for r in results for d in r.get("details", [])]):
            click.echo(line)
    else:
        new, results = run_passes(src, names)
    if structures:
        attach_metadata(new, structures)
    try:
        onnx.checker.check_model(new, full_check=True)
    except Exception as e:
        raise GblrcError(f"the optimised model is invalid: {' '.join(str(e).split())[:200]}") from None
    if check:
        click.echo(_opt_parity(src, new))
    with atomic_path(out) as tmp:
        onnx.save(new, os.fspath(tmp))
    click.echo(op_table(op_counts(src), op_counts(new)))
    for r in results:
        click.echo(f"pass {r['name']}: {'changed' if r['changed'] else 'no change'}")
    click.echo(f"wrote {out}")


def _onnx_tokens(model) -> int | None:
    """Rows of X for the first graph input when its shape is static (over the last dimension for
    floating inputs); None when it has dynamic dimensions."""
    import numpy as np
    import onnx

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


def _opt_parity(src, new) -> str:
    """Both models on the same generated inputs (dynamic dims = 2; int inputs = 1, floats ~ N(0,1))."""
    import numpy as np
    import onnx

    from gblrc.export.lowering import _has_gblr, reference_check
    from gblrc.export.reference import reference_run
    from gblrc.runtime import check_parity

    rng = np.random.default_rng(0)
    feeds = {}
    for i in src.graph.input:
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = (np.ones(shape, dt) if np.issubdtype(dt, np.integer) else rng.standard_normal(shape).astype(dt))
    try:
        ref = reference_run(src, feeds) if _has_gblr(src) else None
        if ref is None:
            from gblrc.runtime import make_session

            ref = make_session(src, log=False).run(None, feeds)
        new_feeds = {k: v for k, v in feeds.items() if k in {i.name for i in new.graph.input}}
        check = reference_check if _has_gblr(new) else check_parity
        rep = check(new, new_feeds, ref, rtol=1e-4, atol=1e-5)
    except GblrcError:
        raise
    except Exception as e:
        raise GblrcError(f"cannot run the models to compare them ({' '.join(str(e).split())[:200]}); "
                         "use --no-check to skip") from None
    if not rep.ok:
        raise GblrcError(f"the optimised model differs from the input: max rel error {rep.max_rel:.3g}; no file written")
    return f"parity vs input model on {rep.provider}: max abs error {rep.max_abs:.3g}, max rel error {rep.max_rel:.3g}"


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

    p = Path(path)
    if not p.exists():
        raise GblrcError(f"{path!r} does not exist")
    if p.suffix.lower() == ".onnx":
        structures = structures_from_onnx(load_onnx(p))
        if not structures:
            raise GblrcError(f"{path!r} has no GBLRLinear nodes and no gblrc metadata: not a gblrc output")
    else:
        structures = structures_from_compressed(p, trust=trust)
        if not structures:
            raise GblrcError(f"{path!r} has no GBLR layers; make one with: gblrc compress MODEL --budget B")
    click.echo(format_structures(structures, blocks=not no_blocks))
