"""Before/after measurements that `gblrc compress` records: accuracy and agreement with the dense model."""
from __future__ import annotations

from gblrc.io.datafiles import call_model

__all__ = ["outputs", "accuracy", "agreement"]


def _main_output(y):
    """The tensor a model returns, or the first tensor of a tuple / Hugging Face ModelOutput."""
    import torch

    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)) and y and isinstance(y[0], torch.Tensor):
        return y[0]
    return None


def outputs(model, x, *, limit: int = 512, chunk: int = 128):
    """The model's main output on the first ``limit`` examples of ``x`` (Tensor or dict), float32, or None."""
    import torch

    def head(a, i, j):
        return {k: v[i:j] for k, v in a.items()} if isinstance(a, dict) else a[i:j]

    n = (next(iter(x.values())) if isinstance(x, dict) else x).shape[0]
    parts = []
    with torch.no_grad():
        for i in range(0, min(n, limit), chunk):
            y = _main_output(call_model(model, head(x, i, min(i + chunk, limit))))
            if y is None:
                return None
            parts.append(y.float())
    return torch.cat(parts) if parts else None


def accuracy(logits, targets) -> float | None:
    """Top-1 accuracy for (N, C) logits and N integer labels; None when that is not the task."""
    import torch

    if logits is None or targets is None or logits.dim() != 2 or targets.dim() != 1:
        return None
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return None
    t = targets[: logits.shape[0]]
    return float((logits.argmax(dim=1) == t).float().mean())


def agreement(dense, comp) -> dict | None:
    """Mean per-example cosine and relative Frobenius error of compressed vs dense outputs."""
    import torch

    if dense is None or comp is None or dense.shape != comp.shape:
        return None
    a, b = dense.reshape(dense.shape[0], -1), comp.reshape(comp.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
    rel = (a - b).norm() / a.norm().clamp_min(1e-30)
    return {"cosine": float(cos), "relative_error": float(rel), "examples": int(a.shape[0])}
