"""GBLR layers trained from scratch in a plain PyTorch loop: gblrc.prepare -> your loop -> gblrc.finalize.

The paper's setting: a ViT or MLP-Mixer (``samples/families.py``) whose linear layers are replaced by GBLR
layers at random initialisation and trained on a task (scikit-learn's digits, offline), the structure
(widths and locations) learned while the weights train.  The loop is an ordinary one -- a DataLoader,
AdamW, a learning-rate scheduler -- with one gblrc call after each optimizer step::

    model, ctrl = gblrc.prepare(model, gblrc.CompressConfig(budget=0.15, steps=N, init="svd", ...))
    opt = torch.optim.AdamW(ctrl.param_groups())          # content | structure (own lr, beta1 = 0)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); sched.step()
        ctrl.step(opt)                                    # lambda, proximal widths, sigma, cool-down
        opt.zero_grad()
    report = gblrc.finalize(model)                        # hardened, trimmed to <= the budget

    python samples/scratch_loop.py --model vit --budget 0.15 --steps 1000     # ~1.5 min, 1 thread
    python samples/scratch_loop.py --structure lowrank                         # the low-rank baseline

``benchmarks/scratch_structures.py`` runs :func:`train_structured` over seeds and budgets.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import gblrc

_spec = importlib.util.spec_from_file_location(
    "gblrc_samples_families", Path(__file__).resolve().parent / "families.py"
)
fam = importlib.util.module_from_spec(_spec)  # samples/families.py (samples/ is a folder of scripts)
_spec.loader.exec_module(fam)

__all__ = ["train_structured", "accuracy"]


def train_structured(
    model,
    budget: float,
    data: dict,
    *,
    structure: str = "gblr",
    steps: int = 1000,
    lr: float = 1e-3,
    lr_struct: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
):
    """Replace ``model``'s linear layers by GBLR (or low-rank) layers at ``budget`` and train everything
    from scratch on ``data`` ({"inputs", "targets"}) in a plain loop; returns (model, report)."""
    cfg = gblrc.CompressConfig(
        budget=budget,
        steps=steps,
        lr=lr,
        structure=structure,
        init="svd",
        allocate="uniform",
        seed=seed,
        training=gblrc.TrainingConfig(lr_struct=lr_struct, train_rest=True),
    )
    model, ctrl = gblrc.prepare(model, cfg)
    opt = torch.optim.AdamW(ctrl.param_groups())  # content (the whole model: train_rest) | structure
    # content: cosine from lr to 0.1 lr; structure: constant (as gblrc's own loop)
    content = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps - 1))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [content] + [lambda s: 1.0] * (len(opt.param_groups) - 1))
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(data["inputs"], data["targets"])
    step = 0
    model.train()
    while step < steps:
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ctrl.step(opt, loss=loss.detach())
            step += 1
            if step == steps:
                break
    return model, gblrc.finalize(model)


@torch.no_grad()
def accuracy(model, data, bs: int = 256) -> float:
    model.eval()
    x, y = data["inputs"], data["targets"]
    return sum(int((model(x[i : i + bs]).argmax(-1) == y[i : i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit", choices=["vit", "mixer"])
    ap.add_argument("--size", default="bench", choices=["tiny", "bench"])
    ap.add_argument("--budget", type=float, default=0.15)
    ap.add_argument("--structure", default="gblr", choices=["gblr", "lowrank"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=None, help="default: vit 1e-3, mixer 2e-3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None, help="save the compressed model here (gblrc.save)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = 8 if a.size == "tiny" else 16
    xtr, ytr, xte, yte = fam.digits(image_size=size, seed=0)
    model = fam.build(a.model, a.size, seed=a.seed, image_size=size)  # random init
    lr = a.lr if a.lr is not None else {"vit": 1e-3, "mixer": 2e-3}[a.model]
    model, rep = train_structured(
        model, a.budget, {"inputs": xtr, "targets": ytr}, structure=a.structure, steps=a.steps, lr=lr, seed=a.seed
    )
    print(
        f"{a.model} {a.structure} at budget {a.budget}: achieved cost ratio {rep['achieved_ratio']:.3f}, "
        f"held-out accuracy {accuracy(model, {'inputs': xte, 'targets': yte}):.4f}, "
        f"{sum(r['blocks'] for r in rep['layers'])} blocks, {rep['structure_moved']['blocks_changed']:.2f} moved"
    )
    if a.output:
        gblrc.save(model, a.output, example_inputs=xte[:4])
        print(f"wrote {a.output}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
