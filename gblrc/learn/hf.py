"""The method inside ``transformers.Trainer``: :class:`GBLRCallback`.

::

    model, ctrl = gblrc.prepare(model, gblrc.CompressConfig(budget=0.4, steps=args.max_steps), data=calib)
    opt = torch.optim.AdamW(ctrl.param_groups(lr=args.learning_rate))
    cb = gblrc.GBLRCallback(ctrl)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None), callbacks=[cb]).train()
    report = cb.report                                  # finalized at the end of training
    gblrc.save(model, "model.gblr.pt", example_inputs=...)

- the controller's step (lambda, proximal widths, location wrap, sigma, the cool-down) in
  ``on_optimizer_step``: right after ``optimizer.step()``, before the scheduler's step and ``zero_grad``,
  so the proximal step uses the structure group's lr of the step just taken -- the order of the plain
  loop (``opt.step(); ctrl.step(opt); sched.step(); opt.zero_grad()``);
- the controller's state travels with the Trainer's checkpoints through transformers' stateful
  callbacks (:class:`transformers.trainer_callback.ExportableState`): every checkpoint's
  ``trainer_state.json`` holds it under ``stateful_callbacks["GBLRCallback"]``, and ``on_train_begin`` of
  a run resumed with ``resume_from_checkpoint`` reads it back from the state the Trainer loaded from
  the checkpoint it resumes from (wherever that folder is).  The callback restores itself, so it needs
  no ``restore_callback_states_from_checkpoint`` (which would replace it by a new instance built from
  JSON, without the controller: not supported);
- ``on_train_end`` finalizes (hardens and trims the structure to the budget): ``callback.report``.

The schedule follows the Trainer's ``max_steps`` (a warning when the controller was prepared for another
number).  An optimiser that does not hold the structure's parameters, decays them, or trains them as
content (the Trainer's own optimiser) is warned about: the structure needs its own group
(``ctrl.param_groups()``).  One GBLRCallback per Trainer.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from gblrc.learn.controller import STRUCTURE_GROUP, Controller

try:
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # transformers < 4.41
    raise ImportError("gblrc.GBLRCallback needs transformers >= 4.42 (stateful callbacks, on_optimizer_step)") from e
if not hasattr(TrainerCallback, "on_optimizer_step"):  # transformers < 4.42
    raise ImportError("gblrc.GBLRCallback needs transformers >= 4.42 (TrainerCallback.on_optimizer_step)")

__all__ = ["GBLRCallback"]

STATE_KEY = "gblrc_controller"  # the controller's state in the callback's exported "attributes"


class GBLRCallback(TrainerCallback, ExportableState):
    """Runs ``controller`` (from ``gblrc.prepare``) inside a ``transformers.Trainer``."""

    def __init__(self, controller: Controller, *, finalize: bool = True):
        if controller is None:
            raise TypeError(
                "GBLRCallback cannot be rebuilt from a checkpoint without its controller: train with "
                "restore_callback_states_from_checkpoint=False (the default); GBLRCallback(ctrl) restores "
                "the controller's state from the checkpoint it resumes from by itself"
            )
        if not isinstance(controller, Controller):
            raise TypeError("GBLRCallback needs the controller that gblrc.prepare returned")
        self.controller, self.finalize, self.report = controller, finalize, None

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        """What the Trainer writes into each checkpoint's ``trainer_state.json`` (plain JSON)."""
        return {
            "args": {"controller": None, "finalize": self.finalize},  # the controller cannot be rebuilt from JSON
            "attributes": {STATE_KEY: _jsonable(self.controller.state_dict())},
        }

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ctrl = self.controller
        if state.max_steps and state.max_steps != ctrl.schedule.steps and ctrl.step_count == 0:
            warnings.warn(
                f"gblrc: the controller was prepared for {ctrl.schedule.steps} steps, the Trainer runs "
                f"{state.max_steps}; the sigma homotopy and cool-down follow the Trainer's",
                stacklevel=2,
            )
            ctrl.reschedule(state.max_steps)
        if state.global_step > 0:  # resumed: state is what the Trainer read from that checkpoint's trainer_state.json
            saved = _saved_state(state)
            if saved is None:
                raise ValueError(
                    f"resuming at step {state.global_step} from a checkpoint without gblrc's schedule state "
                    f"(stateful_callbacks['{type(self).__name__}'] in its trainer_state.json); resume from a "
                    f"checkpoint written with GBLRCallback"
                )
            if int(saved["step"]) != state.global_step:
                raise ValueError(
                    f"the checkpoint's gblrc state is at step {saved['step']}, the Trainer resumes at step "
                    f"{state.global_step}; the callback must run from the first step"
                )
            if ctrl.cooled and not saved["cooled"]:
                raise ValueError(
                    "this controller's structure is already frozen, the checkpoint's is not; resume with the "
                    "fresh controller of a new gblrc.prepare"
                )
            ctrl.load_state_dict(saved)
        if optimizer is not None and ctrl.schedule.learn_structure and not ctrl.cooled:
            _check_optimizer(optimizer, ctrl)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # after optimizer.step(), before lr_scheduler.step() and zero_grad: the lr of the step just taken
        self.controller.step(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize and getattr(self.controller, "run", None) is not None:
            from gblrc.learn.compress import finalize

            self.report = finalize(self.controller)


def _saved_state(state) -> dict | None:
    """The controller's state in a TrainerState loaded from a checkpoint (None when it holds none)."""
    entry = (state.stateful_callbacks or {}).get(GBLRCallback.__name__)
    if isinstance(entry, list):
        if len(entry) != 1:
            raise ValueError(f"the checkpoint holds {len(entry)} GBLRCallback states; use one GBLRCallback per Trainer")
        entry = entry[0]
    if not isinstance(entry, dict):
        return None
    return (entry.get("attributes") or {}).get(STATE_KEY)


def _jsonable(x):
    """``x`` (a controller state: dicts, lists, numbers, None) as plain JSON types; floats round-trip exactly
    through ``json`` (non-finite ones as NaN / Infinity, which Python's json reads back)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return float(x)
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:  # 0-d tensor / numpy scalar
        return _jsonable(x.item())
    raise TypeError(f"gblrc: cannot store {type(x).__name__} in the Trainer's trainer_state.json")


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
