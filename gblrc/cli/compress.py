"""`gblrc compress`: learn GBLR layers under a cost budget and write MODEL.gblr.pt + report + picture."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import click

from gblrc.cli._errors import api_errors
from gblrc.errors import GblrcError
from gblrc.learn.config import (
    ALLOCATIONS,
    CLI_DEVICE,
    DEVICES,
    PRECISIONS,
    REFINE_STEPS,
    STRUCTURES,
    UNITS,
    CompressConfig,
    TrainingConfig,
)

__all__ = ["compress"]

_FAILED = "compression failed"  # the message of an API error that has none
# `compress`'s defaults are CompressConfig's and TrainingConfig's (written once, in the dataclasses)
_DEFAULTS = SimpleNamespace(
    **{
        f.name: f.default
        for c in (TrainingConfig, CompressConfig)
        for f in dataclasses.fields(c)
        if f.name != "training"
    }
)


def default_output(model_path: Path) -> Path:
    """`<model stem>.gblr.pt` beside the model (for a folder: beside the folder)."""
    p = model_path.resolve() if model_path.is_dir() else model_path
    stem = p.name if p.is_dir() else p.stem
    return p.parent / f"{stem}.gblr.pt"


def check_output(out: Path, model_path: Path) -> None:
    from gblrc.io.fileio import check_output_path

    parent = out.parent if str(out.parent) else Path(".")
    for anc in (parent, *parent.parents):
        if anc.exists() and not anc.is_dir():
            raise GblrcError(f"cannot write {str(out)!r}: {str(anc)!r} is a file, not a folder; choose another -o path")
    check_output_path(out)
    if out.exists() and model_path.exists() and out.resolve() == model_path.resolve():
        raise GblrcError(f"-o {str(out)!r} would overwrite the input model; choose another output path")


@contextlib.contextmanager
def atomic_outputs(*paths: Path):
    """Temporary paths for several outputs; renamed into place only if all are written (main file last)."""
    from gblrc.io.fileio import atomic_path

    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]  # exits in reverse: paths[0] last
        yield tmps  # (atomic_path gives them a new file's permissions)


def _fidelity_lines(report: dict, eval_spec) -> None:
    fid = report.get("fidelity")
    search = report.get("fidelity_search")
    if search:
        click.echo(f"fidelity / budget curve (target {search['target']}, eval set {search['eval_set']}):")
        for p in search["curve"]:
            how = "trained" if p["trained"] else "init"
            click.echo(f"  budget {p['budget']:.4f} ({how}): cosine {p['cosine']:.4f} (min {p['cosine_min']:.3f})")
        click.echo(_chosen_line(search, fid))
    if fid:
        where = eval_spec or "held-out part of the data"
        parts = [f"after init {fid['init']['cosine']:.4f}"] if "init" in fid else []
        parts.append(f"final {fid['final']['cosine']:.4f} (min {fid['final']['cosine_min']:.3f})")
        acc = fid["final"].get("accuracy")
        if acc is not None:
            parts.append(f"accuracy {acc:.4f} (dense {fid['dense'].get('accuracy', float('nan')):.4f})")
        click.echo(f"fidelity on {where} ({fid['examples']} examples), cosine to the dense model: " + ", ".join(parts))


def _chosen_line(search: dict, fid: dict | None) -> str:
    """``chosen budget 0.45: fidelity 0.9620; lowered fp32 0.61x dense time, + int8 0.38x (ONNX Runtime ...)``."""
    from gblrc.export.speed import speed_line

    line = f"chosen budget {search['chosen_budget']:g}"
    if fid:
        line += f": fidelity {fid['final']['cosine']:.4f}"
    low = search.get("lowered")
    if low and "skipped" in low:
        line += "; speed of the lowered model not measured (see the warning)"
    elif low:
        line += "; " + speed_line(low)
    return line


def _summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    unit = report.get("budget_unit", "flops")
    timed = "time_ratio" in report
    t = Table(
        title=f"GBLR compression: budget {report['budget']:.3f} ({unit}), achieved {report['achieved_ratio']:.4f}"
    )
    cols = [
        ("layer", "left"),
        ("shape (out x in)", "right"),
        ("dense cost", "right"),
        ("GBLR cost", "right"),
        ("FLOP ratio", "right"),
        ("blocks", "right"),
        ("family", "left"),
    ]
    if timed:
        cols += [("est. time ratio", "right"), ("lowering", "left")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for L in report["layers"]:
        shape = "x".join(str(s) for s in L["shape"])
        extra = [f"{L['time_ratio']:.3f}", L["lowering"]] if timed else []
        t.add_row(
            L["name"],
            shape,
            f"{L['dense_cost']:,}",
            f"{L['gblr_cost']:,}",
            f"{L['ratio']:.3f}",
            str(L["blocks"]),
            L.get("family", "gblr"),
            *extra,
        )
    extra = [f"{report['time_ratio']:.4f}", ""] if timed else []
    t.add_row(
        "total",
        "",
        f"{report['dense_cost']:,}",
        f"{report['gblr_cost']:,}",
        f"{report.get('flop_ratio', report['achieved_ratio']):.4f}",
        str(sum(L["blocks"] for L in report["layers"])),
        ", ".join(f"{k} {v}" for k, v in report.get("families", {}).items()),
        *extra,
        style="bold",
    )
    Console(width=110).print(t)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.option(
    "--budget",
    "-b",
    metavar="B",
    help="Cost of the compressed layers as a fraction of their dense multiply-adds (of their dense "
    "time with --budget-unit time), in (0, 1]. "
    "Required unless --target-fidelity is given (then it is the largest budget allowed).",
)
@click.option(
    "--target-fidelity",
    type=float,
    metavar="F",
    help="Choose the budget: the smallest whose held-out fidelity (mean cosine to the dense model "
    "on --eval-data, or on a part of --data held out) is at least F, e.g. 0.98. Searches "
    "budgets with the cheap initialisation, then trains at the chosen one; prints the "
    "curve and records it in the report.",
)
@click.option(
    "--speed/--no-speed",
    default=None,
    help="With --target-fidelity: lower the result to ONNX as `gblrc lower` does, with its dense "
    "reference and an int8 (dynamic) copy, and time the three on ONNX Runtime (CPU, one thread "
    "per core) at the example inputs; prints and records (fidelity_search.lowered) the fp32 and "
    "int8 time ratios to dense. Costs an export and a few seconds of timing. [default: --speed]",
)
@click.option(
    "--data",
    "-d",
    metavar="D",
    help="Training data: a .pt file (a tensor of inputs, or a dict with 'inputs' and optional 'targets', "
    "'eval_inputs', 'eval_targets'); a text file, one example per line (Hugging Face models, "
    "tokenised by the model's tokenizer); or module:function returning an iterable of batches. "
    "With targets the task loss is used, otherwise distillation from the dense model. "
    "Without --data only the initialisation from the dense weights is done.",
)
@click.option(
    "--eval-data",
    metavar="E",
    help="Examples to judge fidelity on, in the forms of --data (best from another source than "
    "--data: users' inputs are never the training set). The report and the console give "
    "the cosine to the dense model (and accuracy, with class targets) after the "
    "initialisation and at the end.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=0),
    default=_DEFAULTS.steps,
    show_default=True,
    help="Training steps. 0 with --data: post-training compression only (data-aware "
    "initialisation, sequential refit and budget allocation, no fine-tuning).",
)
@click.option(
    "--general-text",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Text --data only: add N sentences of built-in general English (docstrings of installed "
    "packages) to the training text, the file's lines repeated to stay half of it, so the "
    "compressed model stays faithful on text unlike the file's (on MiniLM: +0.04 cosine on "
    "other text, -0.003 on the file's own). [default: 12000 for text data; 0 turns it off]",
)
@click.option(
    "--refine-steps",
    type=int,
    default=None,
    metavar="N",
    help="Block-level refinement after the initialisation (needs --data): each block (transformer layer) "
    f"trains its compressed layers' content for N steps on {_DEFAULTS.refine_batches} batches of the data so "
    "that, fed the compressed model's own inputs, it gives the dense block's output (on MiniLM at 0.4, --steps 0: "
    f"+0.07 cosine in domain and on other genres for ~5 min on 2 cores). [default: {REFINE_STEPS} with --data; 0: off]",
)
@click.option(
    "--block-sparse/--no-block-sparse",
    "block_sparse",
    default=_DEFAULTS.block_sparse,
    show_default=True,
    help="Structure gblr with --data: FFN pairs may keep their best neurons and attention layers their best "
    "heads (one dense block per layer, the rest pruned; the function of the rest refitted), where the "
    "sensitivity allocation finds that loses less at its cost than low rank (on MiniLM at 0.4, --steps 0: "
    "+0.03 cosine on other genres). --no-block-sparse: low rank / learned GBLR only.",
)
@click.option(
    "--hidden-loss",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.hidden_loss,
    show_default=True,
    help="Distillation: weight of matching every block's hidden state (Hugging Face models).",
)
@click.option(
    "--augment",
    type=click.FloatRange(min=0, max=0.9),
    default=_DEFAULTS.augment,
    show_default=True,
    help="Distillation: fraction of tokens replaced by random ones in every training batch "
    "(text models), so the student imitates the teacher beyond the training text.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size, show_default=True)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True, help="Learning rate."
)
@click.option("--include", metavar="REGEX", help="Compress only Linear layers whose name matches REGEX.")
@click.option("--exclude", metavar="REGEX", help="Leave Linear layers whose name matches REGEX dense.")
@click.option(
    "--rank-per-component",
    type=click.IntRange(min=1),
    default=_DEFAULTS.rank_per_component,
    show_default=True,
    help="Rank of each GBLR component (above 1 gives fewer, larger blocks that lower faster).",
)
@click.option(
    "--tile",
    type=click.IntRange(min=1),
    default=_DEFAULTS.tile,
    show_default=True,
    help="Block widths and starts become multiples of this many rows/columns (e.g. 32: a coarser "
    "structure that lowers to fewer, larger slices).",
)
@click.option(
    "--structure",
    type=click.Choice(STRUCTURES),
    default=_DEFAULTS.structure,
    show_default=True,
    help="gblr: learn block widths and locations (the method); lowrank: truncated SVD at the same "
    "cost with the same fine-tuning (full fixed widths), a baseline to compare against.",
)
@click.option(
    "--allocate",
    type=click.Choice(ALLOCATIONS),
    default=_DEFAULTS.allocate,
    show_default=True,
    help="How the budget is split across layers before training: sensitivity measures how much "
    "truncating each layer alone changes the output (a few forward passes per layer) and gives "
    "sensitive layers more; uniform gives every layer the same fraction; auto: sensitivity "
    "when there is --data and every layer is linear (not Conv2d), else uniform.",
)
@click.option(
    "--tune-norms/--no-tune-norms",
    default=_DEFAULTS.tune_norms,
    show_default=True,
    help="Also fine-tune the LayerNorm (and other normalisation) parameters; free at inference.",
)
@click.option(
    "--budget-unit",
    type=click.Choice(UNITS),
    default=_DEFAULTS.budget_unit,
    show_default=True,
    help="What BUDGET is a fraction of: flops, the layers' dense multiply-adds; time, their dense "
    "time as the compiler's cost model estimates it, each layer charged as the default "
    "`gblrc lower` lowers it (whole components, not trimmed widths, cost time there), so the "
    "learned structure is the one that lowers fast. Linear layers only.",
)
@click.option(
    "--train-rest",
    is_flag=True,
    default=_DEFAULTS.train_rest,
    help="Also train every parameter outside the compressed layers (embeddings, norms, heads that "
    "are not compressed): for training structured layers from scratch, where those start random.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default=CLI_DEVICE,
    show_default=True,
    help="Where to train: auto is CUDA when torch sees a GPU, else the CPU; cuda without one is an "
    "error. Under torchrun / accelerate launch each process takes its LOCAL_RANK GPU.",
)
@click.option(
    "--mixed-precision",
    type=click.Choice(PRECISIONS),
    default=_DEFAULTS.mixed_precision,
    show_default=True,
    help="bf16: the matrix products run in bfloat16 (torch.autocast); the Gaudi masks, widths, "
    "locations, the proximal step, optimizer state and losses stay fp32. For GPUs with bf16.",
)
@click.option(
    "--offload/--no-offload",
    default=_DEFAULTS.offload,
    show_default=True,
    help="Post-training (--steps 0) of a model too large for the device: the model and the cached "
    "activations stay on the CPU and only the block being measured, initialised or refined is on the "
    "--device. Same result as without; slower, by the transfers.",
)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option(
    "-o",
    "--output",
    "output",
    metavar="OUT",
    help="Output file [default: <model stem>.gblr.pt beside the model]. Also written: "
    "OUT.report.json and OUT.structure.png.",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=_DEFAULTS.checkpoint_every,
    show_default=True,
    help="Save a checkpoint in OUT.ckpt/ every N steps (0: never); removed after success.",
)
@click.option(
    "--resume",
    is_flag=True,
    default=_DEFAULTS.resume,
    help="Continue an interrupted run from its checkpoint in OUT.ckpt/.",
)
@click.option(
    "--trust-pickle",
    "--trust-remote-code",
    "trust",
    is_flag=True,
    help="Allow MODEL (or a .pt data file) to run its own code while loading: pickles with classes "
    "outside torch.nn, Hugging Face folders with custom code. Only for files you trust.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table.")
def compress(
    model,
    budget,
    target_fidelity,
    speed,
    data,
    eval_data,
    general_text,
    output,
    checkpoint_every,
    resume,
    trust,
    quiet,
    **settings,
):
    """Replace MODEL's nn.Linear layers by learned Generalized Block Low-Rank layers whose total cost
    is at most BUDGET x the dense cost, and write the compressed model.

    MODEL is a file saved with torch.save(model) (only torch.nn classes are loaded unless
    --trust-pickle) or a Hugging Face model folder (config.json; loaded offline).

    Layers: by default every nn.Linear (and GPT-2 Conv1D) except small ones (a side under 16)
    and output heads (lm_head, classifier, pooler, ..., or a plain model's last Linear);
    --include REGEX replaces that rule, --exclude REGEX removes layers from it.

    \b
    Examples:
      gblrc compress samples/digits_mlp.pt --budget 0.4 --data samples/digits_data.pt
      gblrc compress path/to/hf_folder --budget 0.5 --data sentences.txt --include '^encoder\\.'
    Then: gblrc lower <OUT> -o model.onnx
    """
    cfg = _config(budget, target_fidelity, data is not None, resume, checkpoint_every, quiet, settings)
    from gblrc.learn.blocks import large_allocations_mapped

    large_allocations_mapped()  # this process's peak memory close to its live tensors (design.md §5)
    if speed is not None and target_fidelity is None:
        raise GblrcError(f"--{'' if speed else 'no-'}speed only applies with --target-fidelity")
    from gblrc.io.loading import model_path

    mpath = model_path(model)  # before the output paths derived from it
    out = Path(output) if output else default_output(mpath)
    side = _checked_outputs(out, mpath)
    ckpt = Path(f"{out}.ckpt")
    resume = _check_resume(ckpt, resume)
    if checkpoint_every > 0:
        cfg = cfg.replace(checkpoint_dir=str(ckpt), resume=resume)
    inputs = read_inputs(mpath, data, eval_data, general_text, trust=trust, quiet=quiet, cfg=cfg)
    t0 = time.perf_counter()
    cmodel, report = train(inputs, cfg, target_fidelity, ckpt, quiet, speed=speed is not False)
    full = full_report(
        report, inputs, cfg, seconds=time.perf_counter() - t0 + inputs.seconds, resumed=resume, target=target_fidelity
    )
    if write_outputs(cmodel, full, inputs, out, side):
        if ckpt.is_dir():
            shutil.rmtree(ckpt, ignore_errors=True)
        print_summary(full, report, inputs, out, side, quiet)


def _config(budget, target_fidelity, has_data: bool, resume: bool, checkpoint_every: int, quiet: bool, settings: dict):
    """The CompressConfig of the command's settings (its options that are CompressConfig fields), checked by the API."""
    from gblrc.learn.compress import CompressConfig
    from gblrc.learn.target import check_target

    if budget is None and target_fidelity is None:
        raise GblrcError("give --budget B (a fraction of the dense cost), or --target-fidelity F to choose it")
    with api_errors(failed=_FAILED):  # every value is checked once, by the API; its errors name the flags here
        if target_fidelity is not None:
            check_target(target_fidelity, has_data, resume)
        return CompressConfig(budget=1.0 if budget is None else budget).replace(
            checkpoint_every=max(checkpoint_every, 1), progress=not quiet, **settings
        )


def _checked_outputs(out: Path, mpath: Path) -> list[Path]:
    """Check OUT and its side files (report, picture) can be written; return the side files."""
    check_output(out, mpath)
    side = [Path(f"{out}.report.json"), Path(f"{out}.structure.png")]
    for p in side:
        check_output(p, mpath)
    return side


def _check_resume(ckpt: Path, resume: bool) -> bool:
    """Whether to resume: --resume without a checkpoint warns and starts over; a stale checkpoint is an error."""
    if resume and not ckpt.is_dir():
        click.echo(f"warning: no checkpoint in {ckpt}; starting from the beginning", err=True)
        resume = False
    if not resume and ckpt.exists():
        raise GblrcError(
            f"a checkpoint of an interrupted run exists in {str(ckpt)!r}; rerun with --resume to "
            f"continue it, or delete that folder to start over"
        )
    return resume


@dataclass
class Inputs:
    """What `gblrc compress` read: the model, its data, the example inputs for `lower`, a judge."""

    path: Path
    loaded: object
    data: object
    data_spec: str | None
    eval_spec: str | None
    evald: object
    example: object
    judge: object
    general_text: int
    seconds: float


def read_inputs(mpath, data_spec, eval_spec, general_text, *, trust, quiet, cfg) -> Inputs:
    """Load the model and the data (text mixed with built-in English unless --general-text 0)."""
    import torch

    from gblrc.io.datafiles import (
        GENERAL_TEXT,
        check_fits,
        example_inputs,
        guess_example_inputs,
        is_text_data,
        load_data,
    )
    from gblrc.io.loading import load_model
    from gblrc.learn.fidelity import probe_judge

    t0 = time.perf_counter()
    loaded = load_model(mpath, trust=trust)
    if general_text is None:
        general_text = GENERAL_TEXT if is_text_data(data_spec) else 0
        if general_text and not quiet:
            click.echo(
                f"mixing {general_text} sentences of built-in English into the text data "
                f"(--general-text 0 turns it off)",
                err=True,
            )
    kw = dict(trust=trust, batch_size=cfg.batch_size, seed=cfg.seed)
    data = load_data(data_spec, loaded, general_text=general_text, **kw)
    evald = load_data(eval_spec, loaded, **kw) if eval_spec else None
    if evald is not None:
        check_fits(loaded.model, evald.sample)
    if data is None:  # the API reports the "initialisation only" warning
        sample = guess_example_inputs(loaded)
    else:
        check_fits(loaded.model, data.sample)
        sample = data.sample
    ex = example_inputs(loaded.model, sample, loaded.kind) if sample is not None else None
    if ex is None:
        click.echo("warning: no example inputs could be made; `gblrc lower` will need input shapes", err=True)
    probe = (
        None
        if data is None
        else (
            data.eval_inputs
            if data.eval_inputs is not None
            else data.train["inputs"]
            if isinstance(data.train, dict)
            else data.train
            if isinstance(data.train, torch.Tensor)
            else data.sample
        )
    )
    judge = probe_judge(
        loaded.model, probe if probe is not None else sample, None if data is None else data.eval_targets
    )
    return Inputs(mpath, loaded, data, data_spec, eval_spec, evald, ex, judge, general_text, time.perf_counter() - t0)


def train(inputs: Inputs, cfg, target, ckpt, quiet, speed: bool = True):
    """gblrc.compress (or the search for the budget with --target-fidelity, and with ``speed`` the timing of
    its result lowered to ONNX) on the loaded model."""
    from gblrc.export.speed import measure_speed
    from gblrc.learn.compress import compress as compress_model
    from gblrc.learn.dist import rank_world
    from gblrc.learn.target import compress_to_fidelity

    speed = speed and target is not None and rank_world()[0] == 0  # under torchrun: rank 0 measures
    if speed and inputs.example is None:
        click.echo("warning: speed of the lowered model not measured: no example inputs to time it at", err=True)
    data = None if inputs.data is None else inputs.data.train
    evs = None if inputs.evald is None else inputs.evald.train
    try:
        # the warnings come back in report["warnings"], printed after
        with api_errors(failed=_FAILED), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if target is None:
                return compress_model(inputs.loaded.model, cfg, data=data, eval_data=evs)
            if not quiet:
                click.echo(
                    f"searching the smallest budget <= {cfg.budget:g} with held-out fidelity >= {target}", err=True
                )
            log = None if quiet else (lambda s: click.echo(s, err=True))
            cmodel, report = compress_to_fidelity(
                inputs.loaded.model,
                target,
                data=data,
                eval_data=evs,
                config=cfg.replace(progress=False, checkpoint_dir=None),
                log=log,
            )
            if speed and inputs.example is not None:
                measure_speed(cmodel, report, inputs.example, log=log)
            return cmodel, report
    except KeyboardInterrupt:
        hint = f"; rerun with --resume to continue from {ckpt}" if ckpt.is_dir() else ""
        raise GblrcError(f"interrupted{hint}") from None


def full_report(report, inputs: Inputs, cfg, *, seconds, resumed, target) -> dict:
    """The report written beside the model: compress's, plus the settings and the agreement on the probe."""
    from gblrc.learn.config import result_settings

    full = dict(report)
    full.update(
        model=str(inputs.path),
        data=inputs.data_spec,
        seconds=round(seconds, 2),
        settings={  # every result-affecting setting of the config (one list: gblrc.learn.config), then the CLI's
            **result_settings(cfg),
            "device": cfg.device,
            "refine_steps": report.get("refine", {}).get("steps", 0),  # auto resolved
            "general_text": inputs.general_text,
            "eval_data": inputs.eval_spec,
            "resumed": resumed,
            "target_fidelity": target,
        },
        agreement_with_dense=None,
    )
    return full


def write_outputs(cmodel, full, inputs: Inputs, out, side) -> bool:
    """Write MODEL.gblr.pt, its report and picture, all or none (rank 0 only under torchrun); False on
    the other ranks."""
    from gblrc.io.modelio import save
    from gblrc.learn.dist import rank_world
    from gblrc.learn.report import draw_structure, write_json

    cmodel.cpu().eval()  # saved and judged on the CPU, wherever it trained
    if rank_world()[0] != 0:  # under torchrun / accelerate launch: every rank holds the same model, rank 0 writes
        return False
    judge, data = inputs.judge, inputs.data
    full["agreement_with_dense"] = judge(cmodel) if judge is not None else None
    before = judge.dense.get("accuracy") if judge is not None else None
    if before is not None:
        full.update(
            accuracy_before=before,
            accuracy_after=full["agreement_with_dense"].get("accuracy"),
            accuracy_set=f"{data.eval_name} set, {min(len(data.eval_targets), 512)} examples",
        )
    full["output"] = str(out)
    budget = full["budget"]
    meta = {"budget": budget, "achieved_ratio": full.get("achieved_ratio"), "source": str(inputs.path)}
    with atomic_outputs(out, *side) as (t_out, t_json, t_png):
        save(cmodel, t_out, example_inputs=inputs.example, meta=meta, auto_class=inputs.loaded.auto_class)
        write_json(full, t_json)
        draw_structure(
            cmodel, t_png, title=f"{inputs.path.name}: budget {budget}, achieved {full['achieved_ratio']:.3f}"
        )
    return True


def print_summary(full, report, inputs: Inputs, out, side, quiet) -> None:
    for w in report.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        _summary(report)
    if "accuracy_before" in full:
        click.echo(
            f"accuracy ({full['accuracy_set']}): dense {full['accuracy_before']:.4f} -> compressed "
            f"{full['accuracy_after']:.4f}"
        )
    _fidelity_lines(report, inputs.eval_spec)
    mv = report.get("structure_moved")
    if mv and report.get("steps", 0) > 0:
        click.echo(
            f"structure moved by training: {100 * mv['blocks_changed']:.1f}% of the initial blocks changed, "
            f"{100 * mv['cost_moved']:.1f}% of the cost moved between layers"
        )
    if full["agreement_with_dense"]:
        click.echo(f"output cosine to the dense model: {full['agreement_with_dense']['cosine']:.4f}")
    click.echo(
        f"wrote {out} (achieved {report.get('budget_unit', 'flops')} ratio {report['achieved_ratio']:.4f}, "
        f"budget {full['budget']}), {side[0].name}, {side[1].name}"
    )
