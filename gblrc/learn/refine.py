"""Block-level refinement after the initialisation (AA-SVD's second stage; BRECQ's block reconstruction).

After every layer is fitted on its own, the compressed model's errors compound through the network.
:func:`refine_blocks` takes the model's blocks in call order (the children of a ModuleList / Sequential
that hold compressed layers: a transformer's layers; a compressed layer outside any such container is a
block of its own) and, for each, trains the content (U, V, bias) of its compressed layers jointly so
that the block, fed the *compressed* model's own inputs to it (the errors of the blocks before), gives
the *dense* block's output on the dense inputs.  Inputs and targets are computed once per block on the
calibration batches; each step is one block on one cached batch (cheap, so a CPU can afford it).
The loss is the relative MSE over real tokens (the batch's attention mask), as the distillation's.

On by default when compress has data and a data-aware init (``TrainingConfig(refine_steps=None)``: 256 Adam
steps per block, lr 1e-3 cosine to 0, on 64 batches of the data; ``gblrc compress --refine-steps N``, 0: off):
on MiniLM at budget 0.4 after ``--steps 0`` it gains about +0.07 cosine in domain and on other genres
(docs/results.md, "Block-level refinement").  Options: the blocks' norms, "local" targets, and the GBLR
structure (widths, locations) moving with its own sigma schedule (``refine_structure``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from gblrc.learn.budget import LambdaController, cost_ratio, proximal_step
from gblrc.learn.config import REFINE_STEPS, TrainingConfig
from gblrc.learn.blocks import (
    BlockInputs,
    CacheOff as _CacheOff,
    Placement,
    block_output as _main,
    find_blocks,
    release_memory,
)
from gblrc.learn.objective import _mask_for, rel_mse

__all__ = ["find_blocks", "refine_blocks", "refine_settings"]

_NORMS = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm) if c is not None)


_JUDGED = 16  # the batches the report's block losses (before / after) are the mean over
CHUNK_TOKENS = 1024  # a training step's forward and backward run on pieces of at most this many tokens


def _split(x, n: int, parts: int):
    """``x`` (a tensor, or a tuple / list / dict of them, nested) cut into ``parts`` pieces along a first axis of
    length ``n``; anything else (a mask broadcast over the batch, None, a number) repeated in every piece."""
    if torch.is_tensor(x):
        return list(torch.tensor_split(x, parts)) if x.dim() and x.shape[0] == n else [x] * parts
    if isinstance(x, (tuple, list)):
        return [type(x)(p) for p in zip(*(_split(v, n, parts) for v in x))] if x else [x] * parts
    if isinstance(x, dict):
        cut = {k: _split(v, n, parts) for k, v in x.items()}
        return [{k: cut[k][i] for k in x} for i in range(parts)]
    return [x] * parts


def _step_loss(mod: nn.Module, args, kwargs, target, mask) -> torch.Tensor:
    """The relative MSE of the block on one batch, its gradient accumulated (``backward``) a piece of at most
    :data:`CHUNK_TOKENS` tokens at a time: the same loss and gradient as one pass (the denominator is the whole
    batch's), with a fraction of the activations held for the backward pass (issue 29: at width 768 a
    32-sentence batch's held 0.2 GB)."""
    n = target.shape[0] if target.dim() else 1
    tokens = target.numel() // max(1, target.shape[-1])
    parts = max(1, min(n, -(-tokens // CHUNK_TOKENS)))
    t = target.float() if mask is None else target.float() * mask
    den = (t * t).sum().clamp_min(1e-12)
    pieces = zip(_split(args, n, parts), _split(kwargs, n, parts), _split(target, n, parts), _split(mask, n, parts))
    total = 0.0
    for a, kw, tg, m in pieces:
        d = (_main(mod(*a, **kw)) - tg).float()
        if m is not None:
            d = d * m
        num = (d * d).sum()
        (num / den).backward()
        total += float(num.detach())
    return torch.tensor(total) / den


def _train_block(mod: nn.Module, groups: list, batches, n: int, steps: int, on_step=None) -> tuple[float, float]:
    """Adam on the param ``groups`` (each lr cosine to 0) so that mod(inputs) matches targets; (first, last)
    mean loss.  ``batches(i)``: ((args, kwargs), target, mask) of cached batch i < n (fetched a batch at a time).
    ``on_step(step)`` runs before each step (the structure's sigma and budget)."""
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]

    def loss_at(i):
        (args, kwargs), target, mask = batches(i)
        return rel_mse(_main(mod(*args, **kwargs)), target, mask)

    judged = range(min(n, _JUDGED))

    with torch.no_grad():
        first = sum(float(loss_at(i)) for i in judged) / len(judged)
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
        if on_step is not None:
            on_step(step, opt)
        opt.zero_grad(set_to_none=True)
        (args, kwargs), target, mask = batches(step % n)
        _step_loss(mod, args, kwargs, target, mask)  # (the gradient accumulated piece by piece)
        opt.step()
    with torch.no_grad():
        last = sum(float(loss_at(i)) for i in judged) / len(judged)
    return first, last


def refine_settings(t) -> dict:
    """:func:`refine_blocks`' keyword arguments from a :class:`gblrc.TrainingConfig` (its ``refine_*`` fields;
    the structure's sigma rises to the config's ``sigma_max``).  The batches: the data's first
    ``t.refine_batches``."""
    return {
        "steps": REFINE_STEPS if t.refine_steps is None else t.refine_steps,
        "lr": t.refine_lr,
        "norms": t.refine_norms,
        "target": t.refine_target,
        "structure": t.refine_structure,
        "lr_struct": t.lr_struct,
        "sigma": (min(10.0, t.sigma_max), t.sigma_max),
    }


def _structure_hook(mods: list, steps: int, lr_struct: float, sigma0: float, sigma_max: float):
    """The structure's schedule within one block: sigma rising geometrically from ``sigma0`` to ``sigma_max``
    over the steps, widths kept at the block's initial cost by a proximal shrink whose lambda grows while the
    cost is above it (the method's own controller, reference = the start)."""
    start = cost_ratio(mods)
    lam = LambdaController(start, start, 1, lam0=2e-4)

    def on_step(step: int, opt) -> None:
        sigma = sigma0 * (sigma_max / sigma0) ** (step / max(1, steps - 1))
        with torch.no_grad():
            for m in mods:
                m.sigma.fill_(sigma)
            shrink = lam.update(step, cost_ratio(mods)) * opt.param_groups[-1]["lr"]
            proximal_step(mods, shrink)

    return on_step


def _block_params(mod: nn.Module, inside: list, layers: dict, norms: bool, structure: bool):
    """(content, structure) parameters of a block: the compressed layers' U, V, bias (+ the block's
    normalisation layers' weights with ``norms``); their widths and locations with ``structure``."""
    content = [p for n in inside for name, p in layers[n].named_parameters() if name not in ("widths", "locations")]
    if norms:
        content += [p for m in mod.modules() if isinstance(m, _NORMS) for p in m.parameters()]
    struct = (
        [getattr(layers[n], a) for n in inside if layers[n].family == "gblr" for a in ("widths", "locations")]
        if structure
        else []
    )  # (a block-sparse layer's structure is fixed)
    return content, struct


def refine_blocks(
    model: nn.Module,
    dense: nn.Module,
    layers: dict,
    xs,
    *,
    progress: bool = False,
    placement=None,
    **settings,
) -> dict:
    """Refine ``model``'s blocks in call order (see module doc) on the calibration batches ``xs``;
    ``layers`` {name: GBLR layer} are the compressed ones, ``dense`` the dense model (unchanged).

    ``norms``: the block's LayerNorm / RMSNorm weights train too.  ``target``: "dense" (the dense block's
    output on the dense model's inputs: anchored to the dense model) or "local" (the dense block applied to
    the compressed model's own inputs: each block only undoes its own error).  ``structure``: the GBLR
    layers' widths and locations train too (lr ``lr_struct``, default 5 x lr, Gaudi masks with sigma rising
    from ``sigma[0]`` to ``sigma[1]``, each block's cost held at its start); the structure is left hard
    (eval-mode masks), the caller fits it to the budget.
    The settings (``steps``, ``lr``, ``norms``, ``target``, ``structure``, ``lr_struct``, ``sigma``) default to
    :func:`refine_settings` of the default :class:`gblrc.TrainingConfig`.
    Each block's inputs (and the dense targets) are computed once, propagated through the blocks of a chain
    (:class:`gblrc.learn.blocks.BlockInputs`): O(L) block calls for L blocks.
    Returns {"blocks": [{"name", "layers", "loss_before", "loss_after", "inputs"}], "seconds", "steps"}
    (``inputs``: "propagated" or "captured").  ``placement``: a :class:`gblrc.learn.blocks.Placement`
    (offload: each block and its dense twin on the device only while it trains, the cached batches in
    storage)."""
    defaults = refine_settings(TrainingConfig())
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"refine_blocks: unknown setting(s) {sorted(unknown)}; it takes {sorted(defaults)}")
    kw = {**defaults, **settings}
    steps, lr, norms, target = kw["steps"], kw["lr"], kw["norms"], kw["target"]
    structure, lr_struct, sigma = kw["structure"], kw["lr_struct"], kw["sigma"]
    if target not in ("dense", "local"):
        raise ValueError(f"refine target must be 'dense' or 'local'; got {target!r}")
    t0 = time.perf_counter()
    rows = []
    names = find_blocks(model, list(layers))
    was = model.training
    model.eval()
    bar = None
    if progress:
        from gblrc.learn.progress import progress_bar

        bar = progress_bar(len(names), "gblrc refine")
    try:
        with _CacheOff(model, dense):
            place = placement or Placement("cpu")
            ins = BlockInputs(model, xs, place)  # each block's inputs computed once: O(L) block calls in all
            dense_ins = BlockInputs(dense, xs, place) if target == "dense" else None
            for block in names:
                rows.append(
                    _refine_one(
                        model, dense, layers, block, xs, ins, dense_ins, steps, lr, norms, structure, lr_struct, sigma
                    )
                )
                rows[-1]["inputs"] = ins.how[block]  # "propagated" from the block before, or "captured"
                release_memory()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(block=block, loss=f"{rows[-1]['loss_before']:.3g}->{rows[-1]['loss_after']:.3g}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was)
    return {"blocks": rows, "steps": int(steps), "seconds": round(time.perf_counter() - t0, 3)}


def _train_one(mod, mods, content, struct, batches, n, steps, lr, lr_struct, sigma) -> tuple:
    """The block's content (and structure) trained on the cached batches: (first, last) mean loss."""
    groups = [{"params": content, "lr": lr}]
    hook = None
    if struct:
        ls = 5.0 * lr if lr_struct is None else lr_struct
        groups.append({"params": struct, "lr": ls, "betas": (0.0, 0.999)})
        hook = _structure_hook(mods, steps, ls, *sigma)
        for m in mods:
            m.train()
            m.hard_forward = True
    return _train_block(mod, groups, batches, n, steps, hook)


def _refine_one(model, dense, layers, block, xs, ins, dense_ins, steps, lr, norms, structure, lr_struct, sigma) -> dict:
    """One block: cache its inputs and targets, train its parameters; the row of the report."""
    mod = model.get_submodule(block)
    inside = [n for n in layers if n == block or n.startswith(block + ".")]
    content, struct = _block_params(mod, inside, layers, norms, structure)
    keep = [(p, p.requires_grad) for p in model.parameters()]
    mods = [layers[n] for n in inside]
    for p, _ in keep:
        p.requires_grad_(False)
    for p in content + struct:
        p.requires_grad_(True)
    try:
        if dense_ins is not None:  # target "dense": the dense block on the dense model's inputs (first: its
            dense_ins.inputs(block)  # inputs are released before the compressed model's are computed)
            targets = dense_ins.outputs(block, release=True)
        inputs = ins.inputs(block)
        if dense_ins is None:  # target "local": the dense block on the compressed model's inputs
            targets = ins.run_on(dense.get_submodule(block), inputs)
        place = ins.place

        def batch(i):  # one cached batch on the device, as float32 (offload, half_cache)
            target = place.fetch(targets[i])
            return place.fetch(inputs[i]), target, _mask_for(place.fetch(xs[i]), target)

        with place.on_device(mod):  # (offload: the block on the device while it trains)
            first, last = _train_one(mod, mods, content, struct, batch, len(inputs), steps, lr, lr_struct, sigma)
        ins.changed()
    finally:
        for p, r in keep:
            p.requires_grad_(r)
        for m in mods:
            m.eval()
    return {"name": block, "layers": len(inside), "loss_before": round(first, 6), "loss_after": round(last, 6)}
