"""The settings of the GBLR method as one object: :class:`CompressConfig` with the rarely used knobs
in a nested :class:`TrainingConfig`.

``gblrc.compress(model, CompressConfig(budget=0.4, steps=300), data=D)`` and
``gblrc.prepare(model, CompressConfig(budget=0.4, steps=N))`` take the same object.  The older keyword
form ``gblrc.compress(model, 0.4, steps=300, warmup=0.2)`` still works: :func:`from_kwargs` maps every
flat name onto its field (``warmup`` -> ``training.warmup``) and names the field of an unknown keyword.
Values are checked when the object is made (ValueError, one line).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from gblrc.errors import OptionError

__all__ = ["CompressConfig", "TrainingConfig", "from_kwargs", "as_config", "result_settings", "RESULT_NEUTRAL"]

STRUCTURES = ("gblr", "lowrank")
INITS = ("data", "sequential", "svd")
ALLOCATIONS = ("auto", "uniform", "sensitivity")
LOSSES = ("auto", "task", "distill")
UNITS = ("flops", "time")
DEVICES = ("auto", "cpu", "cuda")
# The CLI's device: it loads the model from a file onto the CPU, so the API's None (where the model is) would
# never use a GPU; the CLI trains where "auto" says instead.
CLI_DEVICE = "auto"
PRECISIONS = ("no", "bf16")
REFINE_TARGETS = ("dense", "local")
REFINE_STEPS = 256  # block refinement's steps per block when refine_steps is None (auto) and there is data
# The fields that cannot change a run's result (where it shows progress, where and how often it checkpoints,
# whether it resumes, which device of the same numerics it runs on); every other field is in result_settings().
RESULT_NEUTRAL = ("progress", "checkpoint_dir", "checkpoint_every", "resume", "device", "offload")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise OptionError(name, f"must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _fraction(name: str, value, *, low: float = 0.0, high: float = 1.0, open_low: bool = False) -> None:
    ok = (
        isinstance(value, (int, float))
        and math.isfinite(value)
        and value <= high
        and (value > low if open_low else value >= low)
    )
    if not ok:
        raise OptionError(name, f"must be a number in {'(' if open_low else '['}{low:g}, {high:g}]; got {value!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """The method's rarely changed knobs (defaults are the measured ones; docs/results.md).

    Schedule: ``warmup`` / ``cooldown`` are fractions of the steps (sigma = 1 during warm-up, then rises
    linearly to ``sigma_max``; the cool-down trains the content of the hardened, budget-fitted structure);
    ``lr_struct`` is the widths' and locations' learning rate (None: 5 x lr; AdamW with beta1 = 0, as the
    authors use), ``lr_min`` the content lr's cosine floor (x lr), ``lam_step`` the first width shrink
    per step when lambda switches on.  ``hard_forward``: forward with the boxcar (eval-mode) weights and
    Gaudi gradients for the structure.
    Initialisation: ``init_factor`` (GBLR starts at init_factor x budget plus one component per layer,
    when it trains), ``calib_batches`` (batches of data for the input covariances),
    ``sensitivity_batches`` and ``allocate_cap`` (no layer above allocate_cap x budget; None: dense).
    Objective (distillation): ``layer_loss``, ``hidden_loss`` (every block's hidden state), ``augment``
    (fraction of tokens replaced at random).  What else trains: ``tune_norms`` (normalisation layers),
    ``train_rest`` (every parameter outside the compressed layers).
    Checkpoints of compress's own loop: ``checkpoint_dir``, ``checkpoint_every``, ``resume``.
    Block-level refinement after the initialisation (:mod:`gblrc.learn.refine`; needs data and a data-aware
    init): ``refine_steps`` Adam steps per block (None: :data:`REFINE_STEPS` when there is data and a data-aware
    init, else off; 0: off), at ``refine_lr`` (cosine to 0), on ``refine_batches``
    batches of the data; ``refine_norms`` (the blocks' normalisation layers train too), ``refine_target``
    ("dense": the dense block's output on the dense inputs; "local": on the compressed model's inputs),
    ``refine_structure`` (GBLR widths and locations move too, with their own sigma schedule).
    Structure families: ``block_sparse`` (structure "gblr", a data-aware init, the sensitivity allocation and
    a FLOP budget; otherwise every layer is low rank / learned GBLR): FFN pairs may keep their best neurons
    and attention layers their best heads, one block-sparse block per layer (:mod:`gblrc.learn.neurons`),
    where the allocation finds that loses less at its cost than low rank; their structure stays fixed.
    """

    lr_struct: float | None = None
    lr_min: float = 0.1
    warmup: float = 0.1
    cooldown: float = 0.2
    sigma_max: float = 100.0
    hard_forward: bool = True
    lam_step: float = 2e-4
    init_factor: float = 1.0
    calib_batches: int = 16
    sensitivity_batches: int = 1
    allocate_cap: float | None = None
    layer_loss: float = 1.0
    hidden_loss: float = 0.0
    augment: float = 0.0
    tune_norms: bool = False
    train_rest: bool = False
    checkpoint_dir: object = None
    checkpoint_every: int = 50
    resume: bool = False
    refine_steps: int | None = None
    refine_lr: float = 1e-3
    refine_batches: int = 64
    refine_norms: bool = False
    refine_target: str = "dense"
    refine_structure: bool = False
    block_sparse: bool = True

    def refine_wanted(self) -> bool:
        """Refinement asked for (explicitly, or auto: then it runs when there is data and a data-aware init)."""
        return self.refine_steps is None or self.refine_steps > 0

    def __post_init__(self):
        _fraction("warmup", self.warmup)
        _fraction("cooldown", self.cooldown)
        if self.warmup + self.cooldown > 1.0:
            raise ValueError(
                f"warmup + cooldown must be at most 1 (fractions of the steps); got {self.warmup} + {self.cooldown}"
            )
        _fraction("lr_min", self.lr_min)
        _fraction("augment", self.augment, high=0.9)
        if self.lr_struct is not None:
            _fraction("lr_struct", self.lr_struct, high=math.inf, open_low=True)
        _fraction("sigma_max", self.sigma_max, low=1.0, high=math.inf)
        _fraction("init_factor", self.init_factor, high=math.inf, open_low=True)
        for name in ("lam_step", "layer_loss", "hidden_loss"):
            _fraction(name, getattr(self, name), high=math.inf)
        if self.allocate_cap is not None:
            _fraction("allocate_cap", self.allocate_cap, high=math.inf, open_low=True)
        for name in ("calib_batches", "sensitivity_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if int(self.checkpoint_every) < 0:
            raise OptionError("checkpoint_every", f"must be >= 0; got {self.checkpoint_every}")
        r = self.refine_steps
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 0):
            raise OptionError("refine_steps", f"must be a whole number >= 0 (0: off) or None (auto); got {r!r}")
        _fraction("refine_lr", self.refine_lr, high=math.inf, open_low=True)
        if not isinstance(self.refine_batches, int) or isinstance(self.refine_batches, bool) or self.refine_batches < 1:
            raise OptionError("refine_batches", f"must be a whole number >= 1; got {self.refine_batches!r}")
        _choice("refine_target", self.refine_target, REFINE_TARGETS)
        for name in ("refine_norms", "refine_structure", "block_sparse"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"must be True or False; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how (``gblrc.compress`` and ``gblrc.prepare``).

    ``budget``: the compressed layers' cost as a fraction of their dense cost (multiply-adds, or the
    compiler's time estimate with ``budget_unit="time"``), in (0, 1].
    ``steps``: optimiser steps (compress's own loop; for ``prepare``, the steps of your loop, which set
    the sigma homotopy and the cool-down).  ``batch_size``, ``lr``: compress's own loop.
    ``structure``: "gblr" (learned widths and locations) or "lowrank" (full widths, content only).
    ``init``: "sequential" (data-aware SVD then a refit in call order), "data" or "svd" (no data needed).
    ``allocate``: "auto", "sensitivity" or "uniform" split of the budget across layers.
    ``loss``: "auto" (task loss with targets, else distillation), "task" or "distill".
    ``rank_per_component``, ``tile``: coarser structures that lower to fewer, larger blocks.
    ``include`` / ``exclude``: regular expressions on layer names.
    ``device``: None (where the model is), "auto" (CUDA when available), "cpu" or "cuda".
    ``mixed_precision``: "no" or "bf16" (the matrix products in bfloat16 under autocast; masks, widths,
    locations, the proximal step, optimiser state and losses stay fp32).
    ``offload``: post-training (``steps=0``) of a model that does not fit the device: the model and the
    cached activations stay on the CPU and only the block being measured, initialised or refined is on
    the device (:class:`gblrc.learn.blocks.Placement`).
    """

    budget: float
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    structure: str = "gblr"
    init: str = "sequential"
    allocate: str = "auto"
    budget_unit: str = "flops"
    loss: str = "auto"
    rank_per_component: int = 1
    tile: int = 1
    include: str | None = None
    exclude: str | None = None
    seed: int = 0
    device: str | None = None
    mixed_precision: str = "no"
    offload: bool = False
    progress: bool = True
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self):
        from gblrc.nn.fit import check_budget

        object.__setattr__(self, "budget", check_budget(self.budget))
        _choice("structure", self.structure, STRUCTURES)
        _choice("init", self.init, INITS)
        _choice("allocate", self.allocate, ALLOCATIONS)
        _choice("loss", self.loss, LOSSES)
        _choice("budget_unit", self.budget_unit, UNITS)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        if self.device is not None:
            _choice("device", self.device, DEVICES)
        if int(self.steps) < 0 or int(self.batch_size) < 1 or int(self.rank_per_component) < 1 or int(self.tile) < 1:
            raise ValueError("steps must be >= 0, batch_size, rank_per_component and tile >= 1")
        _fraction("lr", self.lr, high=math.inf, open_low=True)
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise OptionError(name, f"{pattern!r} is not a valid regular expression: {e}") from None
        if self.offload and int(self.steps) > 0:
            raise OptionError(
                "offload",
                f"is for post-training compression (steps=0); training {self.steps} steps needs the whole model "
                "on the device (use steps=0, or no offload)",
            )
        if not isinstance(self.training, TrainingConfig):
            raise ValueError(f"training must be a gblrc.TrainingConfig, got {type(self.training).__name__}")
        if self.training.refine_structure and self.structure != "gblr":
            raise OptionError(
                "refine_structure",
                f"moves GBLR widths and locations; structure {self.structure!r} has none to move "
                "(use structure='gblr', or refine_structure=False)",
            )

    @property
    def lr_struct(self) -> float:
        """The structure's learning rate (TrainingConfig.lr_struct, or 5 x lr)."""
        return self.training.lr_struct if self.training.lr_struct is not None else 5 * self.lr

    def replace(self, **kw) -> "CompressConfig":
        """A copy with fields changed, by flat name (``warmup=`` reaches ``training.warmup``)."""
        return from_kwargs(base=self, **kw)


_TOP = {f.name for f in dataclasses.fields(CompressConfig)} - {"training"}
_NESTED = {f.name for f in dataclasses.fields(TrainingConfig)}


def from_kwargs(budget=None, *, base: CompressConfig | None = None, **kw) -> CompressConfig:
    """A CompressConfig from flat keyword names (the keyword form of ``gblrc.compress``)."""
    top, nested = {}, {}
    for k, v in kw.items():
        if k in _TOP:
            top[k] = v
        elif k in _NESTED:
            nested[k] = v
        elif k == "training":
            raise TypeError("give training= as part of a CompressConfig, or its fields as keywords")
        else:
            raise TypeError(
                f"unknown compress option {k!r}: CompressConfig has {', '.join(sorted(_TOP))} and "
                f"training.{{{', '.join(sorted(_NESTED))}}}"
            )
    if budget is not None:
        top["budget"] = budget
    if base is None:
        if "budget" not in top:
            raise TypeError("a budget is needed: CompressConfig(budget=0.4) or compress(model, 0.4)")
        return CompressConfig(**top, training=TrainingConfig(**nested))
    training = dataclasses.replace(base.training, **nested) if nested else base.training
    return dataclasses.replace(base, **top, training=training)


def as_config(config, kw: dict) -> CompressConfig:
    """``config`` (a CompressConfig, or a budget number) with the keyword options ``kw`` applied."""
    if isinstance(config, CompressConfig):
        return config.replace(**kw) if kw else config
    if isinstance(config, TrainingConfig):
        raise TypeError("give a CompressConfig (with training=TrainingConfig(...)), not a TrainingConfig")
    if config is None:  # compress(model, budget=0.4, ...): the budget among the keywords
        return from_kwargs(**kw)
    if "budget" in kw:
        raise TypeError("the budget is given twice: as the second argument and as budget=")
    return from_kwargs(config, **kw)


def result_settings(config: CompressConfig) -> dict:
    """Every field of ``config`` that can change the result, flat (``training``'s fields beside the top
    level ones), minus :data:`RESULT_NEUTRAL`: the checkpoint signature and the report's settings."""
    flat = dataclasses.asdict(config)
    flat.update(flat.pop("training"))
    return {k: v for k, v in flat.items() if k not in RESULT_NEUTRAL}
