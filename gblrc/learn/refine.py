"""Block-level refinement after the initialisation (AA-SVD's second stage; BRECQ's block reconstruction).

After every layer is fitted on its own, the compressed model's errors compound through the network.
:func:`refine_blocks` takes the model's blocks in call order (the children of a ModuleList / Sequential
that hold compressed layers: a transformer's layers; a compressed layer outside any such container is a
block of its own) and, for each, trains the content (U, V, bias) of its compressed layers jointly so
that the block, fed the *compressed* model's own inputs to it (the errors of the blocks before), gives
the *dense* block's output on the dense inputs.  Inputs and targets are computed once per block on the
calibration batches; each step is one block on one cached batch (cheap, so a CPU can afford it).
The loss is the relative MSE over real tokens (the batch's attention mask), as the distillation's.

Opt-in for now (``TrainingConfig(refine_steps=N)``, ``gblrc compress --refine-steps N``); the structure
(widths, locations) stays as initialised.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from gblrc.learn.data import call_model, model_output
from gblrc.learn.objective import _mask_for, rel_mse

__all__ = ["find_blocks", "refine_blocks"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the block's inputs are captured."""


def find_blocks(model: nn.Module, layer_names) -> list[str]:
    """Block names for ``layer_names`` (compressed layers): for each layer the deepest ancestor that is an
    item of a ModuleList / Sequential (``encoder.layer.3``), else the layer itself; in module order."""
    containers = {n for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
    blocks: list[str] = []
    for name in layer_names:
        parts = name.split(".")
        block = name
        for j in range(len(parts) - 1, -1, -1):  # the innermost container above the layer
            if ".".join(parts[:j]) in containers:
                block = ".".join(parts[: j + 1])
                break
        if block not in blocks:
            blocks.append(block)
    return blocks


def _main(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0] if isinstance(out, (tuple, list)) else model_output(out)


@torch.no_grad()
def _targets(dense: nn.Module, block: str, xs) -> list[torch.Tensor]:
    """The dense block's outputs on the dense model's own inputs, one per calibration batch."""
    got = []
    h = dense.get_submodule(block).register_forward_hook(lambda m, a, o: got.append(_main(o).detach()))
    try:
        for x in xs:
            call_model(dense, x)
    finally:
        h.remove()
    return got


@torch.no_grad()
def _inputs(model: nn.Module, block: str, xs) -> list[tuple]:
    """The compressed model's (args, kwargs) into ``block``, one per calibration batch."""
    got = []

    def hook(_m, args, kwargs):
        got.append(
            (
                tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()},
            )
        )
        raise _Stop

    h = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in xs:
            try:
                call_model(model, x)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def _train_block(mod: nn.Module, params: list, inputs, targets, masks, steps: int, lr: float) -> tuple[float, float]:
    """Adam on ``params`` (lr cosine to 0) so that mod(inputs) matches targets; (first, last) mean loss."""
    opt = torch.optim.Adam(params, lr=lr)

    def loss_at(i):
        args, kwargs = inputs[i]
        return rel_mse(_main(mod(*args, **kwargs)), targets[i], masks[i])

    with torch.no_grad():
        first = sum(float(loss_at(i)) for i in range(len(inputs))) / len(inputs)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
        loss = loss_at(step % len(inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = sum(float(loss_at(i)) for i in range(len(inputs))) / len(inputs)
    return first, last


def refine_blocks(
    model: nn.Module, dense: nn.Module, layers: dict, xs, *, steps: int, lr: float = 3e-4, progress: bool = False
) -> dict:
    """Refine ``model``'s blocks in call order (see module doc) on the calibration batches ``xs``;
    ``layers`` {name: GBLR layer} are the compressed ones, ``dense`` the dense model (unchanged).
    Returns {"blocks": [{"name", "layers", "loss_before", "loss_after"}], "seconds", "steps"}."""
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
        for block in names:
            inside = [n for n in layers if n == block or n.startswith(block + ".")]
            params = [
                p for n in inside for name, p in layers[n].named_parameters() if name not in ("widths", "locations")
            ]
            keep = [(p, p.requires_grad) for p in model.parameters()]
            for p, _ in keep:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            try:
                targets = _targets(dense, block, xs)
                inputs = _inputs(model, block, xs)
                masks = [_mask_for(x, t) for x, t in zip(xs, targets)]
                first, last = _train_block(model.get_submodule(block), params, inputs, targets, masks, steps, lr)
            finally:
                for p, r in keep:
                    p.requires_grad_(r)
            rows.append(
                {"name": block, "layers": len(inside), "loss_before": round(first, 6), "loss_after": round(last, 6)}
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(block=block, loss=f"{first:.3g}->{last:.3g}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was)
    return {"blocks": rows, "steps": int(steps), "seconds": round(time.perf_counter() - t0, 3)}
