"""Training losses: the task loss (with targets) or distillation from the dense teacher.

Distillation = relative MSE between the student's and the teacher's main outputs (logits or
last_hidden_state), plus ``layer_weight`` x the mean relative MSE between each compressed layer's output
and the output of the same layer in the teacher (layer-wise targets keep the student's activations on
the teacher's track).  Relative MSE = sum (s - t)^2 / sum t^2 over the real tokens (attention_mask).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import call_model, model_output

__all__ = ["Objective", "task_loss"]


def _mask_for(x, t: torch.Tensor):
    if isinstance(x, dict):
        m = x.get("attention_mask")
        if torch.is_tensor(m) and m.dim() == 2 and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(m.shape):
            return m.to(t.dtype).unsqueeze(-1)
    return None


def rel_mse(s: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
    d = (s - t).float()
    t = t.float()
    if mask is not None:
        d, t = d * mask, t * mask
    return (d * d).sum() / (t * t).sum().clamp_min(1e-12)


def task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (class index per example or per token), MSE for float ones."""
    if not y.is_floating_point():
        if out.dim() < 2 or tuple(out.shape[:-1]) != tuple(y.shape):
            raise ValueError(f"integer targets of shape {tuple(y.shape)} do not fit outputs of shape "
                             f"{tuple(out.shape)}; give one class index per output row")
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1).long(), ignore_index=-100)
    if out.numel() != y.numel():
        raise ValueError(f"float targets of shape {tuple(y.shape)} do not fit outputs of shape {tuple(out.shape)}")
    return F.mse_loss(out.float(), y.reshape(out.shape).float())


class Objective:
    """loss(x, y): task loss when ``teacher`` is None, else distillation (targets ignored)."""

    def __init__(self, student, teacher=None, layer_names=(), layer_weight: float = 1.0):
        self.student, self.teacher, self.layer_weight = student, teacher, float(layer_weight)
        self._s, self._t, self._hooks = {}, {}, []
        if teacher is not None and self.layer_weight > 0:
            for name in layer_names:
                self._hooks.append(student.get_submodule(name).register_forward_hook(self._rec(self._s, name)))
                self._hooks.append(teacher.get_submodule(name).register_forward_hook(self._rec(self._t, name)))

    @staticmethod
    def _rec(store, name):
        def hook(_mod, _inp, out):
            store[name] = out
        return hook

    def __call__(self, x, y) -> torch.Tensor:
        if self.teacher is None:
            if y is None:
                raise ValueError("a batch has no targets; give targets for every batch or none at all")
            return task_loss(model_output(call_model(self.student, x)), y)
        with torch.no_grad():
            t = model_output(call_model(self.teacher, x))
        s = model_output(call_model(self.student, x))
        mask = _mask_for(x, t)
        loss = rel_mse(s, t, mask)
        if self._s:
            names = [n for n in self._s if n in self._t]
            layer = sum(rel_mse(self._s[n], self._t[n], _mask_for(x, self._t[n])) for n in names) / max(1, len(names))
            loss = loss + self.layer_weight * layer
            self._s.clear()
            self._t.clear()
        return loss

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
