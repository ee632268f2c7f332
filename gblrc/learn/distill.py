"""Distillation from the dense model in your own loop: :class:`DistillationLoss`.

The loss gblrc's own loop trains with (:class:`gblrc.learn.objective.Objective`): the relative MSE between
the student's and the dense teacher's main outputs (logits or last_hidden_state, over real tokens), plus
``layer_weight`` x the mean relative MSE of every compressed layer's output against the same layer of
the teacher.  Keep a dense copy before ``gblrc.prepare``::

    teacher = copy.deepcopy(model)
    model, ctrl = gblrc.prepare(model, config)
    distill = gblrc.DistillationLoss(teacher, model)
    loss = distill(batch)                       # batch: a dict of keyword tensors, a Tensor, or (x, y)

In a ``transformers.Trainer``, override ``compute_loss``::

    def compute_loss(self, model, inputs, return_outputs=False, **kw):
        return distill(inputs, model=model)     # model: the Trainer's (possibly wrapped) student

Targets (``labels``) in a batch are ignored: the teacher's outputs are the targets.
"""

from __future__ import annotations

import torch
from torch import nn

from gblrc.learn.data import normalize_batch, to_device
from gblrc.learn.objective import Objective
from gblrc.nn.layer import GBLRLinear

__all__ = ["DistillationLoss"]


class DistillationLoss:
    """loss(batch, model=None) of ``student`` imitating ``teacher`` (its dense self, frozen here)."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, *, layer_weight: float = 1.0, hidden_weight: float = 0.0
    ):
        if teacher is student:
            raise ValueError(
                "the teacher must be a dense copy made before gblrc.prepare (copy.deepcopy(model)), "
                "not the student itself"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        teacher_names = {n for n, _ in teacher.named_modules()}
        names = [n for n, m in student.named_modules() if isinstance(m, GBLRLinear) and n in teacher_names]
        if not names:
            raise ValueError(
                "the student has no GBLR layer that the teacher also has; call gblrc.prepare on the student first"
            )
        self.objective = Objective(student, self.teacher, names, layer_weight, hidden_weight=hidden_weight)

    def __call__(self, batch, model: nn.Module | None = None) -> torch.Tensor:
        x, _ = normalize_batch(batch)
        dev = next(self.objective.student.parameters()).device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        self.objective.runner = model
        try:
            return self.objective(to_device(x, dev), None)
        finally:
            self.objective.runner = None

    def close(self) -> None:
        """Remove the layer hooks (the loss cannot be used after)."""
        self.objective.close()
