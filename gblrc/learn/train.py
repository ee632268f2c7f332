"""compress's own training loop: batches, the objective, AdamW and checkpoints around a
:class:`gblrc.learn.controller.Controller`, which does the method itself (docs/design.md §1) -- the same
controller ``gblrc.prepare`` gives a user's own loop.

Phases over ``steps`` optimiser steps:

1. warm-up (``warmup`` fraction): sigma = 1 (smooth Gaudi masks);
2. homotopy: sigma rises linearly to ``sigma_max``; widths shrink under the global lambda;
3. cool-down (``cooldown`` fraction): the structure is hardened (boxcar masks, the eval form), fitted
   exactly to the budget (``budget.fit_to_budget``) and frozen; only the content (U, V and the rest of
   the model) trains, so the model that comes out is the one that was trained.

The content learning rate follows a cosine decay from ``lr`` to ``lr_min`` x ``lr``.
The whole student stays in eval mode (no dropout: it imitates a teacher); only the GBLR layers switch to
train mode.  The batch of every step is a function of the step, so a run resumed from a checkpoint
finishes like an uninterrupted one.  Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the
student is wrapped in torch's DistributedDataParallel: each rank takes its rows of every batch, DDP
averages the gradients, and every rank takes the same steps.  ``mixed_precision="bf16"``: the forward
passes under ``torch.autocast`` (bfloat16 matrix products; masks, parameters, optimiser and loss fp32).
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from gblrc.learn import dist
from gblrc.learn.controller import Controller, Schedule
from gblrc.learn.data import batch_stream, split_batch, to_device

__all__ = ["Schedule", "Trainer"]

CKPT_NAME = "checkpoint.pt"


class Trainer:
    """Runs ``controller``'s schedule on ``data`` with ``objective`` (loss(x, y)) over ``model``."""

    def __init__(
        self,
        model,
        controller: Controller,
        objective,
        data,
        *,
        rank: int = 0,
        world: int = 1,
        extra_signature: dict | None = None,
    ):
        """Batch size, seed, precision, checkpoints and progress are the controller's config's."""
        self.model, self.ctrl, self.objective, self.data = model, controller, objective, data
        self.cfg: Schedule = controller.schedule
        o, t = controller.config, controller.config.training
        self.batch_size, self.seed, self.mixed_precision = int(o.batch_size), int(o.seed), o.mixed_precision
        self.checkpoint_dir = str(t.checkpoint_dir) if t.checkpoint_dir else None
        self.checkpoint_every, self.resume = int(t.checkpoint_every), t.resume
        self.progress, self.rank, self.world = o.progress, rank, world
        # everything else is frozen while training (no wasted gradients), and restored after
        keep = {id(p) for p in controller.trainable()} | {id(p) for p in controller.struct}
        self._frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
        self.opt = torch.optim.AdamW(controller.param_groups())
        self.curve: list = []
        # every result-affecting setting with this run's steps and budgets, what the caller adds, the layers
        self.signature = {**self.cfg.signature(), **(extra_signature or {}), "layers": list(controller.layers)}
        self._wrapped, self._wrapped_cooled = None, None

    @property
    def step(self) -> int:
        return self.ctrl.step_count

    # ----------------------------------------------------------- checkpoints
    def _ckpt_path(self):
        return None if not self.checkpoint_dir else os.path.join(self.checkpoint_dir, CKPT_NAME)

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None or self.rank != 0:
            return
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        state = {
            "signature": self.signature,
            "step": self.step,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "controller": self.ctrl.state_dict(),
            "curve": self.curve,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
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
            raise ValueError(
                f"cannot read the checkpoint {path!r} ({type(e).__name__}); delete it to start over"
            ) from None
        if state.get("signature") != self.signature or "controller" not in state:
            raise ValueError(
                f"the checkpoint in {self.checkpoint_dir!r} was made with other settings; "
                f"rerun with the same settings or delete it to start over"
            )
        self.model.load_state_dict(state["model"])
        self.ctrl.load_state_dict(state["controller"])
        self.opt.load_state_dict(state["opt"])
        self.curve = [list(r) for r in state["curve"]]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        return True

    # ------------------------------------------------------------------ loop
    def _forward_model(self):
        """The student as the loss calls it: itself, or wrapped in DistributedDataParallel (rebuilt when
        the cool-down freezes the structure, so DDP's reducer only waits for gradients that come)."""
        if self.world <= 1:
            return self.model
        if self._wrapped is None or self._wrapped_cooled != self.ctrl.cooled:
            self._wrapped = dist.data_parallel(self.model)
            self._wrapped_cooled = self.ctrl.cooled
        return self._wrapped

    def _autocast(self, dev):
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self) -> list:
        cfg = self.cfg
        if self.resume:
            self.load_checkpoint()
        dev = next(self.model.parameters()).device
        stream = batch_stream(self.data, self.batch_size, self.seed, start=self.step)
        bar = None
        if self.progress and self.rank == 0:
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
                if (
                    self.checkpoint_dir
                    and self.checkpoint_every > 0
                    and self.step % self.checkpoint_every == 0
                    and self.step < cfg.steps
                ):
                    self.save_checkpoint()
        finally:
            for p in self._frozen:
                p.requires_grad_(True)
            if bar is not None:
                bar.close()
            self._wrapped = None
        if cfg.learn_structure and not self.ctrl.cooled:
            self.ctrl.cool(trim=True)
        dist.broadcast_module(self.model, self.world)  # identical on every rank, bit for bit
        return self.curve

    def _one_step(self, stream, dev) -> None:
        cfg, step = self.cfg, self.step
        self.model.eval()
        if cfg.learn_structure and not self.ctrl.cooled:
            for m in self.ctrl.mods:
                m.train()
        x, y = split_batch(next(stream), self.rank, self.world)
        x, y = to_device(x, dev), to_device(y, dev)
        self.objective.runner = self._forward_model()
        with self._autocast(dev):
            loss = self.objective(x, y)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss became {float(loss)} at step {step + 1}; lower --lr and try again")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.param_groups[0]["lr"] = cfg.content_lr(step)
        self.opt.step()
        rec = self.ctrl.step(self.opt)
        lv = dist.allreduce_mean(float(loss.detach()), self.world)
        self.curve.append([rec["step"], lv, rec["cost"], rec["sigma"], rec["lambda"]])
