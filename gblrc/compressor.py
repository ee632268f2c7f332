"""``gblrc.compress``: learn GBLR layers for a model's linear layers under a cost budget."""
from __future__ import annotations

import copy
import math
import random
import time
import warnings

import numpy as np
import torch
from torch import nn

from . import dist
from .allocate import GRID, allocate_budgets
from .budget import compact, fit_to_budget
from .data import batch_stream, replayable, call_model, model_output, to_device
from .fidelity import Fidelity, eval_batches
from .objective import Objective, task_loss
from .init import svd_layer
from .calib import input_covariances, sequential_refit, whiten_layer
from .layer import GBLRLinear
from .replace import as_linear, find_linears, replace_linears, set_module
from .train import TrainConfig, Trainer

__all__ = ["compress"]

NO_DATA_WARNING = ("no data given: the GBLR layers are only initialised from the dense weights (no training); "
                   "give data for better accuracy")


def _check_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not (math.isfinite(b) and 0.0 < b <= 1.0):
        raise ValueError(f"budget must be in (0, 1] (a fraction of the dense cost), got {budget}")
    return b


def _io(m) -> tuple[int, int]:
    lin = as_linear(m) if not isinstance(m, nn.Linear) else m
    return lin.in_features, lin.out_features


def _norm_params(model) -> list:
    """The affine parameters of the model's normalisation layers (LayerNorm, RMSNorm, BatchNorm ...)."""
    return [p for m in model.modules() if "Norm" in type(m).__name__ and not isinstance(m, GBLRLinear)
            for p in m.parameters(recurse=False) if p.is_floating_point()]


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
             augment: float = 0.0) -> tuple[nn.Module, dict]:
    """Replace ``model``'s linear layers (in place) by GBLR layers whose total cost is <= ``budget``.

    ``data``: None (initialisation only), a Tensor of inputs, {"inputs", "targets"}, or an iterable /
    callable of batches (see :mod:`gblrc.data`).  With targets the task loss is trained (``loss="auto"``
    or ``"task"``), otherwise (or with ``loss="distill"``) the model imitates its dense self.
    ``init``: "data" (truncated SVD in the metric of each layer's inputs on ``calib_batches`` batches,
    :mod:`gblrc.calib`), "sequential" (then each layer refitted in call order to the teacher's output from
    the compressed model's own inputs, :func:`gblrc.calib.sequential_refit`) or "svd" (plain truncated
    SVD, :func:`gblrc.init.fit_dense`).
    ``structure``: "gblr" (learned widths/locations from an initialisation at ``init_factor`` x budget)
    or "lowrank" (truncated SVD at the budget, full widths, content fine-tuned only).
    ``rank_per_component`` and ``tile`` (widths and starts multiples of ``tile`` elements) make the learned
    structure coarser and easier for the lowering passes to turn into speed (README, "Structure options").
    ``allocate``: "uniform" (every layer starts at the same cost ratio), "sensitivity" (per-layer
    ratios from each layer's measured effect on the output on ``sensitivity_batches`` batches,
    :mod:`gblrc.allocate`; needs data and a data-aware ``init``; linear layers only; a warning and
    uniform otherwise) or "auto" (sensitivity where it applies, else uniform, silently); no layer gets more
    than ``allocate_cap`` x budget (None: up to its dense cost).
    ``tune_norms``: also fine-tune the model's normalisation layers (LayerNorm, RMSNorm, BatchNorm
    affine parameters) with the content; they cost nothing at inference.
    ``eval_data``: examples to judge fidelity on (same forms as ``data``; best from another source than
    ``data``): the report's ``fidelity`` gives the cosine to the dense model (and the task metric with
    class targets) after the initialisation and at the end (:mod:`gblrc.fidelity`).
    Returns (model in eval mode, report dict).  Raises ValueError on bad input.
    """
    budget = _check_budget(budget)
    if structure not in ("gblr", "lowrank"):
        raise ValueError(f"structure must be 'gblr' or 'lowrank', got {structure!r}")
    if init not in ("data", "sequential", "svd"):
        raise ValueError(f"init must be 'data', 'sequential' or 'svd', got {init!r}")
    if allocate not in ("auto", "uniform", "sensitivity"):
        raise ValueError(f"allocate must be 'auto', 'uniform' or 'sensitivity', got {allocate!r}")
    if loss not in ("auto", "task", "distill"):
        raise ValueError(f"loss must be 'auto', 'task' or 'distill', got {loss!r}")
    if int(steps) < 0 or int(batch_size) < 1 or int(rank_per_component) < 1 or int(tile) < 1:
        raise ValueError("steps must be >= 0, batch_size, rank_per_component and tile >= 1")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"the model has NaN or Inf values in {name!r}; fix the model before compressing")
    judge = Fidelity(model, eval_batches(eval_data)) if eval_data is not None else None
    pairs = find_linears(model, include, exclude)
    if not pairs:
        raise ValueError("the model has no compressible linear layer (nn.Linear / Conv1D / Conv2d)"
                         + (" matching include/exclude" if include or exclude else "")
                         + "; nothing to compress")
    names = [n for n, _ in pairs]
    dev = next(model.parameters()).device
    rank, world = dist.setup(dev)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    warn: list[str] = []
    steps = int(steps)
    teacher = None
    x = None  # the first training batch, when there is one
    if data is None:
        warn.append(NO_DATA_WARNING)
        warnings.warn(NO_DATA_WARNING, stacklevel=2)
        steps = 0
    else:  # steps == 0: post-training compression (data-aware init, refit, allocation; no training)
        data = replayable(data)  # a generator is read once and replayed
        x, y = next(batch_stream(data, batch_size, seed))
        distill = loss == "distill" or (loss == "auto" and y is None)
        if loss == "task" and y is None:
            raise ValueError("loss='task' needs targets in the data")
        model.eval()
        _check_fits(model, to_device(x, dev), to_device(y, dev), distill)
        if distill and steps > 0:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if steps == 0 and (hidden_loss > 0 or augment > 0):
        msg = "hidden-state loss and token augmentation are training options; with no training steps they do nothing"
        warn.append(msg)
        warnings.warn(msg, stacklevel=2)
    learn = structure == "gblr" and steps > 0
    dense_w = {n: as_linear(m).weight.detach().clone() for n, m in pairs} if init != "svd" and data is not None else None
    dense_ref = (teacher or copy.deepcopy(model).eval()) if init == "sequential" and dense_w is not None else None
    covs = None
    if dense_w is not None:  # input statistics of the dense model on the first batches
        it = batch_stream(data, batch_size, seed)
        xs = [to_device(next(it)[0], dev) for _ in range(calib_batches)]
        covs = input_covariances(model, names, xs)
    budgets = {n: budget for n in names}
    used = "uniform"
    if allocate in ("auto", "sensitivity"):
        alloc = None
        if covs is not None:
            grid = [g for g in GRID if allocate_cap is None or g <= allocate_cap * budget + 1e-9] or [min(GRID)]
            alloc = allocate_budgets(model, names, covs, xs[:max(1, sensitivity_batches)], budget, grid=grid,
                                     rank_per_component=rank_per_component, progress=progress and rank == 0)
            alloc = dist.broadcast_object(alloc, world) if alloc is not None else None
        if alloc is None and allocate == "sensitivity" and data is not None:
            msg = "sensitivity allocation needs data, a data-aware init and linear layers only; kept uniform"
            warn.append(msg)
            warnings.warn(msg, stacklevel=2)
        if alloc is not None:
            budgets, used = alloc, "sensitivity"
    if structure == "lowrank":
        init_budgets = budgets
    else:  # start above the budget: training (or the final fit) chooses what to remove
        # plus one component of the smallest layer, so that the final fit can land on the budget exactly
        one = max(rank_per_component * sum(_io(m)) / (_io(m)[0] * _io(m)[1]) for _, m in pairs)
        init_budgets = {n: min(1.0, b * (init_factor if learn else 1.0) + one) for n, b in budgets.items()}
    # full-width truncated SVD for low rank and as the base of the data-aware init; else gblrc.init.fit_dense
    fit = svd_layer if (structure == "lowrank" or covs is not None) else None
    layers = replace_linears(model, names, init_budgets, fit=fit, rank_per_component=rank_per_component)
    for m in layers.values():
        m.tile = int(tile)
    if x is not None and any(hasattr(m, "positions") for m in layers.values()):
        with torch.no_grad():  # convolutions record their output positions (their cost weight)
            call_model(model, to_device(x, dev))
    if covs is not None:
        for n, m in layers.items():
            if n in covs and not whiten_layer(m, dense_w[n], covs[n]):
                warn.append(f"layer {n}: data-aware initialisation not applicable, kept plain SVD")
    if dense_ref is not None:
        for n in sequential_refit(model, dense_ref, layers, dense_w, xs):
            warn.append(f"layer {n}: sequential refit not applicable, kept the data-aware initialisation")
        del dense_ref
    fid = {}
    if judge is not None:
        fid = {"examples": judge.examples, "dense": judge.dense, "init": judge(model)}
    curve: list = []
    train_seconds = 0.0
    if steps > 0:
        cfg = TrainConfig(steps=steps, budget=budget, batch_size=batch_size, lr=lr,
                          lr_struct=lr_struct if lr_struct is not None else 5 * lr, seed=seed,
                          learn_structure=learn, hard_forward=hard_forward, lr_min=lr_min, warmup=warmup, cooldown=cooldown, sigma_max=sigma_max,
                          checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                          checkpoint_every=checkpoint_every, resume=resume, progress=progress)
        obj = Objective(model, teacher, names, layer_loss, hidden_weight=hidden_loss, augment=augment, seed=seed)
        for msg in obj.inapplicable(x):
            warn.append(msg)
            warnings.warn(msg, stacklevel=2)
        sig = {"structure": structure, "init_factor": init_factor, "allocate": allocate, "allocate_cap": allocate_cap,
               "tune_norms": tune_norms, "layer_loss": layer_loss, "init": init, "hidden_loss": hidden_loss,
               "augment": augment,
               "rank_per_component": rank_per_component, "world": world, "tile": int(tile)}
        t0 = time.perf_counter()
        try:
            curve = Trainer(model, layers, obj, data, cfg, rank=rank, world=world, extra_signature=sig,
                            extra_params=_norm_params(model) if tune_norms else ()).run()
        finally:
            obj.close()
        train_seconds = time.perf_counter() - t0
    for m in layers.values():
        m.eval()
        m.hard_forward = False
    if structure == "gblr":
        fit_to_budget(list(layers.values()), budget)
    for name in names:
        layers[name] = compact(layers[name])
        set_module(model, name, layers[name])
    model.eval()
    report = _report(budget, layers, curve, steps, warn)
    report["train_seconds"] = round(train_seconds, 3)
    report["allocate"] = used  # how the budget was split across layers before training
    report["allocated_ratios"] = {n: round(float(b), 4) for n, b in budgets.items()}
    if judge is not None:
        fid["final"] = judge(model)
        report["fidelity"] = fid
    if report["achieved_ratio"] > budget + 1e-12:  # cannot happen after fit_to_budget; lowrank is floor()ed
        raise RuntimeError(f"internal error: cost ratio {report['achieved_ratio']} over budget {budget}")
    return model, report
