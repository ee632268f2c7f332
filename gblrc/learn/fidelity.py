"""Fidelity of a compressed model to its dense self on an evaluation set.

The figure users care about is how close the compressed model stays to the dense one on *their*
inputs, which are never the calibration set.  :class:`Fidelity` computes the dense model's outputs on
an evaluation set once and then scores any model against them:

* ``cosine``: mean per-example cosine between the compressed and the dense outputs; for sequence
  outputs with an ``attention_mask`` (Hugging Face text models) the outputs are first mean-pooled over
  the real tokens (the sentence embedding), otherwise each example's output is flattened;
* ``cosine_min``: the worst example's cosine;
* ``relative_error``: ||y - y_dense|| / ||y_dense|| over the set;
* ``accuracy`` (with integer class targets): top-1 accuracy, the task metric, beside the dense one.
"""

from __future__ import annotations

import torch

from gblrc.learn.data import _rows, batch_rows, call_model, model_output, normalize_batch, to_device

__all__ = ["Fidelity", "eval_batches", "split_holdout"]


def eval_batches(data, limit: int = 512, chunk: int = 64) -> list[tuple]:
    """At most ``limit`` examples of ``data`` as [(inputs, targets or None)], in order, read once.

    ``data``: a Tensor of inputs, {"inputs", "targets"}, or an iterable of batches (as ``compress``'s
    ``data``: Tensors, dicts of keyword tensors, or (inputs, targets) tuples).
    """
    out, seen = [], 0
    if torch.is_tensor(data) or (isinstance(data, dict) and "inputs" in data):
        x, y = (data, None) if torch.is_tensor(data) else (data["inputs"], data.get("targets"))
        for i in range(0, min(batch_rows(x), limit), chunk):
            j = min(i + chunk, limit)
            out.append((_rows(x, slice(i, j)), None if y is None else y[i:j]))
        return out
    it = data() if callable(data) and not hasattr(data, "__iter__") else data
    for b in it:
        x, y = normalize_batch(b)
        take = min(batch_rows(x), limit - seen)
        out.append((_rows(x, slice(0, take)), None if y is None else y[:take]))
        seen += take
        if seen >= limit:
            break
    if not out:
        raise ValueError("the evaluation data holds no examples")
    return out


def split_holdout(batches: list, fraction: float = 0.15, minimum: int = 1) -> tuple[list, list]:
    """(training batches, held-out batches): the last ``fraction`` of a list of batches held out."""
    if len(batches) < 2:
        raise ValueError("too little data to hold some out for judging fidelity; give --eval-data or more data")
    k = min(len(batches) - 1, max(minimum, int(round(len(batches) * fraction))))
    return batches[:-k], batches[-k:]


def _pooled(out: torch.Tensor, x) -> torch.Tensor:
    """Per-example vectors: mean over real tokens for (N, T, H) outputs with an attention mask."""
    out = out.float()
    m = x.get("attention_mask") if isinstance(x, dict) else None
    if torch.is_tensor(m) and m.dim() == 2 and out.dim() == 3 and tuple(out.shape[:2]) == tuple(m.shape):
        w = m.to(out.dtype).unsqueeze(-1)
        return (out * w).sum(1) / w.sum(1).clamp_min(1.0)
    return out.reshape(out.shape[0], -1)


class Fidelity:
    """Scores models against the dense model's outputs on a fixed evaluation set."""

    def __init__(self, dense_model, batches: list[tuple]):
        self.batches = batches
        self.ref = self._outputs(dense_model)
        ys = [y for _, y in batches]
        self.targets = torch.cat(ys) if ys and all(y is not None for y in ys) else None
        self.dense = self._score(self.ref, self.ref)

    @property
    def examples(self) -> int:
        return int(self.ref.shape[0])

    @torch.no_grad()
    def _outputs(self, model) -> torch.Tensor:
        was = model.training
        model.eval()
        try:
            p = next(model.parameters(), None)
            dev = p.device if p is not None else torch.device("cpu")  # judged where the model is; scored on the CPU
            outs = [
                _pooled(model_output(call_model(model, to_device(x, dev))).float().cpu(), x) for x, _ in self.batches
            ]
        finally:
            model.train(was)
        return torch.cat(outs)

    def _score(self, out, ref) -> dict:
        cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
        res = {
            "cosine": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "relative_error": float((out - ref).norm() / ref.norm().clamp_min(1e-30)),
            "examples": int(out.shape[0]),
        }
        t = self.targets
        if t is not None and not t.is_floating_point() and t.dim() == 1 and out.dim() == 2 and len(t) == len(out):
            res["accuracy"] = float((out.argmax(1) == t).float().mean())
        return res

    def __call__(self, model) -> dict:
        return self._score(self._outputs(model), self.ref)


def probe_judge(model, probe, targets=None, limit: int = 512):
    """A :class:`Fidelity` of ``model`` on the first ``limit`` examples of ``probe`` (inputs; with
    ``targets`` when they match it), or None when there is no probe or the model's output tensor cannot
    be found (the CLI's agreement_with_dense)."""
    if probe is None:
        return None
    data = {"inputs": probe}
    if targets is not None and len(targets) == batch_rows(probe):
        data["targets"] = targets
    try:
        return Fidelity(model, eval_batches(data, limit=limit))
    except ValueError:
        return None
