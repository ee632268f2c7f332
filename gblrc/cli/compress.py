"""`gblrc compress`: learn GBLR layers under a cost budget and write MODEL.gblr.pt + report + picture."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import click

from gblrc.errors import GblrcError

__all__ = ["compress"]


def parse_budget(text: str) -> float:
    try:
        b = float(text)
    except (TypeError, ValueError):
        raise GblrcError(f"--budget must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < b <= 1.0):  # also rejects NaN
        raise GblrcError(f"--budget must be in (0, 1] (a fraction of the dense cost), got {text}")
    return b


def _regex(text: str | None, flag: str) -> str | None:
    if text is not None:
        try:
            re.compile(text)
        except re.error as e:
            raise GblrcError(f"{flag} {text!r} is not a valid regular expression: {e}") from None
    return text


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


def _check_weights(model) -> None:
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise GblrcError(f"the model's weights contain NaN or Inf (parameter {name!r}); fix the model first")


@contextlib.contextmanager
def atomic_outputs(*paths: Path):
    """Temporary paths for several outputs; renamed into place only if all are written (main file last)."""
    from gblrc.io.fileio import atomic_path

    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]  # exits in reverse: paths[0] last
        yield tmps
        umask = os.umask(0)
        os.umask(umask)
        for t in tmps:  # mkstemp makes 0600 files; give them the usual permissions
            os.chmod(t, 0o666 & ~umask)


def _fidelity_lines(report: dict, eval_spec) -> None:
    fid = report.get("fidelity")
    search = report.get("fidelity_search")
    if search:
        click.echo(f"fidelity / budget curve (target {search['target']}, eval set {search['eval_set']}):")
        for p in search["curve"]:
            how = "trained" if p["trained"] else "init"
            click.echo(f"  budget {p['budget']:.4f} ({how}): cosine {p['cosine']:.4f} (min {p['cosine_min']:.3f})")
        click.echo(f"chosen budget: {search['chosen_budget']:g}")
    if fid:
        where = eval_spec or "held-out part of the data"
        parts = [f"after init {fid['init']['cosine']:.4f}"] if "init" in fid else []
        parts.append(f"final {fid['final']['cosine']:.4f} (min {fid['final']['cosine_min']:.3f})")
        acc = fid["final"].get("accuracy")
        if acc is not None:
            parts.append(f"accuracy {acc:.4f} (dense {fid['dense'].get('accuracy', float('nan')):.4f})")
        click.echo(f"fidelity on {where} ({fid['examples']} examples), cosine to the dense model: " + ", ".join(parts))


def _agreement_judge(model, probe, targets):
    """A Fidelity on the first 512 examples of ``probe`` (with ``targets`` when they match it), or None
    when there is no probe or the model's output tensor cannot be found."""
    from gblrc.learn.data import batch_rows
    from gblrc.learn.fidelity import Fidelity, eval_batches

    if probe is None:
        return None
    data = {"inputs": probe}
    if targets is not None and len(targets) == batch_rows(probe):
        data["targets"] = targets
    try:
        return Fidelity(model, eval_batches(data, limit=512))
    except ValueError:
        return None


def _summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    unit = report.get("budget_unit", "flops")
    timed = "time_ratio" in report
    t = Table(title=f"GBLR compression: budget {report['budget']:.3f} ({unit}), achieved {report['achieved_ratio']:.4f}")
    cols = [("layer", "left"), ("shape (out x in)", "right"), ("dense cost", "right"), ("GBLR cost", "right"),
            ("FLOP ratio", "right"), ("blocks", "right")]
    if timed:
        cols += [("est. time ratio", "right"), ("lowering", "left")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for L in report["layers"]:
        shape = "x".join(str(s) for s in L["shape"])
        extra = [f"{L['time_ratio']:.3f}", L["lowering"]] if timed else []
        t.add_row(L["name"], shape, f"{L['dense_cost']:,}", f"{L['gblr_cost']:,}", f"{L['ratio']:.3f}", str(L["blocks"]),
                  *extra)
    extra = [f"{report['time_ratio']:.4f}", ""] if timed else []
    t.add_row("total", "", f"{report['dense_cost']:,}", f"{report['gblr_cost']:,}",
              f"{report.get('flop_ratio', report['achieved_ratio']):.4f}", str(sum(L["blocks"] for L in report["layers"])),
              *extra, style="bold")
    Console(width=110).print(t)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model", metavar="MODEL")
@click.option("--budget", "-b", metavar="B",
              help="Cost of the compressed layers as a fraction of their dense multiply-adds (of their dense "
                   "time with --budget-unit time), in (0, 1]. "
                   "Required unless --target-fidelity is given (then it is the largest budget allowed).")
@click.option("--target-fidelity", type=float, metavar="F",
              help="Choose the budget: the smallest whose held-out fidelity (mean cosine to the dense model "
                   "on --eval-data, or on a part of --data held out) is at least F, e.g. 0.98. Searches "
                   "budgets with the cheap initialisation, then trains at the chosen one; prints the "
                   "curve and records it in the report.")
@click.option("--data", "-d", metavar="D",
              help="Training data: a .pt file (a tensor of inputs, or a dict with 'inputs' and optional 'targets', "
                   "'eval_inputs', 'eval_targets'); a text file, one example per line (Hugging Face models, "
                   "tokenised by the model's tokenizer); or module:function returning an iterable of batches. "
                   "With targets the task loss is used, otherwise distillation from the dense model. "
                   "Without --data only the initialisation from the dense weights is done.")
@click.option("--eval-data", metavar="E",
              help="Examples to judge fidelity on, in the forms of --data (best from another source than "
                   "--data: users' inputs are never the training set). The report and the console give "
                   "the cosine to the dense model (and accuracy, with class targets) after the "
                   "initialisation and at the end.")
@click.option("--steps", type=click.IntRange(min=0), default=200, show_default=True,
              help="Training steps. 0 with --data: post-training compression only (data-aware "
                   "initialisation, sequential refit and budget allocation, no fine-tuning).")
@click.option("--general-text", type=click.IntRange(min=0), default=None, metavar="N",
              help="Text --data only: add N sentences of built-in general English (docstrings of installed "
                   "packages) to the training text, the file's lines repeated to stay half of it, so the "
                   "compressed model stays faithful on text unlike the file's (on MiniLM: +0.04 cosine on "
                   "other text, -0.003 on the file's own). [default: 12000 for text data; 0 turns it off]")
@click.option("--hidden-loss", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Distillation: weight of matching every block's hidden state (Hugging Face models).")
@click.option("--augment", type=click.FloatRange(min=0, max=0.9), default=0.0, show_default=True,
              help="Distillation: fraction of tokens replaced by random ones in every training batch "
                   "(text models), so the student imitates the teacher beyond the training text.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True, help="Learning rate.")
@click.option("--include", metavar="REGEX", help="Compress only Linear layers whose name matches REGEX.")
@click.option("--exclude", metavar="REGEX", help="Leave Linear layers whose name matches REGEX dense.")
@click.option("--rank-per-component", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rank of each GBLR component (above 1 gives fewer, larger blocks that lower faster).")
@click.option("--tile", type=click.IntRange(min=1), default=1, show_default=True,
              help="Block widths and starts become multiples of this many rows/columns (e.g. 32: a coarser "
                   "structure that lowers to fewer, larger slices).")
@click.option("--structure", type=click.Choice(["gblr", "lowrank"]), default="gblr", show_default=True,
              help="gblr: learn block widths and locations (the method); lowrank: truncated SVD at the same "
                   "cost with the same fine-tuning (full fixed widths), a baseline to compare against.")
@click.option("--allocate", type=click.Choice(["auto", "sensitivity", "uniform"]), default="auto", show_default=True,
              help="How the budget is split across layers before training: sensitivity measures how much "
                   "truncating each layer alone changes the output (a few forward passes per layer) and gives "
                   "sensitive layers more; uniform gives every layer the same fraction; auto: sensitivity "
                   "when there is --data and every layer is linear (not Conv2d), else uniform.")
@click.option("--tune-norms/--no-tune-norms", default=False, show_default=True,
              help="Also fine-tune the LayerNorm (and other normalisation) parameters; free at inference.")
@click.option("--budget-unit", type=click.Choice(["flops", "time"]), default="flops", show_default=True,
              help="What BUDGET is a fraction of: flops, the layers' dense multiply-adds; time, their dense "
                   "time as the compiler's cost model estimates it, each layer charged as the default "
                   "`gblrc lower` lowers it (whole components, not trimmed widths, cost time there), so the "
                   "learned structure is the one that lowers fast. Linear layers only.")
@click.option("--train-rest", is_flag=True,
              help="Also train every parameter outside the compressed layers (embeddings, norms, heads that "
                   "are not compressed): for training structured layers from scratch, where those start random.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to train: auto is CUDA when torch sees a GPU, else the CPU; cuda without one is an "
                   "error. Under torchrun / accelerate launch each process takes its LOCAL_RANK GPU.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default="no", show_default=True,
              help="bf16: the matrix products run in bfloat16 (torch.autocast); the Gaudi masks, widths, "
                   "locations, the proximal step, optimizer state and losses stay fp32. For GPUs with bf16.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", "output", metavar="OUT",
              help="Output file [default: <model stem>.gblr.pt beside the model]. Also written: "
                   "OUT.report.json and OUT.structure.png.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Save a checkpoint in OUT.ckpt/ every N steps (0: never); removed after success.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint in OUT.ckpt/.")
@click.option("--trust-pickle", "--trust-remote-code", "trust", is_flag=True,
              help="Allow MODEL (or a .pt data file) to run its own code while loading: pickles with classes "
                   "outside torch.nn, Hugging Face folders with custom code. Only for files you trust.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table.")
def compress(model, budget, target_fidelity, eval_data, general_text, hidden_loss, augment, data, steps, batch_size, lr, include, exclude, rank_per_component, tile, structure,
             allocate, tune_norms, budget_unit, train_rest, device, mixed_precision, seed, output, checkpoint_every, resume,
             trust, quiet):
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
    if target_fidelity is not None:
        if not (0.0 < target_fidelity < 1.0):
            raise GblrcError(f"--target-fidelity must be a cosine in (0, 1), e.g. 0.98; got {target_fidelity}")
        if data is None:
            raise GblrcError("--target-fidelity needs --data (to initialise and to measure fidelity on)")
        if resume:
            raise GblrcError("--resume does not apply with --target-fidelity (its runs keep no checkpoints)")
        b = parse_budget(budget) if budget is not None else 1.0
    elif budget is None:
        raise GblrcError("give --budget B (a fraction of the dense cost), or --target-fidelity F to choose it")
    else:
        b = parse_budget(budget)
    include, exclude = _regex(include, "--include"), _regex(exclude, "--exclude")
    mpath = Path(model)
    if not mpath.exists():
        raise GblrcError(f"model {model!r} does not exist; give a .pt file saved with torch.save(model) or a Hugging Face folder")
    out = Path(output) if output else default_output(mpath)
    check_output(out, mpath)
    side = [Path(f"{out}.report.json"), Path(f"{out}.structure.png")]
    for p in side:
        check_output(p, mpath)
    ckpt = Path(f"{out}.ckpt")
    if resume and not ckpt.is_dir():
        click.echo(f"warning: no checkpoint in {ckpt}; starting from the beginning", err=True)
        resume = False
    if not resume and ckpt.exists():
        raise GblrcError(f"a checkpoint of an interrupted run exists in {str(ckpt)!r}; rerun with --resume to "
                         f"continue it, or delete that folder to start over")
    run(mpath, out, side, ckpt, b, data, steps=steps, batch_size=batch_size, lr=lr, include=include,
        exclude=exclude, method={"rank_per_component": rank_per_component, "tile": tile, "structure": structure,
                                      "allocate": allocate, "tune_norms": tune_norms, "train_rest": train_rest,
                                      "budget_unit": budget_unit, "device": device,
                                      "mixed_precision": mixed_precision,
                                      "hidden_loss": hidden_loss, "augment": augment},
        eval_spec=eval_data, target=target_fidelity, general_text=general_text,
        seed=seed, checkpoint_every=checkpoint_every, resume=resume, trust=trust, quiet=quiet)


def run(mpath, out, side, ckpt, budget, data_spec, *, steps, batch_size, lr, include, exclude,
        method, seed, checkpoint_every, resume, trust, quiet, eval_spec=None, target=None, general_text=0):
    import torch

    from gblrc.learn.compress import compress as train
    from gblrc.learn.target import compress_to_fidelity
    from gblrc.io.datafiles import GENERAL_TEXT, check_fits, example_inputs, guess_example_inputs, is_text_data, load_data
    from gblrc.io.loading import load_model
    from gblrc.io.modelio import save
    from gblrc.nn.replace import find_linears
    from gblrc.learn.report import draw_structure, write_json

    t0 = time.perf_counter()
    loaded = load_model(mpath, trust=trust)
    _check_weights(loaded.model)
    if not find_linears(loaded.model, include, exclude):
        what = "" if include is None and exclude is None else " matching --include/--exclude"
        raise GblrcError(f"{str(mpath)!r} has no compressible layer (nn.Linear / Conv2d){what}; nothing to compress")
    if general_text and data_spec is None:
        raise GblrcError("--general-text needs --data (a text file to mix it into)")
    if general_text is None:
        general_text = GENERAL_TEXT if is_text_data(data_spec) else 0
        if general_text and not quiet:
            click.echo(f"mixing {general_text} sentences of built-in English into the text data "
                       f"(--general-text 0 turns it off)", err=True)
    data = load_data(data_spec, loaded, trust=trust, batch_size=batch_size, seed=seed, general_text=general_text)
    evald = load_data(eval_spec, loaded, trust=trust, batch_size=batch_size, seed=seed) if eval_spec else None
    if evald is not None:
        check_fits(loaded.model, evald.sample)
    if data is None:  # the trainer reports the "initialisation only" warning
        sample = guess_example_inputs(loaded)
    else:
        check_fits(loaded.model, data.sample)
        sample = data.sample
    ex = example_inputs(loaded.model, sample, loaded.kind) if sample is not None else None
    if ex is None:
        click.echo("warning: no example inputs could be made; `gblrc lower` will need input shapes", err=True)
    probe = None if data is None else (data.eval_inputs if data.eval_inputs is not None else
                                       data.train["inputs"] if isinstance(data.train, dict) else
                                       data.train if isinstance(data.train, torch.Tensor) else data.sample)
    probe = probe if probe is not None else sample
    judge = _agreement_judge(loaded.model, probe, None if data is None else data.eval_targets)
    acc_before = judge.dense.get("accuracy") if judge is not None else None

    ckpt_dir = str(ckpt) if checkpoint_every > 0 else None
    try:
        with warnings.catch_warnings():  # they come back in report["warnings"], printed below
            warnings.simplefilter("ignore")
            kw = dict(batch_size=batch_size, lr=lr, include=include, exclude=exclude, seed=seed, **method)
            evs = None if evald is None else evald.train
            if target is not None:
                if not quiet:
                    click.echo(f"searching the smallest budget <= {budget:g} with held-out fidelity >= {target}",
                               err=True)
                cmodel, report = compress_to_fidelity(loaded.model, target, data=data.train, eval_data=evs,
                                                      max_budget=budget, steps=steps, progress=False,
                                                      log=None if quiet else (lambda s: click.echo(s, err=True)), **kw)
                budget = report["budget"]
            else:
                cmodel, report = train(loaded.model, budget, data=None if data is None else data.train, steps=steps,
                                       checkpoint_dir=ckpt_dir, eval_data=evs, **kw,
                                       checkpoint_every=max(checkpoint_every, 1), resume=resume, progress=not quiet)
    except ValueError as e:
        raise GblrcError(" ".join(str(e).split()) or "compression failed") from None
    except KeyboardInterrupt:
        hint = f"; rerun with --resume to continue from {ckpt}" if ckpt.is_dir() else ""
        raise GblrcError(f"interrupted{hint}") from None
    cmodel.cpu().eval()  # saved and judged on the CPU, wherever it trained
    from gblrc.learn.dist import rank_world

    if rank_world()[0] != 0:  # under torchrun / accelerate launch: every rank holds the same model, rank 0 writes
        return

    agreement = judge(cmodel) if judge is not None else None
    acc_after = agreement.get("accuracy") if agreement is not None else None
    full = dict(report)
    full.update(model=str(mpath), data=data_spec, output=str(out), seconds=round(time.perf_counter() - t0, 2),
                settings={"steps": steps, "batch_size": batch_size, "lr": lr, "include": include,
                          "exclude": exclude, "seed": seed, **method, "general_text": general_text, "eval_data": eval_spec,
                          "resumed": resume},
                agreement_with_dense=agreement)
    if acc_before is not None:
        full.update(accuracy_before=acc_before, accuracy_after=acc_after,
                    accuracy_set=f"{data.eval_name} set, {min(len(data.eval_targets), 512)} examples")
    meta = {"budget": budget, "achieved_ratio": report.get("achieved_ratio"), "source": str(mpath)}
    with atomic_outputs(out, *side) as (t_out, t_json, t_png):
        save(cmodel, t_out, example_inputs=ex, meta=meta, auto_class=loaded.auto_class)
        write_json(full, t_json)
        draw_structure(cmodel, t_png, title=f"{mpath.name}: budget {budget}, achieved {report['achieved_ratio']:.3f}")
    if ckpt.is_dir():
        shutil.rmtree(ckpt, ignore_errors=True)
    for w in report.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        _summary(report)
    if acc_before is not None:
        click.echo(f"accuracy ({full['accuracy_set']}): dense {acc_before:.4f} -> compressed {acc_after:.4f}")
    _fidelity_lines(report, eval_spec)
    mv = report.get("structure_moved")
    if mv and report.get("steps", 0) > 0:
        click.echo(f"structure moved by training: {100 * mv['blocks_changed']:.1f}% of the initial blocks changed, "
                   f"{100 * mv['cost_moved']:.1f}% of the cost moved between layers")
    if full["agreement_with_dense"]:
        click.echo(f"output cosine to the dense model: {full['agreement_with_dense']['cosine']:.4f}")
    click.echo(f"wrote {out} (achieved {report.get('budget_unit', 'flops')} ratio {report['achieved_ratio']:.4f}, budget {budget}), "
               f"{side[0].name}, {side[1].name}")
