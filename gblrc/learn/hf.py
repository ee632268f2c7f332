"""The method inside ``transformers.Trainer``: :class:`GBLRCallback`.

::

    model, ctrl = gblrc.prepare(model, gblrc.CompressConfig(budget=0.4, steps=args.max_steps), data=calib)
    opt = torch.optim.AdamW(ctrl.param_groups(lr=args.learning_rate))
    cb = gblrc.GBLRCallback(ctrl)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None), callbacks=[cb]).train()
    report = cb.report                                  # finalized at the end of training
    gblrc.save(model, "model.gblr.pt", example_inputs=...)

- after every optimiser step (``on_step_end``) the controller's step: lambda, proximal widths,
  location wrap, sigma, the cool-down;
- ``on_save`` writes the controller's state into the Trainer's checkpoint folder
  (``gblrc_controller.pt``, by the main process); ``on_train_begin`` of a run resumed with
  ``resume_from_checkpoint`` reads it back from ``output_dir/checkpoint-<global step>``;
- ``on_train_end`` finalizes (hardens and trims the structure to the budget): ``callback.report``.

The schedule follows the Trainer's ``max_steps`` (a warning when the controller was prepared for another
number).  An optimiser that does not hold the structure's parameters, decays them, or trains them as
content (the Trainer's own optimiser) is warned about: the structure needs its own group
(``ctrl.param_groups()``).
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from gblrc.learn.controller import STRUCTURE_GROUP, Controller

__all__ = ["GBLRCallback", "STATE_FILE"]

STATE_FILE = "gblrc_controller.pt"


class GBLRCallback(TrainerCallback):
    """Runs ``controller`` (from ``gblrc.prepare``) inside a ``transformers.Trainer``."""

    def __init__(self, controller: Controller, *, finalize: bool = True):
        if not isinstance(controller, Controller):
            raise TypeError("GBLRCallback needs the controller that gblrc.prepare returned")
        self.controller, self.finalize, self.report = controller, finalize, None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ctrl = self.controller
        if state.max_steps and state.max_steps != ctrl.schedule.steps and ctrl.step_count == 0:
            warnings.warn(
                f"gblrc: the controller was prepared for {ctrl.schedule.steps} steps, the Trainer runs "
                f"{state.max_steps}; the sigma homotopy and cool-down follow the Trainer's",
                stacklevel=2,
            )
            ctrl.reschedule(state.max_steps)
        if state.global_step > 0 and ctrl.step_count != state.global_step:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.exists(path):
                raise ValueError(
                    f"resuming at step {state.global_step} but {path} is missing (gblrc's schedule "
                    f"state); resume from a checkpoint written with GBLRCallback"
                )
            ctrl.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if optimizer is not None and ctrl.schedule.learn_structure and not ctrl.cooled:
            _check_optimizer(optimizer, ctrl)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.controller.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.controller.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize and getattr(self.controller, "run", None) is not None:
            from gblrc.learn.compress import finalize

            self.report = finalize(self.controller)


def _check_optimizer(optimizer, ctrl: Controller) -> None:
    sid = {id(p) for p in ctrl.struct}
    groups = [g for g in optimizer.param_groups if any(id(p) in sid for p in g["params"])]
    fix = "build it from ctrl.param_groups() and pass optimizers=(optimizer, None) to the Trainer"
    if not groups:
        warnings.warn(
            f"gblrc: the optimizer does not hold the GBLR widths and locations, so the structure will not learn; {fix}",
            stacklevel=3,
        )
    elif any(g.get("weight_decay", 0.0) > 0 for g in groups):
        warnings.warn(
            f"gblrc: the optimizer decays the GBLR widths (weight_decay > 0), which shrinks every block; {fix}",
            stacklevel=3,
        )
    elif not all(g.get(STRUCTURE_GROUP) for g in groups):
        warnings.warn(
            f"gblrc: the optimizer trains the GBLR widths and locations as content (the content's lr and "
            f"betas, not the structure's own lr with beta1 = 0); {fix}",
            stacklevel=3,
        )
