"""The trainer: AdamW + proximal width shrinkage + sigma homotopy + global lambda (DESIGN.md §1).

Phases over ``steps`` optimiser steps:

1. warm-up (``warmup`` fraction): sigma = 1 (smooth Gaudi masks);
2. homotopy: sigma rises linearly to ``sigma_max``; widths shrink under the global lambda;
3. cool-down (``cooldown`` fraction): the structure is hardened (boxcar masks, the eval form), fitted
   exactly to the budget (``budget.fit_to_budget``) and frozen; only the content (U, V and the rest of
   the model) trains, so the model that comes out is the one that was trained.

The content learning rate follows a cosine decay from ``lr`` to ``lr_min`` x ``lr``.
The whole student stays in eval mode (no dropout: it imitates a teacher); only the GBLR layers switch to
train mode during phases 1-2.  The batch of every step is a function of the step, so a run resumed from
a checkpoint finishes like an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from gblrc.learn import dist
from gblrc.learn.budget import LambdaController, cost_ratio, cost_unit, fit_to_budget, proximal_step
from gblrc.learn.data import batch_stream, split_batch, to_device

__all__ = ["TrainConfig", "Trainer"]

CKPT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int
    budget: float
    batch_size: int = 32
    lr: float = 1e-3
    lr_struct: float = 5e-3
    seed: int = 0
    learn_structure: bool = True
    warmup: float = 0.1
    cooldown: float = 0.2
    sigma_max: float = 100.0
    hard_forward: bool = True  # train on the eval-mode (boxcar) weights, Gaudi gradients for the structure
    lam_step: float = 2e-4  # width shrink per step when lambda first switches on (lam0 * lr_struct)
    lr_min: float = 0.1  # the content lr decays (cosine) from lr to lr_min x lr over the run; 1 = constant
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    # The lambda controller steers the multiply-adds toward ``budget`` (a FLOP ratio); the cool-down's exact
    # fit lands on ``fit_budget`` (None: ``budget``) in ``budget_unit`` ("flops" or "time", gblrc.learn.budget).
    # A time budget is not steered directly: a layer's estimated time is flat in the widths (a stacked
    # lowering pays for whole components), so lambda would grow until every width collapses at once.
    budget_unit: str = "flops"
    fit_budget: float | None = None

    @property
    def warm_end(self) -> int:
        return int(round(self.warmup * self.steps))

    @property
    def cool_start(self) -> int:
        return self.steps - int(round(self.cooldown * self.steps)) if self.learn_structure else 0

    def sigma(self, step: int) -> float:
        if step < self.warm_end:
            return 1.0
        span = max(1, self.cool_start - self.warm_end)
        return 1.0 + (self.sigma_max - 1.0) * min(1.0, (step - self.warm_end + 1) / span)

    def content_lr(self, step: int) -> float:
        t = min(1.0, step / max(1, self.steps - 1))
        return self.lr * (self.lr_min + (1.0 - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def signature(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "budget", "batch_size", "lr", "lr_struct", "seed", "lr_min",
                                              "learn_structure", "hard_forward", "warmup", "cooldown", "sigma_max",
                                              "budget_unit", "fit_budget")}


class Trainer:
    def __init__(self, model, layers: dict, objective, data, cfg: TrainConfig, *, rank: int = 0, world: int = 1,
                 extra_signature: dict | None = None, extra_params=()):
        self.model, self.layers, self.objective, self.data, self.cfg = model, layers, objective, data, cfg
        self.rank, self.world = rank, world
        self.mods = list(layers.values())
        struct = [p for m in self.mods for p in (m.widths, m.locations)]
        sid = {id(p) for p in struct}
        # content: the compressed layers' factors and biases; the rest of the model stays as it was
        content = [p for m in self.mods for p in m.parameters() if id(p) not in sid]
        cid = {id(p) for p in content}
        content += [p for p in extra_params if id(p) not in cid and id(p) not in sid]  # e.g. LayerNorms
        # everything else is frozen while training (no wasted gradients), and restored after
        keep = {id(p) for p in content} | sid
        self._frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
        groups = [{"params": content, "lr": cfg.lr, "weight_decay": 0.0}]
        if cfg.learn_structure:
            groups.append({"params": struct, "lr": cfg.lr_struct, "betas": (0.0, 0.999), "weight_decay": 0.0})
        for p in struct:
            p.requires_grad_(cfg.learn_structure)
        self.struct, self.content = struct, content
        self.opt = torch.optim.AdamW(groups)
        reach = cfg.warm_end + int(0.75 * max(1, cfg.cool_start - cfg.warm_end))
        self.unit = cost_unit(cfg.budget_unit)
        self.ctrl = LambdaController(cfg.budget, cost_ratio(self.mods), reach, cfg.lam_step / cfg.lr_struct)
        self.step, self.curve, self.cooled = 0, [], False
        self.signature = dict(cfg.signature(), layers=list(layers), **(extra_signature or {}))

    # ---------------------------------------------------------------- phases
    def _cool(self, trim: bool) -> None:
        """Harden, fit to the budget and freeze the structure (cool-down)."""
        for m in self.mods:
            m.eval()
        if trim:
            fit_to_budget(self.mods, self.cfg.budget if self.cfg.fit_budget is None else self.cfg.fit_budget, self.unit)
        for p in self.struct:
            p.requires_grad_(False)
            p.grad = None
        self.cooled = True

    def _set_modes(self) -> None:
        self.model.eval()
        if self.cfg.learn_structure and not self.cooled:
            for m in self.mods:
                m.train()
                m.hard_forward = self.cfg.hard_forward

    # ----------------------------------------------------------- checkpoints
    def _ckpt_path(self):
        return None if not self.cfg.checkpoint_dir else os.path.join(self.cfg.checkpoint_dir, CKPT_NAME)

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None or self.rank != 0:
            return
        os.makedirs(self.cfg.checkpoint_dir, exist_ok=True)
        state = {"signature": self.signature, "step": self.step, "model": self.model.state_dict(),
                 "opt": self.opt.state_dict(), "ctrl": self.ctrl.state_dict(), "curve": self.curve,
                 "cooled": self.cooled, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                                "numpy": np.random.get_state()}}
        tmp = path + f".tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self) -> bool:
        path = self._ckpt_path()
        if path is None or not os.path.exists(path):
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"cannot read the checkpoint {path!r} ({type(e).__name__}); delete it to start over") from None
        if state.get("signature") != self.signature:
            raise ValueError(f"the checkpoint in {self.cfg.checkpoint_dir!r} was made with other settings; "
                             f"rerun with the same settings or delete it to start over")
        if state["cooled"]:
            self._cool(trim=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.ctrl.load_state_dict(state["ctrl"])
        self.step, self.curve = int(state["step"]), [list(r) for r in state["curve"]]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        return True

    # ------------------------------------------------------------------ loop
    def run(self) -> list:
        cfg = self.cfg
        if cfg.resume:
            self.load_checkpoint()
        dev = next(self.model.parameters()).device
        stream = batch_stream(self.data, cfg.batch_size, cfg.seed, start=self.step)
        bar = None
        if cfg.progress and self.rank == 0:
            from gblrc.learn.progress import progress_bar

            bar = progress_bar(cfg.steps, "gblrc compress", initial=self.step)
        for p in self._frozen:
            p.requires_grad_(False)
        try:
            while self.step < cfg.steps:
                self._one_step(stream, dev)
                if bar is not None:
                    _, loss, ratio, sigma, lam = self.curve[-1]
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", cost=f"{ratio:.3f}", sigma=f"{sigma:.3g}", lam=f"{lam:.3g}")
                if cfg.checkpoint_dir and cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0 \
                        and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            for p in self._frozen:
                p.requires_grad_(True)
            if bar is not None:
                bar.close()
        if cfg.learn_structure and not self.cooled:
            self._cool(trim=True)
        dist.broadcast_module(self.model, self.world)  # identical on every rank, bit for bit
        return self.curve

    def _one_step(self, stream, dev) -> None:
        cfg, step = self.cfg, self.step
        if cfg.learn_structure and not self.cooled and step >= cfg.cool_start:
            self._cool(trim=True)
        self._set_modes()
        sigma = cfg.sigma(step) if not self.cooled else cfg.sigma_max
        for m in self.mods:
            m.sigma.fill_(sigma)
        x, y = split_batch(next(stream), self.rank, self.world)
        x, y = to_device(x, dev), to_device(y, dev)
        loss = self.objective(x, y)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {float(loss)} at step {step + 1}; lower --lr and try again")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.param_groups[0]["lr"] = cfg.content_lr(step)
        params = self.content + ([] if self.cooled else self.struct if cfg.learn_structure else [])
        dist.allreduce_grads([p for p in params if p.requires_grad], self.world)
        self.opt.step()
        lam = 0.0
        if cfg.learn_structure and not self.cooled:
            lam = self.ctrl.update(step, cost_ratio(self.mods))
            proximal_step(self.mods, lam * cfg.lr_struct)
        self.step += 1
        lv = dist.allreduce_mean(float(loss.detach()), self.world)
        self.curve.append([self.step, lv, cost_ratio(self.mods), float(sigma), float(lam)])
