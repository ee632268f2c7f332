"""``gblrc.compress``, ``gblrc.prepare`` and ``gblrc.finalize``: GBLR layers for a model's linear layers
under a cost budget, trained by gblrc's own loop or by yours.

Both are a sequence of named stages over one :class:`Run` (the model and what each stage found):
:func:`start`, :func:`read_data`, :func:`calibrate`, :func:`allocate`, :func:`initialise` (which ends with
:func:`refine` when asked), then

- ``compress``: :func:`train` (gblrc's loop over a :class:`~gblrc.learn.controller.Controller`),
  :func:`harden`, :func:`make_report`;
- ``prepare``: the Controller is handed to your loop; ``finalize`` runs :func:`harden` and
  :func:`make_report`.

Settings come as one :class:`~gblrc.learn.config.CompressConfig` (:func:`check_options` makes one from the
keyword form).
"""

from __future__ import annotations

import copy
import os
import random
import time
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gblrc.learn import dist
from gblrc.learn.config import CompressConfig, TrainingConfig, as_config, from_kwargs
from gblrc.learn.controller import Controller
from gblrc.learn.allocate import GRID, Unit, allocate_budgets, allocate_families, uniform_time_ratios
from gblrc.learn.budget import FLOPS, TimeCost, compact, cost_ratio, cost_unit, fit_to_budget
from gblrc.learn.data import (
    batch_stream,
    call_model,
    check_finite,
    fingerprint,
    model_output,
    replayable,
    to_device,
)
from gblrc.learn.fidelity import Fidelity, eval_batches
from gblrc.learn.objective import Objective, task_loss
from gblrc.nn.layer import svd_layer
from gblrc.learn.blocks import Placement, release_memory
from gblrc.learn.calib import BlockCovariances, input_covariances, sequential_refit, whiten_layer
from gblrc.nn.layer import GBLRLinear
from gblrc.nn.replace import as_linear, find_linears, get_module, is_linear, replace_linears, set_module
from gblrc.learn.neurons import (
    find_heads,
    find_pairs,
    group_features,
    permute_heads,
    permute_pair,
    pruned_heads,
    pruned_pair,
)
from gblrc.learn.refine import refine_blocks, refine_settings
from gblrc.learn.report import structure_movement
from gblrc.learn.train import Trainer

__all__ = [
    "compress",
    "prepare",
    "finalize",
    "CompressConfig",
    "TrainingConfig",
    "Options",
    "Run",
    "check_options",
    "start",
    "read_data",
    "calibrate",
    "allocate",
    "initialise",
    "refine",
    "train",
    "harden",
    "make_report",
]

NO_DATA_WARNING = (
    "no data given: the GBLR layers are only initialised from the dense weights (no training); "
    "give data for better accuracy"
)


def _io(m) -> tuple[int, int]:
    lin = as_linear(m) if not isinstance(m, nn.Linear) else m
    return lin.in_features, lin.out_features


def _norm_params(model) -> list:
    """The affine parameters of the model's normalisation layers (LayerNorm, RMSNorm, BatchNorm ...)."""
    return [
        p
        for m in model.modules()
        if "Norm" in type(m).__name__ and not isinstance(m, GBLRLinear)
        for p in m.parameters(recurse=False)
        if p.is_floating_point()
    ]


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
        raise ValueError(
            f"the data does not fit the model: {msg}; give inputs of the shape the model expects"
        ) from None
    if y is not None and not distill:
        task_loss(out, y)  # raises ValueError when the targets do not fit


def _report(budget, layers: dict, curve, steps: int, warn: list) -> dict:
    rows = []
    for name, m in layers.items():
        rows.append(
            {
                "name": name,
                "shape": [m.out_features, m.in_features],
                "dense_cost": m.dense_flops(),
                "gblr_cost": m.flops(),
                "blocks": len(m.structure().structure.blocks),
                "ratio": m.flops() / m.dense_flops(),
                "family": m.family,  # "gblr" (learned structure), "neurons" / "heads" (block-sparse, fixed)
            }
        )
    dense = sum(r["dense_cost"] for r in rows)
    cost = sum(r["gblr_cost"] for r in rows)
    families = {}
    for r in rows:
        families[r["family"]] = families.get(r["family"], 0) + 1
    return {
        "families": families,  # layers per structure family
        "budget": budget,
        "achieved_ratio": cost / dense,
        "dense_cost": dense,
        "gblr_cost": cost,
        "steps": steps,
        "layers": rows,
        "loss_curve": curve,
        "warnings": warn,
    }


def compress(
    model: nn.Module, config: CompressConfig | float | None = None, *, data=None, eval_data=None, **options
) -> tuple[nn.Module, dict]:
    """Replace ``model``'s linear layers (in place) by GBLR layers whose total cost is <= the budget, and
    train them with gblrc's own loop.

    ``config``: a :class:`CompressConfig` (``gblrc.CompressConfig(budget=0.4, steps=300)``), or the budget
    as a number with the settings as keywords (the older form: ``compress(model, 0.4, steps=300,
    warmup=0.2)``; every field of CompressConfig and of its ``training`` TrainingConfig by its own name;
    an unknown keyword is a TypeError naming the fields).  Keywords given beside a CompressConfig
    override its fields.

    ``data``: None (initialisation only), a Tensor of inputs, {"inputs", "targets"}, or an iterable /
    callable of batches (see :mod:`gblrc.learn.data`).  With targets the task loss is trained
    (``loss="auto"`` or ``"task"``), otherwise (or with ``loss="distill"``) the model imitates its dense self.
    ``eval_data``: examples to judge fidelity on (same forms as ``data``; best from another source than
    ``data``): the report's ``fidelity`` gives the cosine to the dense model (and the task metric with
    class targets) after the initialisation and at the end (:mod:`gblrc.learn.fidelity`).

    The settings (:class:`CompressConfig`, :class:`TrainingConfig`): ``init`` "data" (truncated SVD in the
    metric of each layer's inputs, :mod:`gblrc.learn.calib`), "sequential" (then each layer refitted in
    call order to the teacher's output from the compressed model's own inputs) or "svd" (plain truncated
    SVD); ``structure`` "gblr" (learned widths/locations from an initialisation at init_factor x budget)
    or "lowrank" (truncated SVD at the budget, full widths, content fine-tuned only);
    ``rank_per_component`` and ``tile`` make the structure coarser and easier to lower fast;
    ``allocate`` "uniform", "sensitivity" (per-layer ratios from each layer's measured effect on the
    output; needs data and a data-aware init; linear layers only; a warning and uniform otherwise) or
    "auto" (sensitivity where it applies, else uniform, silently); ``budget_unit`` "flops" or "time" (the
    layers' dense time as the compiler estimates it, :mod:`gblrc.learn.budget`; linear layers only);
    ``device`` and ``mixed_precision`` (see CompressConfig).  The report gives both cost ratios either way.

    Returns (model in eval mode, report dict).  Raises ValueError on bad input.
    """
    run = start(model, as_config(config, options), data=data, eval_data=eval_data)
    for stage in STAGES:
        stage(run)
    return run.model, make_report(run)


def prepare(
    model: nn.Module, config: CompressConfig | float | None = None, *, data=None, eval_data=None, **options
) -> tuple[nn.Module, Controller]:
    """Replace ``model``'s linear layers (in place) by GBLR layers initialised from the dense weights,
    for training in your own loop; returns (model, controller).

    ``config`` as for :func:`compress`; its ``steps`` is the number of optimiser steps your loop will
    take (it sets the sigma homotopy and the cool-down).  ``data`` here is calibration data only (for
    the data-aware initialisation and the allocation; None: plain SVD init).  Then::

        opt = torch.optim.AdamW(ctrl.param_groups())
        for step in range(config.steps):
            loss = ...; loss.backward(); opt.step(); ctrl.step(opt); opt.zero_grad()
        report = gblrc.finalize(model)

    The model comes back in train mode; what else trains is up to your loop (``param_groups`` holds the
    layers' content and structure, plus the norms / the rest with ``tune_norms`` / ``train_rest``).
    """
    run = start(model, as_config(config, options), data=data, eval_data=eval_data, own_loop=True)
    for stage in PREPARE_STAGES:
        stage(run)
    run.controller = _controller(run)
    model.train()
    run.controller.run = run
    _PREPARED[model] = run  # for gblrc.finalize(model); removed there
    return model, run.controller


def finalize(model) -> dict:
    """After your loop: harden the structure, trim it to the budget exactly, drop unused components;
    returns the report (as ``compress``'s).  ``model``: the prepared model (or a DistributedDataParallel /
    accelerate wrapper of it), or its Controller.  The model is in eval mode and saves, loads and lowers
    as a compressed one."""
    run = _prepared_run(model)
    if run.controller.schedule.learn_structure and not run.controller.cooled:
        run.controller.cool(trim=True)
    run.steps = run.controller.step_count
    run.curve = [[r["step"], r["loss"], r["cost"], r["sigma"], r["lambda"]] for r in run.controller.history]
    harden(run)
    report = make_report(run)
    _PREPARED.pop(run.model, None)
    run.controller.run = None
    return report


_PREPARED: "weakref.WeakKeyDictionary[nn.Module, Run]" = weakref.WeakKeyDictionary()  # prepared, not finalized


def _prepared_run(obj) -> "Run":
    if isinstance(obj, Controller):
        run = getattr(obj, "run", None)
    else:
        while obj not in _PREPARED and isinstance(getattr(obj, "module", None), nn.Module):
            obj = obj.module  # DistributedDataParallel, accelerate wrappers
        run = _PREPARED.get(obj)
    if run is None:
        raise ValueError(
            "finalize() needs a model returned by gblrc.prepare (or its controller) that was not finalized yet"
        )
    return run


Options = CompressConfig  # the checked settings (the name of gblrc 0.1's option record)


def check_options(budget, **kw) -> CompressConfig:
    """The settings from compress()'s keyword form; ValueError on a bad value, TypeError on an unknown name."""
    return from_kwargs(budget, **kw)


@dataclass
class Run:
    """What the stages share: the model being compressed (in place) and what each stage found."""

    model: nn.Module
    opt: CompressConfig
    names: list[str]
    pairs: list
    device: torch.device
    rank: int = 0
    world: int = 1
    steps: int = 0  # training steps still to run (0 without data in compress's own loop)
    own_loop: bool = False  # prepare(): the user's loop trains (data, if any, only calibrates)
    given_data: object = None  # the data and eval_data arguments as given
    given_eval: object = None
    warnings: list[str] = field(default_factory=list)
    judge: Fidelity | None = None  # fidelity on eval_data
    data: object = None  # replayable training data
    x: object = None  # the first training batch's inputs
    teacher: nn.Module | None = None  # frozen dense copy (distillation)
    dense_ref: nn.Module | None = None  # dense copy for the sequential refit
    dense_w: dict | None = None  # name -> dense weight (data-aware init)
    covs: dict | None = None  # name -> input covariance of the dense model
    xs: list | None = None  # calibration batches
    refine_xs: list | None = None  # the batches block refinement trains on (the calibration batches and more)
    budgets: dict = field(default_factory=dict)  # name -> cost ratio before training
    allocated: str = "uniform"
    block_sparse: dict = field(default_factory=dict)  # gblrc.learn.allocate.Unit -> neurons / heads kept
    layers: dict = field(default_factory=dict)  # name -> GBLRLinear
    fidelity: dict = field(default_factory=dict)
    initial: dict = field(default_factory=dict)  # name -> Structure after initialise (before training)
    curve: list = field(default_factory=list)
    train_seconds: float = 0.0
    unit: object = FLOPS  # the budget's cost unit (gblrc.learn.budget)
    controller: Controller | None = None
    refined: dict | None = None  # what refine() did, per block
    place: Placement | None = None  # where the block stages compute, where the model rests (offload)

    @property
    def home(self) -> torch.device:
        """Where the model and the cached batches are: the device, or the CPU under offload."""
        return self.place.storage if self.place is not None else self.device

    def warn(self, msg: str) -> None:
        """A warning for the user: in the report and as a Python warning."""
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=4)  # Run.warn <- stage <- compress <- the caller


def resolve_device(model: nn.Module, device: str | None) -> torch.device:
    """Where to train: the model's device (None), CUDA when available ("auto"), or "cpu" / "cuda" (a
    ValueError when this torch has no CUDA device).  Under a multi-process launch, CUDA is this rank's
    LOCAL_RANK device."""
    if device is None:
        return next(model.parameters()).device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' asked for but torch sees no CUDA device here (torch "
            f"{torch.__version__}); use device 'cpu' or 'auto'"
        )
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(
        "cuda",
        int(os.environ.get("LOCAL_RANK", "0"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1
        else torch.cuda.current_device(),
    )


def start(model: nn.Module, opt: CompressConfig, *, data=None, eval_data=None, own_loop: bool = False) -> Run:
    """Stage 1: check the model, find its compressible layers, move it to its device, set up ranks and seeds."""
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"the model has NaN or Inf values in {name!r}; fix the model before compressing")
    dev = resolve_device(model, opt.device)
    if opt.offload and own_loop:
        raise ValueError(
            "offload is for gblrc.compress post-training (steps=0); prepare hands your loop the whole model"
        )
    place = Placement(dev, "cpu", offload=True) if opt.offload else Placement(dev)
    model.to(place.storage)
    judge = Fidelity(model, eval_batches(eval_data)) if eval_data is not None else None
    pairs = find_linears(model, opt.include, opt.exclude)
    if not pairs:
        raise ValueError(
            "no compressible layer: the model has no compressible linear layer (nn.Linear / Conv1D / Conv2d)"
            + (" matching include/exclude" if opt.include or opt.exclude else "")
            + "; nothing to compress"
        )
    if opt.budget_unit == "time" and any(not is_linear(m) for _, m in pairs):
        raise ValueError(
            "budget_unit='time' is for linear layers (the cost model times MatMuls); this model has "
            "convolutions: use budget_unit='flops' or exclude them"
        )
    rank, world = dist.setup(dev)
    torch.manual_seed(opt.seed)
    random.seed(opt.seed)
    np.random.seed(opt.seed)
    run = Run(
        model,
        opt,
        [n for n, _ in pairs],
        pairs,
        dev,
        rank,
        world,
        steps=int(opt.steps),
        judge=judge,
        unit=cost_unit(opt.budget_unit),
        own_loop=own_loop,
        given_data=data,
        given_eval=eval_data,
        place=place,
    )
    if opt.offload and dev.type == "cpu":
        run.warn("offload with the CPU as the device moves nothing: the model already rests where it computes")
    return run


def read_data(run: Run) -> None:
    """Stage 2: the first batch must fit the model; the teacher for distillation.  Without data only
    the initialisation runs (a warning); with ``steps=0`` it is post-training compression.  For
    ``prepare`` the data only calibrates (no teacher: the user's loop has its own loss)."""
    o = run.opt
    if run.given_data is None:
        if not run.own_loop:
            run.warn(NO_DATA_WARNING)
            run.steps = 0
    else:
        run.data = replayable(run.given_data)  # a generator is read once and replayed
        if torch.is_tensor(run.given_data) or isinstance(run.given_data, dict):
            check_finite(run.given_data)  # the whole in-memory data set; batches of iterables as they come
        x, y = next(batch_stream(run.data, o.batch_size, o.seed))
        check_finite((x, y), "a batch of the data")
        distill = o.loss == "distill" or (o.loss == "auto" and y is None)
        if o.loss == "task" and y is None:
            raise ValueError("loss='task' needs targets in the data")
        run.model.eval()
        _check_fits(run.model, to_device(x, run.home), to_device(y, run.home), distill)
        run.x = x
        if distill and run.steps > 0 and not run.own_loop:
            run.teacher = copy.deepcopy(run.model).eval().requires_grad_(False)
    t = o.training
    if run.steps == 0 and (t.hidden_loss > 0 or t.augment > 0 or t.train_rest):
        run.warn(
            "hidden-state loss, token augmentation and train_rest are training options; with no training steps "
            "they do nothing"
        )


def calibrate(run: Run) -> None:
    """Stage 3 (data-aware init): the dense weights and the layers' input covariances on the first
    ``calib_batches`` batches; a dense copy for the sequential refit."""
    o = run.opt
    if o.init == "svd" or run.data is None:
        return
    if o.init == "sequential" or o.training.refine_wanted():  # the sequential refit and refine() use it
        run.dense_ref = run.teacher or _dense_copy(run)
    if run.dense_ref is not None:  # the dense copy's weight parameters (no further copy; they stay unchanged, and
        # follow their module where offload moves it)
        run.dense_w = {n: as_linear(get_module(run.dense_ref, n)).weight for n in run.names}
    else:
        run.dense_w = {n: as_linear(m).weight.detach().clone() for n, m in run.pairs}
    it = batch_stream(run.data, o.batch_size, o.seed)
    t = o.training
    n = max(t.calib_batches, t.refine_batches if t.refine_wanted() else 0)
    xs = [to_device(next(it)[0], run.home) for _ in range(n)]
    check_finite(xs, "a calibration batch of the data")
    run.xs, run.refine_xs = xs[: t.calib_batches], xs
    if run.dense_ref is not None:  # a block's at a time, from the dense copy, when the stages ask for them
        run.covs = BlockCovariances(run.dense_ref, run.names, run.xs, run.place)
    elif run.place.offload:  # all now (the model is dense only until initialise), each block on the device in turn
        run.covs = BlockCovariances(run.model, run.names, run.xs, run.place).all()
    else:
        run.covs = input_covariances(run.model, run.names, run.xs)


def _dense_copy(run: Run) -> nn.Module:
    """A frozen dense copy of the model for the sequential refit and block refinement (freed when
    :func:`initialise` is done).  Its embeddings are the model's own, not a copy: nothing trains them
    before then (they are the largest part of a language model outside its linear layers)."""
    memo = {id(m.weight): m.weight for m in run.model.modules() if isinstance(m, nn.Embedding)}
    return copy.deepcopy(run.model, memo).eval()


def allocate(run: Run) -> None:
    """Stage 4: each layer's cost ratio, from its measured effect on the output (sensitivity) or uniform."""
    o = run.opt
    run.budgets = {n: o.budget for n in run.names}
    if o.budget_unit == "time":  # uniform in time: each layer the largest low rank within budget x its time
        run.budgets = uniform_time_ratios(
            {n: (*_io(m), as_linear(m).bias is not None) for n, m in run.pairs},
            o.budget,
            run.unit,
            o.rank_per_component,
        )
    if o.allocate not in ("auto", "sensitivity"):
        return
    alloc = None
    if run.covs is not None:
        cap = o.training.allocate_cap
        grid = [g for g in GRID if cap is None or g <= cap * o.budget + 1e-9] or [min(GRID)]
        common = dict(
            grid=grid,
            rank_per_component=o.rank_per_component,
            progress=o.progress and run.rank == 0,
            placement=run.place,
        )
        sens = run.xs[: max(1, o.training.sensitivity_batches)]
        units = _units(run)
        if units:  # low rank or block-sparse (FFN neurons, attention heads), per unit, under the one budget
            fam = allocate_families(run.model, run.names, units, run.covs, sens, o.budget, **common)
            fam = dist.broadcast_object(fam, run.world) if fam is not None else None
            if fam is not None:
                alloc, run.block_sparse = fam
                for u, k in run.block_sparse.items():
                    share = k * u.group / _io(get_module(run.model, u.layers[-1]))[0]
                    run.budgets.update({n: share for n in u.layers})
                alloc = {**run.budgets, **alloc}
        else:
            alloc = allocate_budgets(
                run.model,
                run.names,
                run.covs,
                sens,
                o.budget,
                unit=run.unit if o.budget_unit == "time" else None,
                **common,
            )
            alloc = dist.broadcast_object(alloc, run.world) if alloc is not None else None
    if alloc is None and o.allocate == "sensitivity" and run.data is not None:
        run.warn("sensitivity allocation needs data, a data-aware init and linear layers only; kept uniform")
    if alloc is not None:
        run.budgets, run.allocated = alloc, "sensitivity"
    release_memory()


def _units(run: Run) -> list[Unit]:
    """The units the block-sparse family may be allocated to -- FFN pairs (:func:`gblrc.learn.neurons.find_pairs`)
    and attention layers (:func:`gblrc.learn.neurons.find_heads`) -- where it applies: structure "gblr",
    ``block_sparse``, a FLOP budget, block covariances with the inputs' means (a data-aware init from a dense
    copy), linear layers only; else none."""
    o = run.opt
    ok = (
        o.structure == "gblr"
        and o.training.block_sparse
        and o.budget_unit == "flops"
        and hasattr(run.covs, "mean")
        and all(is_linear(m) for _, m in run.pairs)
    )
    if not ok:
        return []
    units = [Unit(pair, 1, "neurons") for pair in find_pairs(run.model, run.names, run.xs[0])]
    return units + [Unit(h[:4], h[4], "heads") for h in find_heads(run.model, run.names, run.xs[0])]


def _prune_unit(run: Run, unit: Unit, keep: int) -> None:
    """Replace the unit's layers by their block-sparse GBLR layers keeping ``keep`` neurons / heads; the dense
    copy's layers get the same order (its function unchanged), so the refits compare like with like."""
    p, model = run.place, run.model
    lins = [as_linear(get_module(model, n)) for n in unit.layers]
    last = unit.layers[-1]
    with p.on_device(*lins):
        cov, mean = p.fetch(run.covs[last]), p.fetch(run.covs.mean(last))
        if unit.family == "heads":
            *new, order = pruned_heads(*lins, cov, mean, keep, unit.group)
        else:
            *new, order = pruned_pair(*lins, cov, mean, keep)
    for name, layer in zip(unit.layers, new):
        set_module(model, name, layer.to(p.storage))
        run.layers[name] = layer
    if run.dense_ref is not None:  # (run.dense_w holds its weights: they follow)
        twins = [as_linear(get_module(run.dense_ref, n)) for n in unit.layers]
        if unit.family == "heads":
            permute_heads(*twins, order, unit.group)
        else:
            permute_pair(*twins, order)
    else:
        feats = group_features(order, unit.group)
        for n in unit.layers[:-1]:
            run.dense_w[n] = run.dense_w[n][feats]
        run.dense_w[last] = run.dense_w[last][:, feats]


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
        init_budgets = {
            n: min(1.0, b * (o.training.init_factor if learn else 1.0) + one[n]) for n, b in run.budgets.items()
        }
    # full-width truncated SVD for low rank and as the base of the data-aware init; else gblrc.nn.layer.fit_dense
    fit = svd_layer if (o.structure == "lowrank" or run.covs is not None) else None
    firsts = {u.layers[0]: (u, k) for u, k in run.block_sparse.items()}
    in_unit = {n for u in run.block_sparse for n in u.layers}
    plain = [n for n in run.names if n not in in_unit]
    budgets = {n: init_budgets[n] for n in plain}
    layers = replace_linears(model, plain, budgets, fit=fit, rank_per_component=o.rank_per_component)
    for m in layers.values():
        m.tile = int(o.tile)
    run.layers = {}
    if run.x is not None and any(hasattr(m, "positions") for m in layers.values()):
        with torch.no_grad():  # convolutions record their output positions (their cost weight)
            call_model(model, to_device(run.x, run.home))
    p = run.place
    for n in run.names:  # in order: the covariances are computed a block at a time
        if n in firsts:
            _prune_unit(run, *firsts[n])
        if n in in_unit:
            continue
        m = run.layers[n] = layers[n]
        if run.covs is not None:
            with p.on_device(m):
                ok = n not in run.covs or whiten_layer(m, p.fetch(run.dense_w[n]), p.fetch(run.covs[n]))
            if not ok:
                run.warn(f"layer {n}: data-aware initialisation not applicable, kept plain SVD")
    run.covs = None  # each stage's data freed when it is done (peak memory: issue 29)
    if run.dense_ref is not None and o.init == "sequential":
        for n in sequential_refit(model, run.dense_ref, run.layers, run.dense_w, run.xs, placement=run.place):
            run.warn(f"layer {n}: sequential refit not applicable, kept the data-aware initialisation")
    run.dense_w = None
    release_memory()
    if run.judge is not None:
        run.fidelity = {"examples": run.judge.examples, "dense": run.judge.dense, "init": run.judge(model)}
    run.initial = {n: m.structure().structure for n, m in run.layers.items()}
    refine(run)  # (structure_moved counts what refinement moves too)
    # the calibration's dense weight copies, covariances and cached batches are not needed after this stage
    run.dense_w = run.covs = run.xs = run.refine_xs = None
    release_memory()


def refine(run: Run) -> None:
    """The end of :func:`initialise`: block-level refinement on the refinement batches, each block's compressed
    layers trained to give the dense block's output from the compressed model's own inputs
    (:mod:`gblrc.learn.refine`).  ``refine_steps`` None (auto): on when there is data and a data-aware init."""
    o, t = run.opt, run.opt.training
    dense, run.dense_ref = run.dense_ref, None  # not needed after this stage
    if not t.refine_wanted():
        return
    if dense is None or not run.xs:
        if t.refine_steps is not None:  # asked for explicitly: say why it does not run
            run.warn("block refinement needs data and a data-aware init (init 'data' or 'sequential'); skipped")
        return
    if run.steps == 0 and o.structure == "gblr":  # post-training: refine the structure that is kept (the init's
        for m in run.layers.values():  # margin component of each layer is trimmed first, not after)
            m.eval()
        fit_to_budget(list(run.layers.values()), o.budget, run.unit)
    run.refined = refine_blocks(
        run.model,
        dense,
        run.layers,
        run.refine_xs,
        **refine_settings(t),
        progress=run.opt.progress and run.rank == 0,
        placement=run.place.with_half_cache(),  # its 64 cached batches in float16 (docs/design.md §5, "Memory")
    )
    if t.refine_structure:
        if run.steps == 0:  # the moved structure, fitted to the budget again
            fit_to_budget(list(run.layers.values()), o.budget, run.unit)
        run.refined["structure_moved"] = structure_movement(
            run.initial, {n: m.structure().structure for n, m in run.layers.items()}
        )
    if run.judge is not None:
        run.fidelity["refined"] = run.judge(run.model)


def refine_steps_used(run: Run) -> int:
    """The refinement steps per block this run takes (auto resolved)."""
    t = run.opt.training
    if run.refined is not None:
        return int(run.refined["steps"])
    return 0 if t.refine_steps is None else int(t.refine_steps)


def _controller(run: Run) -> Controller:
    """The method's controller for the layers: lambda steers the multiply-adds (under a time budget, to
    the time allocation's; the cool-down's exact fit then lands on the time), plus what else trains."""
    o = run.opt
    budget, fit_budget = o.budget, None
    if o.budget_unit == "time":
        dense = {n: m.dense_flops() for n, m in run.layers.items()}
        budget = sum(min(1.0, run.budgets[n]) * d for n, d in dense.items()) / sum(dense.values())
        fit_budget = o.budget
    t = o.training
    extra = (
        _rest_params(run.model, run.layers.values())
        if t.train_rest
        else _norm_params(run.model)
        if t.tune_norms
        else ()
    )
    return Controller(run.layers, o, steps=run.steps, budget=budget, fit_budget=fit_budget, extra_params=extra)


def train(run: Run) -> None:
    """Stage 6: gblrc's own loop over the method's controller (content only for low rank); nothing without steps."""
    o, t = run.opt, run.opt.training
    if run.steps <= 0:
        return
    run.controller = _controller(run)
    obj = Objective(
        run.model, run.teacher, run.names, t.layer_loss, hidden_weight=t.hidden_loss, augment=t.augment, seed=o.seed
    )
    for msg in obj.inapplicable(run.x):
        run.warn(msg)
    sig = {"data": fingerprint(run.data), "world": run.world, "refine_steps_used": refine_steps_used(run)}
    t0 = time.perf_counter()
    try:
        run.curve = Trainer(
            run.model, run.controller, obj, run.data, rank=run.rank, world=run.world, extra_signature=sig
        ).run()
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
        report["time_ratio"] = cost_ratio(run.layers.values(), timed)  # exact: the budget check compares it
        for row in report["layers"]:
            m = run.layers[row["name"]]
            row["time_ratio"] = round(timed.layer(m) / timed.dense(m), 6)
            row["lowering"] = timed.strategy(m)
    if run.opt.budget_unit == "time":
        report["achieved_ratio"] = report["time_ratio"]
    report["train_seconds"] = round(run.train_seconds, 3)
    report["device"] = str(run.device)
    if run.refined is not None:
        report["refine"] = run.refined
    report["mixed_precision"] = run.opt.mixed_precision
    report["allocate"] = run.allocated  # how the budget was split across layers before training
    report["allocated_ratios"] = {n: round(float(b), 4) for n, b in run.budgets.items()}
    # how far training and the final fit moved the structure from the initialisation
    report["structure_moved"] = structure_movement(
        run.initial, {n: m.structure().structure for n, m in run.layers.items()}
    )
    if run.judge is not None:
        run.fidelity["final"] = run.judge(run.model)
        report["fidelity"] = run.fidelity
    if run.opt.budget_unit == "time":  # the time fit stops over budget only when nothing more can be removed
        if report["achieved_ratio"] > budget * (1 + 1e-9):  # (the fit's own relative tolerance)
            raise ValueError(
                f"budget {budget} (time) is below the estimated time of the smallest structure "
                f"({report['achieved_ratio']:.3f} of dense); raise the budget"
            )
    elif report["achieved_ratio"] > budget + 1e-12:  # cannot happen after fit_to_budget; lowrank is floor()ed
        raise RuntimeError(f"internal error: cost ratio {report['achieved_ratio']} over budget {budget}")
    return report


PREPARE_STAGES = (read_data, calibrate, allocate, initialise)  # after start(): gblrc.prepare
STAGES = PREPARE_STAGES + (train, harden)  # after start(), before make_report(): gblrc.compress
