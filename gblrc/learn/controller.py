"""The Gaudi-GBLR method for a training loop that is not gblrc's: :class:`Controller`.

``gblrc.prepare(model, config)`` returns one; in the loop, after every ``optimizer.step()``, one call
``ctrl.step(optimizer)`` does everything the method needs (docs/design.md §1, "Training"):

1. lambda toward the budget (:class:`gblrc.learn.budget.LambdaController`: rises while the cost is above a
   reference that descends from the initial cost to the budget, 0 below it);
2. the proximal step on the widths, w <- clamp(softshrink(w, lambda x lr_struct), 0, 1), with the
   structure group's current learning rate, and the location wrap l <- l - floor(l);
3. sigma homotopy by step for the next forward (1 during warm-up, then linear to sigma_max);
4. at the cool-down the structure is hardened, fitted exactly to the budget and frozen: from then on the
   layers use their boxcar masks in train mode too, and only the content trains.

:meth:`Controller.param_groups` gives the optimiser its groups (content; structure with its own lr,
beta1 = 0 and no weight decay, as the authors use).  :meth:`state_dict` / :meth:`load_state_dict` hold
everything that is not in the model's own state dict.  The controller only touches the GBLR layers
themselves, so the model may be wrapped (DistributedDataParallel, ``accelerate``): the widths receive the
same averaged gradients on every rank, and every rank takes the same proximal steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from gblrc.learn.budget import LambdaController, cost_ratio, cost_unit, fit_to_budget, proximal_step
from gblrc.learn.config import CompressConfig, TrainingConfig, result_settings

__all__ = ["Controller", "Schedule"]

STRUCTURE_GROUP = "gblrc_structure"  # key marking the structure's optimiser group


@dataclass(frozen=True)
class Schedule:
    """The schedule of one run over ``steps`` optimiser steps: sigma by step, the phases, the content lr.

    Every setting is read from ``config`` (a :class:`CompressConfig`; ``schedule.warmup`` is
    ``config.training.warmup``, ``schedule.lr`` is ``config.lr``): nothing is copied.  Only what one run
    resolves differently from the config is held here: ``steps`` (the user's loop may run another number),
    ``budget`` (the FLOP ratio lambda steers toward) and ``fit_budget`` (what the cool-down's exact fit
    lands on, in ``config.budget_unit``; None: ``budget``).  A time budget is not steered directly: a
    layer's estimated time is flat in the widths (a stacked lowering pays for whole components), so lambda
    would grow until every width collapses at once.
    """

    config: CompressConfig
    steps: int
    budget: float
    fit_budget: float | None = None

    @classmethod
    def of(cls, config: CompressConfig, steps=None, budget=None, fit_budget=None) -> "Schedule":
        """``config``'s schedule, with its steps and budget unless others are given."""
        return cls(
            config,
            int(config.steps if steps is None else steps),
            float(config.budget if budget is None else budget),
            fit_budget,
        )

    def __getattr__(self, name):  # the config's settings, top level first, then training's
        if name.startswith("_") or name == "config":
            raise AttributeError(name)
        config = self.config
        for holder in (config, config.training):
            if name in _FIELDS[type(holder)]:
                return getattr(holder, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    @property
    def lr_struct(self) -> float:
        """The structure's learning rate as resolved (training.lr_struct, or 5 x lr)."""
        return self.config.lr_struct

    @property
    def learn_structure(self) -> bool:
        return self.config.structure == "gblr"

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
        """The content lr: cosine from lr to lr_min x lr over the run (lr_min = 1: constant)."""
        t = min(1.0, step / max(1, self.steps - 1))
        return self.lr * (self.lr_min + (1.0 - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def signature(self) -> dict:
        """Every result-affecting setting (:func:`result_settings`) with this run's steps and budgets."""
        return {
            **result_settings(self.config),
            "steps": self.steps,
            "budget": self.budget,
            "fit_budget": self.fit_budget,
        }


_FIELDS = {c: frozenset(f.name for f in dataclasses.fields(c)) for c in (CompressConfig, TrainingConfig)}


class Controller:
    """The method's schedule over ``steps`` optimiser steps for ``layers`` ({name: GBLRLinear}).

    ``budget``: the FLOP ratio lambda steers toward; ``fit_budget`` (default ``budget``): what the
    cool-down's exact fit lands on, in ``config.budget_unit``.  ``extra_params``: trained with the content
    (normalisation layers, or the rest of the model).
    """

    def __init__(
        self,
        layers: dict,
        config: CompressConfig,
        *,
        steps: int | None = None,
        budget: float | None = None,
        fit_budget: float | None = None,
        extra_params=(),
    ):
        self.layers, self.config = dict(layers), config
        self.mods = list(self.layers.values())
        self.schedule = Schedule.of(config, steps, budget, fit_budget)
        s = self.schedule
        self.unit = cost_unit(config.budget_unit)
        # the structure of block-sparse layers (family "neurons"/"heads") is fixed: neither learned nor content
        self.learned = [m for m in self.mods if m.family == "gblr"]
        self.struct = [p for m in self.learned for p in (m.widths, m.locations)]
        fixed = [p for m in self.mods if m.family != "gblr" for p in (m.widths, m.locations)]
        for p in fixed:
            p.requires_grad_(False)
        sid = {id(p) for p in self.struct + fixed}
        self.content = [p for m in self.mods for p in m.parameters() if id(p) not in sid]
        cid = {id(p) for p in self.content}
        self.extra = [p for p in extra_params if id(p) not in cid and id(p) not in sid]
        self.lam = self._lambda(cost_ratio(self.mods))
        self.step_count, self.cooled, self.history = 0, False, []
        for p in self.struct:
            p.requires_grad_(s.learn_structure)
        if s.learn_structure:
            for m in self.mods:
                m.hard_forward = s.hard_forward
                m.frozen_structure = False
        else:  # low rank: the structure is fixed from the start, content trains
            self._freeze()
        self._set_sigma()

    def _lambda(self, start_ratio: float) -> LambdaController:
        """lambda's controller: its reference reaches the budget 3/4 of the way through the homotopy."""
        s = self.schedule
        reach = s.warm_end + int(0.75 * max(1, s.cool_start - s.warm_end))
        return LambdaController(s.budget, start_ratio, reach, s.lam_step / s.lr_struct)

    def reschedule(self, steps: int) -> None:
        """Spread the schedule over ``steps`` optimiser steps instead (before the first step only)."""
        if self.step_count:
            raise ValueError(f"the schedule cannot change after {self.step_count} steps")
        self.schedule = dataclasses.replace(self.schedule, steps=int(steps))
        self.lam = self._lambda(self.lam.start)
        self._set_sigma()

    # ------------------------------------------------------------------ what the optimiser gets
    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Optimiser parameter groups: the content (the layers' factors and biases, plus the extra
        parameters) at ``lr`` (default config.lr), and -- when the structure is learned -- widths and
        locations at config's lr_struct with beta1 = 0 and no weight decay (marked with the key
        ``gblrc_structure``, so :meth:`step` reads its current lr).  ``torch.optim.AdamW(ctrl.param_groups())``."""
        lr = self.config.lr if lr is None else float(lr)
        groups = [{"params": self.content + self.extra, "lr": lr, "weight_decay": float(weight_decay)}]
        if self.schedule.learn_structure:
            groups.append(
                {
                    "params": self.struct,
                    "lr": self.schedule.lr_struct,
                    "betas": (0.0, 0.999),
                    "weight_decay": 0.0,
                    STRUCTURE_GROUP: True,
                }
            )
        return groups

    def trainable(self) -> list:
        """Every parameter this controller's groups hold."""
        return [p for g in self.param_groups() for p in g["params"]]

    # ------------------------------------------------------------------ schedule
    @property
    def sigma(self) -> float:
        """The sigma of the next forward pass."""
        return self.schedule.sigma_max if self.cooled else self.schedule.sigma(self.step_count)

    def _set_sigma(self) -> None:
        s = self.sigma
        for m in self.mods:
            m.sigma.fill_(s)

    def _struct_lr(self, optimizer) -> float:
        """The structure's current learning rate: its group in ``optimizer``, else the configured one."""
        if optimizer is not None:
            sid = {id(p) for p in self.struct}
            for g in optimizer.param_groups:
                if g.get(STRUCTURE_GROUP) or any(id(p) in sid for p in g["params"]):
                    return float(g["lr"])
        return self.schedule.lr_struct

    @torch.no_grad()
    def step(self, optimizer=None, loss=None) -> dict:
        """After ``optimizer.step()``: lambda, the proximal step (with the structure group's current lr in
        ``optimizer``), the location wrap, sigma for the next step, and the cool-down when it is reached.
        Returns this step's record (step, loss -- when given, for the report's curve --, cost ratio,
        sigma, lambda)."""
        s = self.schedule
        sigma, lam = self.sigma, 0.0
        if s.learn_structure and not self.cooled:
            lam = self.lam.update(self.step_count, cost_ratio(self.mods))
            proximal_step(self.learned, lam * self._struct_lr(optimizer))
        self.step_count += 1
        if s.learn_structure and not self.cooled and self.step_count >= s.cool_start:
            self.cool(trim=True)
        self._set_sigma()
        rec = {
            "step": self.step_count,
            "loss": None if loss is None else float(loss),
            "cost": cost_ratio(self.mods),
            "sigma": float(sigma),
            "lambda": float(lam),
        }
        self.history.append(rec)
        return rec

    @property
    def done(self) -> bool:
        return self.step_count >= self.schedule.steps

    # ------------------------------------------------------------------ hardening
    def _freeze(self) -> None:
        for m in self.mods:
            m.frozen_structure = True  # boxcar masks in train mode too
        for p in self.struct:
            p.requires_grad_(False)
            p.grad = None
        self.cooled = True

    @torch.no_grad()
    def cool(self, trim: bool = True) -> None:
        """Harden the structure, fit it exactly to the budget (``trim``) and freeze it."""
        modes = [m.training for m in self.mods]
        for m in self.mods:
            m.eval()
        if trim and self.schedule.learn_structure:
            s = self.schedule
            fit_to_budget(self.mods, s.budget if s.fit_budget is None else s.fit_budget, self.unit)
        for m, was in zip(self.mods, modes):
            m.train(was)
        self._freeze()
        self._set_sigma()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What is not in the model's state dict: the step, lambda, the cool-down flag, the history."""
        return {
            "step": self.step_count,
            "cooled": self.cooled,
            "lambda": self.lam.state_dict(),
            "history": [dict(r) for r in self.history],
            "steps": self.schedule.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (after the model's own weights are restored)."""
        if int(state["steps"]) != self.schedule.steps:
            raise ValueError(
                f"the saved gblrc schedule is for {state['steps']} steps, this one for "
                f"{self.schedule.steps}; resume with the same number of steps"
            )
        self.step_count = int(state["step"])
        self.lam.load_state_dict(state["lambda"])
        self.history = [dict(r) for r in state["history"]]
        if state["cooled"] and not self.cooled:
            self._freeze()
        self._set_sigma()
