"""``gblrc.compress``: learn GBLR layers for a model's linear layers under a cost budget.

:func:`compress` is a sequence of named stages over one :class:`Run` (the model and what each stage
found): :func:`check_options`, :func:`start`, :func:`read_data`, :func:`calibrate`, :func:`allocate`,
:func:`initialise`, :func:`train`, :func:`harden`, :func:`make_report`.
"""
from __future__ import annotations

import copy
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gblrc.learn import dist
from gblrc.learn.allocate import GRID, allocate_budgets, uniform_time_ratios
from gblrc.learn.budget import FLOPS, TimeCost, compact, cost_ratio, cost_unit, fit_to_budget
from gblrc.learn.data import batch_stream, replayable, call_model, model_output, to_device
from gblrc.learn.fidelity import Fidelity, eval_batches
from gblrc.learn.objective import Objective, task_loss
from gblrc.nn.fit import check_budget
from gblrc.nn.layer import svd_layer
from gblrc.learn.calib import input_covariances, sequential_refit, whiten_layer
from gblrc.nn.layer import GBLRLinear
from gblrc.nn.replace import as_linear, find_linears, is_linear, replace_linears, set_module
from gblrc.learn.report import structure_movement
from gblrc.learn.train import TrainConfig, Trainer

__all__ = ["compress", "Options", "Run", "check_options", "start", "read_data", "calibrate", "allocate",
           "initialise", "train", "harden", "make_report"]

NO_DATA_WARNING = ("no data given: the GBLR layers are only initialised from the dense weights (no training); "
                   "give data for better accuracy")


def _io(m) -> tuple[int, int]:
    lin = as_linear(m) if not isinstance(m, nn.Linear) else m
    return lin.in_features, lin.out_features


def _norm_params(model) -> list:
    """The affine parameters of the model's normalisation layers (LayerNorm, RMSNorm, BatchNorm ...)."""
    return [p for m in model.modules() if "Norm" in type(m).__name__ and not isinstance(m, GBLRLinear)
            for p in m.parameters(recurse=False) if p.is_floating_point()]


def _rest_params(model, layers) -> list:
    """The model's trainable floating-point parameters outside the compressed ``layers``."""
    inside = {id(p) for m in layers for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in inside and p.is_floating_point() and p.requires_grad]


def _check_fits(model, x, y, distill: bool) -> None:
    """One batch through the model: a one-line ValueError when it does not fit."""
    try:
        with torch.no_grad():
            out = model_output(call_model(model, x))
    except ValueError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"the data does not fit the model: {msg}; give inputs of the shape the model expects") from None
    if y is not None and not distill:
        task_loss(out, y)  # raises ValueError when the targets do not fit


def _report(budget, layers: dict, curve, steps: int, warn: list) -> dict:
    rows = []
    for name, m in layers.items():
        rows.append({"name": name, "shape": [m.out_features, m.in_features], "dense_cost": m.dense_flops(),
                     "gblr_cost": m.flops(), "blocks": len(m.structure().structure.blocks),
                     "ratio": m.flops() / m.dense_flops()})
    dense = sum(r["dense_cost"] for r in rows)
    cost = sum(r["gblr_cost"] for r in rows)
    return {"budget": budget, "achieved_ratio": cost / dense, "dense_cost": dense, "gblr_cost": cost,
            "steps": steps, "layers": rows, "loss_curve": curve, "warnings": warn}


def compress(model: nn.Module, budget: float, *, data=None, steps: int = 200, batch_size: int = 32,
             lr: float = 1e-3, include=None, exclude=None, seed: int = 0, loss="auto",
             rank_per_component: int = 1, checkpoint_dir=None, checkpoint_every: int = 50, resume: bool = False,
             progress: bool = True, structure: str = "gblr", lr_struct: float | None = None,
             init_factor: float = 1.0, layer_loss: float = 1.0, warmup: float = 0.1, cooldown: float = 0.2,
             sigma_max: float = 100.0, init: str = "sequential", calib_batches: int = 16,
             hard_forward: bool = True, tile: int = 1, lr_min: float = 0.1,
             allocate: str = "auto", sensitivity_batches: int = 1, allocate_cap: float | None = None,
             tune_norms: bool = False, eval_data=None, hidden_loss: float = 0.0,
             augment: float = 0.0, train_rest: bool = False, budget_unit: str = "flops") -> tuple[nn.Module, dict]:
    """Replace ``model``'s linear layers (in place) by GBLR layers whose total cost is <= ``budget``.

    ``data``: None (initialisation only), a Tensor of inputs, {"inputs", "targets"}, or an iterable /
    callable of batches (see :mod:`gblrc.learn.data`).  With targets the task loss is trained (``loss="auto"``
    or ``"task"``), otherwise (or with ``loss="distill"``) the model imitates its dense self.
    ``init``: "data" (truncated SVD in the metric of each layer's inputs on ``calib_batches`` batches,
    :mod:`gblrc.learn.calib`), "sequential" (then each layer refitted in call order to the teacher's output from
    the compressed model's own inputs, :func:`gblrc.learn.calib.sequential_refit`) or "svd" (plain truncated
    SVD, :func:`gblrc.nn.layer.fit_dense`).
    ``structure``: "gblr" (learned widths/locations from an initialisation at ``init_factor`` x budget)
    or "lowrank" (truncated SVD at the budget, full widths, content fine-tuned only).
    ``rank_per_component`` and ``tile`` (widths and starts multiples of ``tile`` elements) make the learned
    structure coarser and easier for the lowering passes to turn into speed (README, "Structure options").
    ``allocate``: "uniform" (every layer starts at the same cost ratio), "sensitivity" (per-layer
    ratios from each layer's measured effect on the output on ``sensitivity_batches`` batches,
    :mod:`gblrc.learn.allocate`; needs data and a data-aware ``init``; linear layers only; a warning and
    uniform otherwise) or "auto" (sensitivity where it applies, else uniform, silently); no layer gets more
    than ``allocate_cap`` x budget (None: up to its dense cost).
    ``tune_norms``: also fine-tune the model's normalisation layers (LayerNorm, RMSNorm, BatchNorm
    affine parameters) with the content; they cost nothing at inference.
    ``train_rest``: also train every parameter outside the compressed layers (embeddings, heads that are
    not compressed, norms, other modules' biases) with the content: for structured layers trained from
    scratch, where those start random too (``benchmarks/scratch_structures.py``).
    ``eval_data``: examples to judge fidelity on (same forms as ``data``; best from another source than
    ``data``): the report's ``fidelity`` gives the cosine to the dense model (and the task metric with
    class targets) after the initialisation and at the end (:mod:`gblrc.learn.fidelity`).
    ``budget_unit``: what ``budget`` is a fraction of: "flops" (the layers' dense multiply-adds) or
    "time" (their dense time as the compiler estimates it, :mod:`gblrc.learn.budget`: each layer charged
    as the default ``gblrc lower`` would lower it, so the learned structure is the one that lowers fast;
    linear layers only).  The report gives both ratios either way.
    Returns (model in eval mode, report dict).  Raises ValueError on bad input.
    """
    opt = check_options(budget, **{k: v for k, v in locals().items() if k not in ("model", "budget")})
    run = start(model, opt)
    for stage in STAGES:  # (a module constant: the parameter ``allocate`` shadows the stage's name here)
        stage(run)
    return run.model, make_report(run)


@dataclass(frozen=True)
class Options:
    """The arguments of :func:`compress`, checked (see its docstring)."""

    budget: float
    data: object = None
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    include: object = None
    exclude: object = None
    seed: int = 0
    loss: str = "auto"
    rank_per_component: int = 1
    checkpoint_dir: object = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    structure: str = "gblr"
    lr_struct: float | None = None
    init_factor: float = 1.0
    layer_loss: float = 1.0
    warmup: float = 0.1
    cooldown: float = 0.2
    sigma_max: float = 100.0
    init: str = "sequential"
    calib_batches: int = 16
    hard_forward: bool = True
    tile: int = 1
    lr_min: float = 0.1
    allocate: str = "auto"
    sensitivity_batches: int = 1
    allocate_cap: float | None = None
    tune_norms: bool = False
    eval_data: object = None
    hidden_loss: float = 0.0
    augment: float = 0.0
    train_rest: bool = False
    budget_unit: str = "flops"


def check_options(budget, **kw) -> Options:
    """Stage 0: :class:`Options` from compress()'s arguments; ValueError on a bad value."""
    o = Options(budget=check_budget(budget), **kw)
    if o.structure not in ("gblr", "lowrank"):
        raise ValueError(f"structure must be 'gblr' or 'lowrank', got {o.structure!r}")
    if o.init not in ("data", "sequential", "svd"):
        raise ValueError(f"init must be 'data', 'sequential' or 'svd', got {o.init!r}")
    if o.allocate not in ("auto", "uniform", "sensitivity"):
        raise ValueError(f"allocate must be 'auto', 'uniform' or 'sensitivity', got {o.allocate!r}")
    if o.loss not in ("auto", "task", "distill"):
        raise ValueError(f"loss must be 'auto', 'task' or 'distill', got {o.loss!r}")
    cost_unit(o.budget_unit)  # ValueError on an unknown unit
    if int(o.steps) < 0 or int(o.batch_size) < 1 or int(o.rank_per_component) < 1 or int(o.tile) < 1:
        raise ValueError("steps must be >= 0, batch_size, rank_per_component and tile >= 1")
    return o


@dataclass
class Run:
    """What the stages share: the model being compressed (in place) and what each stage found."""

    model: nn.Module
    opt: Options
    names: list[str]
    pairs: list
    device: torch.device
    rank: int = 0
    world: int = 1
    steps: int = 0  # training steps still to run (0 without data)
    warnings: list[str] = field(default_factory=list)
    judge: Fidelity | None = None  # fidelity on eval_data
    data: object = None  # replayable training data
    x: object = None  # the first training batch's inputs
    teacher: nn.Module | None = None  # frozen dense copy (distillation)
    dense_ref: nn.Module | None = None  # dense copy for the sequential refit
    dense_w: dict | None = None  # name -> dense weight (data-aware init)
    covs: dict | None = None  # name -> input covariance of the dense model
    xs: list | None = None  # calibration batches
    budgets: dict = field(default_factory=dict)  # name -> cost ratio before training
    allocated: str = "uniform"
    layers: dict = field(default_factory=dict)  # name -> GBLRLinear
    fidelity: dict = field(default_factory=dict)
    initial: dict = field(default_factory=dict)  # name -> Structure after initialise (before training)
    curve: list = field(default_factory=list)
    train_seconds: float = 0.0
    unit: object = FLOPS  # the budget's cost unit (gblrc.learn.budget)

    def warn(self, msg: str) -> None:
        """A warning for the user: in the report and as a Python warning."""
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)  # Run.warn <- stage <- compress <- the caller


def start(model: nn.Module, opt: Options) -> Run:
    """Stage 1: check the model, find its compressible layers, set up ranks and seeds."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"the model has NaN or Inf values in {name!r}; fix the model before compressing")
    judge = Fidelity(model, eval_batches(opt.eval_data)) if opt.eval_data is not None else None
    pairs = find_linears(model, opt.include, opt.exclude)
    if not pairs:
        raise ValueError("the model has no compressible linear layer (nn.Linear / Conv1D / Conv2d)"
                         + (" matching include/exclude" if opt.include or opt.exclude else "")
                         + "; nothing to compress")
    if opt.budget_unit == "time" and any(not is_linear(m) for _, m in pairs):
        raise ValueError("budget_unit='time' is for linear layers (the cost model times MatMuls); this model has "
                         "convolutions: use budget_unit='flops' or exclude them")
    dev = next(model.parameters()).device
    rank, world = dist.setup(dev)
    torch.manual_seed(opt.seed)
    random.seed(opt.seed)
    np.random.seed(opt.seed)
    return Run(model, opt, [n for n, _ in pairs], pairs, dev, rank, world, steps=int(opt.steps), judge=judge,
               unit=cost_unit(opt.budget_unit))


def read_data(run: Run) -> None:
    """Stage 2: the first batch must fit the model; the teacher for distillation.  Without data only
    the initialisation runs (a warning); with ``steps=0`` it is post-training compression."""
    o = run.opt
    if o.data is None:
        run.warn(NO_DATA_WARNING)
        run.steps = 0
    else:
        run.data = replayable(o.data)  # a generator is read once and replayed
        x, y = next(batch_stream(run.data, o.batch_size, o.seed))
        distill = o.loss == "distill" or (o.loss == "auto" and y is None)
        if o.loss == "task" and y is None:
            raise ValueError("loss='task' needs targets in the data")
        run.model.eval()
        _check_fits(run.model, to_device(x, run.device), to_device(y, run.device), distill)
        run.x = x
        if distill and run.steps > 0:
            run.teacher = copy.deepcopy(run.model).eval().requires_grad_(False)
    if run.steps == 0 and (o.hidden_loss > 0 or o.augment > 0 or o.train_rest):
        run.warn("hidden-state loss, token augmentation and train_rest are training options; with no training steps "
                 "they do nothing")


def calibrate(run: Run) -> None:
    """Stage 3 (data-aware init): the dense weights and the layers' input covariances on the first
    ``calib_batches`` batches; a dense copy for the sequential refit."""
    o = run.opt
    if o.init == "svd" or run.data is None:
        return
    run.dense_w = {n: as_linear(m).weight.detach().clone() for n, m in run.pairs}
    if o.init == "sequential":
        run.dense_ref = run.teacher or copy.deepcopy(run.model).eval()
    it = batch_stream(run.data, o.batch_size, o.seed)
    run.xs = [to_device(next(it)[0], run.device) for _ in range(o.calib_batches)]
    run.covs = input_covariances(run.model, run.names, run.xs)


def allocate(run: Run) -> None:
    """Stage 4: each layer's cost ratio, from its measured effect on the output (sensitivity) or uniform."""
    o = run.opt
    run.budgets = {n: o.budget for n in run.names}
    if o.budget_unit == "time":  # uniform in time: each layer the largest low rank within budget x its time
        run.budgets = uniform_time_ratios({n: (*_io(m), as_linear(m).bias is not None) for n, m in run.pairs},
                                          o.budget, run.unit, o.rank_per_component)
    if o.allocate not in ("auto", "sensitivity"):
        return
    alloc = None
    if run.covs is not None:
        grid = [g for g in GRID if o.allocate_cap is None or g <= o.allocate_cap * o.budget + 1e-9] or [min(GRID)]
        alloc = allocate_budgets(run.model, run.names, run.covs, run.xs[:max(1, o.sensitivity_batches)], o.budget,
                                 grid=grid, rank_per_component=o.rank_per_component,
                                 progress=o.progress and run.rank == 0, unit=run.unit if o.budget_unit == "time" else None)
        alloc = dist.broadcast_object(alloc, run.world) if alloc is not None else None
    if alloc is None and o.allocate == "sensitivity" and run.data is not None:
        run.warn("sensitivity allocation needs data, a data-aware init and linear layers only; kept uniform")
    if alloc is not None:
        run.budgets, run.allocated = alloc, "sensitivity"


def initialise(run: Run) -> None:
    """Stage 5: replace the layers (GBLR a margin above the budget when training learns the structure),
    refit them in the metric of their inputs, then in call order to the dense model's outputs."""
    o, model = run.opt, run.model
    learn = o.structure == "gblr" and run.steps > 0
    if o.structure == "lowrank":
        init_budgets = run.budgets
    else:  # start above the budget: training (or the final fit) chooses what to remove
        # plus one component of each layer, so that the final fit can land on the budget exactly (one of the
        # smallest layer for every layer, as before, started small budgets far above: +0.07-0.08 on every layer
        # of the families' ViT and Mixer, budget 0.15 from about 0.22)
        one = {n: o.rank_per_component * sum(_io(m)) / (_io(m)[0] * _io(m)[1]) for n, m in run.pairs}
        init_budgets = {n: min(1.0, b * (o.init_factor if learn else 1.0) + one[n]) for n, b in run.budgets.items()}
    # full-width truncated SVD for low rank and as the base of the data-aware init; else gblrc.nn.layer.fit_dense
    fit = svd_layer if (o.structure == "lowrank" or run.covs is not None) else None
    run.layers = replace_linears(model, run.names, init_budgets, fit=fit, rank_per_component=o.rank_per_component)
    for m in run.layers.values():
        m.tile = int(o.tile)
    if run.x is not None and any(hasattr(m, "positions") for m in run.layers.values()):
        with torch.no_grad():  # convolutions record their output positions (their cost weight)
            call_model(model, to_device(run.x, run.device))
    if run.covs is not None:
        for n, m in run.layers.items():
            if n in run.covs and not whiten_layer(m, run.dense_w[n], run.covs[n]):
                run.warnings.append(f"layer {n}: data-aware initialisation not applicable, kept plain SVD")
    if run.dense_ref is not None:
        for n in sequential_refit(model, run.dense_ref, run.layers, run.dense_w, run.xs):
            run.warnings.append(f"layer {n}: sequential refit not applicable, kept the data-aware initialisation")
        run.dense_ref = None
    if run.judge is not None:
        run.fidelity = {"examples": run.judge.examples, "dense": run.judge.dense, "init": run.judge(model)}
    run.initial = {n: m.structure().structure for n, m in run.layers.items()}


def train(run: Run) -> None:
    """Stage 6: the Gaudi/proximal trainer (content only for low rank); nothing without steps."""
    o = run.opt
    if run.steps <= 0:
        return
    learn = o.structure == "gblr"
    budget, fit_budget = o.budget, None
    if o.budget_unit == "time":  # steer the multiply-adds to the time allocation's; the final fit lands on the time
        dense = {n: m.dense_flops() for n, m in run.layers.items()}
        budget = sum(min(1.0, run.budgets[n]) * d for n, d in dense.items()) / sum(dense.values())
        fit_budget = o.budget
    cfg = TrainConfig(steps=run.steps, budget=budget, fit_budget=fit_budget, batch_size=o.batch_size, lr=o.lr,
                      lr_struct=o.lr_struct if o.lr_struct is not None else 5 * o.lr, seed=o.seed,
                      learn_structure=learn, hard_forward=o.hard_forward, lr_min=o.lr_min, warmup=o.warmup,
                      cooldown=o.cooldown, sigma_max=o.sigma_max,
                      checkpoint_dir=str(o.checkpoint_dir) if o.checkpoint_dir else None,
                      checkpoint_every=o.checkpoint_every, resume=o.resume, progress=o.progress,
                      budget_unit=o.budget_unit)
    obj = Objective(run.model, run.teacher, run.names, o.layer_loss, hidden_weight=o.hidden_loss, augment=o.augment,
                    seed=o.seed)
    for msg in obj.inapplicable(run.x):
        run.warn(msg)
    sig = {"structure": o.structure, "init_factor": o.init_factor, "allocate": o.allocate,
           "allocate_cap": o.allocate_cap, "tune_norms": o.tune_norms, "train_rest": o.train_rest, "layer_loss": o.layer_loss, "init": o.init,
           "hidden_loss": o.hidden_loss, "augment": o.augment, "rank_per_component": o.rank_per_component,
           "world": run.world, "tile": int(o.tile)}
    t0 = time.perf_counter()
    try:
        run.curve = Trainer(run.model, run.layers, obj, run.data, cfg, rank=run.rank, world=run.world,
                            extra_signature=sig, extra_params=_rest_params(run.model, run.layers.values()) if o.train_rest
                            else _norm_params(run.model) if o.tune_norms else ()).run()
    finally:
        obj.close()
    run.train_seconds = time.perf_counter() - t0


def harden(run: Run) -> None:
    """Stage 7: eval-mode boxcar structure, the exact fit to the budget, unused components dropped."""
    for m in run.layers.values():
        m.eval()
        m.hard_forward = False
    if run.opt.structure == "gblr":
        fit_to_budget(list(run.layers.values()), run.opt.budget, run.unit)
    for name in run.names:
        run.layers[name] = compact(run.layers[name])
        set_module(run.model, name, run.layers[name])
    run.model.eval()


def make_report(run: Run) -> dict:
    """Stage 8: the report dict (per-layer costs, loss curve, allocation, fidelity, warnings)."""
    budget = run.opt.budget
    report = _report(budget, run.layers, run.curve, run.steps, run.warnings)
    report["budget_unit"] = run.opt.budget_unit
    report["flop_ratio"] = report["achieved_ratio"]
    timed = run.unit if isinstance(run.unit, TimeCost) else TimeCost()
    if not any(hasattr(m, "positions") for m in run.layers.values()):  # the compiler's estimate (linear layers)
        report["time_ratio"] = round(cost_ratio(run.layers.values(), timed), 6)
        for row in report["layers"]:
            m = run.layers[row["name"]]
            row["time_ratio"] = round(timed.layer(m) / timed.dense(m), 6)
            row["lowering"] = timed.strategy(m)
    if run.opt.budget_unit == "time":
        report["achieved_ratio"] = report["time_ratio"]
    report["train_seconds"] = round(run.train_seconds, 3)
    report["allocate"] = run.allocated  # how the budget was split across layers before training
    report["allocated_ratios"] = {n: round(float(b), 4) for n, b in run.budgets.items()}
    # how far training and the final fit moved the structure from the initialisation
    report["structure_moved"] = structure_movement(run.initial, {n: m.structure().structure
                                                                 for n, m in run.layers.items()})
    if run.judge is not None:
        run.fidelity["final"] = run.judge(run.model)
        report["fidelity"] = run.fidelity
    if run.opt.budget_unit == "time" and report["achieved_ratio"] > budget + 1e-6:
        raise ValueError(f"budget {budget} (time) is below the estimated time of the smallest structure "
                         f"({report['achieved_ratio']:.3f} of dense); raise the budget")
    if report["achieved_ratio"] > budget + 1e-12:  # cannot happen after fit_to_budget; lowrank is floor()ed
        raise RuntimeError(f"internal error: cost ratio {report['achieved_ratio']} over budget {budget}")
    return report


STAGES = (read_data, calibrate, allocate, initialise, train, harden)  # after start(), before make_report()
