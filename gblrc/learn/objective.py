"""Training losses: the task loss (with targets) or distillation from the dense teacher.

Distillation = relative MSE between the student's and the teacher's main outputs (logits or
last_hidden_state), plus ``layer_weight`` x the mean relative MSE between each compressed layer's output
and the output of the same layer in the teacher (layer-wise targets keep the student's activations on
the teacher's track).  Relative MSE = sum (s - t)^2 / sum t^2 over the real tokens (attention_mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gblrc.learn.data import call_model, model_output
from gblrc.io.datafiles import forward_order

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
            raise ValueError(
                f"integer targets of shape {tuple(y.shape)} do not fit outputs of shape "
                f"{tuple(out.shape)}; give one class index per output row"
            )
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1).long(), ignore_index=-100)
    if out.numel() != y.numel():
        raise ValueError(f"float targets of shape {tuple(y.shape)} do not fit outputs of shape {tuple(out.shape)}")
    return F.mse_loss(out.float(), y.reshape(out.shape).float())


def _vocab_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if isinstance(v, int) and v > 1:
        return v
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else None


def augment_tokens(x, fraction: float, vocab: int, generator: torch.Generator):
    """``x`` with ``fraction`` of its real tokens (not the first and last of each sequence) replaced by
    random vocabulary ids: new inputs the teacher labels, so the student sees more than the data."""
    ids, mask = x["input_ids"], x.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    inner = real.clone()
    lengths = real.sum(1)
    rows = torch.arange(ids.shape[0])
    inner[:, 0] = False
    inner[rows, (lengths - 1).clamp_min(0)] = False
    pick = inner & (torch.rand(ids.shape, generator=generator) < fraction)
    rand = torch.randint(min(1000, vocab // 2), vocab, ids.shape, generator=generator).to(ids.dtype)
    return dict(x, input_ids=torch.where(pick.to(ids.device), rand.to(ids.device), ids))


class Objective:
    """loss(x, y): task loss when ``teacher`` is None, else distillation (targets ignored).

    Distillation options: ``hidden_weight`` x the mean relative MSE of every hidden state (Hugging Face
    models that take ``output_hidden_states``: each block's output, not only the last);
    ``augment``: the fraction of tokens replaced by random ones in each batch's ``input_ids`` (a
    different draw at every step, seeded), so that the student imitates the teacher beyond the data.
    """

    def __init__(
        self,
        student,
        teacher=None,
        layer_names=(),
        layer_weight: float = 1.0,
        *,
        hidden_weight: float = 0.0,
        augment: float = 0.0,
        seed: int = 0,
    ):
        self.student, self.teacher, self.layer_weight = student, teacher, float(layer_weight)
        self.runner = None  # what the student's forward goes through (a DistributedDataParallel wrapper); None: itself
        self.hidden_weight, self.augment = float(hidden_weight), float(augment)
        self._gen = torch.Generator().manual_seed(int(seed) + 7919)
        self._vocab = _vocab_size(student) if self.augment > 0 else None
        self._hidden_ok = self.hidden_weight > 0 and (
            "output_hidden_states" in forward_order(student)
            or hasattr(getattr(student, "config", None), "output_hidden_states")
        )
        self._s, self._t, self._hooks = {}, {}, []
        if teacher is not None and self.layer_weight > 0:
            for name in layer_names:
                self._hooks.append(student.get_submodule(name).register_forward_hook(self._rec(self._s, name)))
                self._hooks.append(teacher.get_submodule(name).register_forward_hook(self._rec(self._t, name)))

    def inapplicable(self, x) -> list[str]:
        """Why options asked for cannot apply to this model and data (warnings; empty when all apply)."""
        out = []
        if self.teacher is None and (self.hidden_weight > 0 or self.augment > 0):
            out.append(
                "hidden-state loss and token augmentation apply to distillation only (the data has targets): ignored"
            )
            return out
        if self.hidden_weight > 0 and not (self._hidden_ok and isinstance(x, dict)):
            out.append(
                "the hidden-state loss needs a Hugging Face model called with keyword inputs "
                "(output_hidden_states): ignored"
            )
        if self.augment > 0 and not (isinstance(x, dict) and "input_ids" in x and self._vocab):
            out.append("token augmentation needs token ids (input_ids) and a model with a vocabulary: ignored")
        return out

    @staticmethod
    def _rec(store, name):
        def hook(_mod, _inp, out):
            store[name] = out

        return hook

    def __call__(self, x, y) -> torch.Tensor:
        if self.teacher is None:
            if y is None:
                raise ValueError("a batch has no targets; give targets for every batch or none at all")
            return task_loss(model_output(call_model(self.runner or self.student, x)), y)
        if self.augment > 0 and isinstance(x, dict) and "input_ids" in x and self._vocab:
            x = augment_tokens(x, self.augment, self._vocab, self._gen)
        hidden = self._hidden_ok and isinstance(x, dict)
        kw = dict(x, output_hidden_states=True) if hidden else x
        with torch.no_grad():
            tout = call_model(self.teacher, kw)
        sout = call_model(self.runner or self.student, kw)
        t, s = model_output(tout), model_output(sout)
        mask = _mask_for(x, t)
        loss = rel_mse(s, t, mask)
        hs, ht = getattr(sout, "hidden_states", None), getattr(tout, "hidden_states", None)
        if hidden and hs is not None and ht is not None and len(hs) > 1:
            # states 1..L (0 is the embedding output, identical in both)
            loss = loss + self.hidden_weight * sum(rel_mse(a, b, mask) for a, b in zip(hs[1:], ht[1:])) / (len(hs) - 1)
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
