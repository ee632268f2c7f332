"""Normalising in-memory training data into a deterministic stream of (inputs, targets) batches.

Accepted forms (``gblrc.compress(data=...)``):

* a Tensor of inputs (N, ...): shuffled each epoch, ``batch_size`` rows per batch;
* a dict ``{"inputs": Tensor | dict[str, Tensor], "targets": Tensor (optional)}``: the same;
* an iterable of batches, or a callable returning one (called again for every pass); each batch is a
  Tensor (inputs), a dict of keyword tensors (HF models: input_ids, attention_mask, ...; a ``labels``
  entry becomes the targets; a dict with an ``inputs`` key is read as above), or a tuple
  ``(inputs, targets)``.

The batch of step ``s`` depends only on ``(data, batch_size, seed, s)``, so a resumed run sees the same
batches as an uninterrupted one.  Under data parallelism each rank takes its share of every batch
(rows ``rank::world``).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch

from gblrc.io.datafiles import call_model  # re-exported: the stages call models through it

__all__ = [
    "Batch",
    "Replay",
    "replayable",
    "batch_stream",
    "split_batch",
    "to_device",
    "batch_rows",
    "call_model",
    "model_output",
    "check_finite",
]

Batch = tuple[Any, Any]  # (inputs: Tensor | dict[str, Tensor], targets: Tensor | None)


def _rows(x, idx):
    if isinstance(x, dict):
        return {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in x.items()}
    return x[idx]


def batch_rows(x) -> int:
    """Number of rows (examples) of a batch's inputs."""
    if isinstance(x, dict):
        for v in x.values():
            if torch.is_tensor(v) and v.dim() > 0:
                return int(v.shape[0])
        raise ValueError("a batch dict holds no tensor inputs")
    return int(x.shape[0])


def normalize_batch(b) -> Batch:
    """One batch in any accepted form -> (inputs, targets or None)."""
    if torch.is_tensor(b):
        return b, None
    if isinstance(b, dict):
        if "inputs" in b:
            return b["inputs"], b.get("targets")
        b = dict(b)
        y = b.pop("labels", None)
        return b, y
    if isinstance(b, (tuple, list)):
        if len(b) == 1:
            return normalize_batch(b[0])
        if len(b) == 2:
            x, y = b
            if isinstance(x, dict) and "inputs" in x:
                x = x["inputs"]
            return x, y
    raise ValueError(
        f"a data batch must be a Tensor, a dict of tensors or an (inputs, targets) tuple, got {type(b).__name__}"
    )


def split_batch(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's rows of a batch (rows rank::world); the batch itself when world == 1."""
    if world <= 1:
        return batch
    x, y = batch
    idx = torch.arange(rank, batch_rows(x), world)
    return _rows(x, idx), (None if y is None else y[idx])


def check_finite(x, what: str = "the data") -> None:
    """ValueError (one line) when a floating-point tensor in ``x`` (a Tensor, a dict or tuple of them)
    holds NaN or Inf: such values reach the calibration's Cholesky factorisation or the loss."""
    if torch.is_tensor(x):
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{what} holds NaN or Inf values; remove or replace them before compressing")
    elif isinstance(x, dict):
        for k, v in x.items():
            check_finite(v, f"{what} ({k!r})")
    elif isinstance(x, (tuple, list)):
        for v in x:
            check_finite(v, what)


def to_device(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def _tensor_stream(inputs, targets, batch_size: int, seed: int, start: int) -> Iterator[Batch]:
    n = batch_rows(inputs)
    if n == 0:
        raise ValueError("the data holds no examples")
    if targets is not None and int(targets.shape[0]) != n:
        raise ValueError(f"the data has {n} inputs but {int(targets.shape[0])} targets; give one target per input")
    bs = max(1, min(int(batch_size), n))
    per_epoch = (n + bs - 1) // bs
    epoch, perm = None, None
    for s in itertools.count(start):
        e, j = divmod(s, per_epoch)
        if e != epoch:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + e)
            perm, epoch = torch.randperm(n, generator=g), e
        idx = perm[j * bs : (j + 1) * bs]
        yield _rows(inputs, idx), (None if targets is None else targets[idx])


def _iter_stream(data, start: int) -> Iterator[Batch]:
    is_fn = callable(data) and not hasattr(data, "__iter__")
    obj = data() if is_fn else data
    # a one-shot iterator (generator) cannot be restarted: remember its batches and cycle over them
    cache = [] if (not is_fn and iter(obj) is obj) else None
    it, produced = iter(obj), 0
    while True:
        got = False
        for b in it:
            got = True
            if cache is not None:
                cache.append(b)
            if produced >= start:
                yield normalize_batch(b)
            produced += 1
        if not got:
            raise ValueError("the data iterable yielded no batches")
        it = iter(cache) if cache is not None else iter(data() if is_fn else data)


class Replay:
    """A re-iterable view of a one-shot iterator: items seen so far are cached and replayed."""

    def __init__(self, it):
        self._it, self._cache, self._done = iter(it), [], False

    def __iter__(self):
        i = 0
        while True:
            if i < len(self._cache):
                yield self._cache[i]
            elif self._done:
                return
            else:
                try:
                    self._cache.append(next(self._it))
                except StopIteration:
                    self._done = True
                    return
                yield self._cache[i]
            i += 1


def replayable(data):
    """``data`` itself, or a :class:`Replay` of it when it is a one-shot iterator (a generator)."""
    if (
        not callable(data)
        and not torch.is_tensor(data)
        and not isinstance(data, dict)
        and hasattr(data, "__iter__")
        and iter(data) is data
    ):
        return Replay(data)
    return data


def batch_stream(data, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
    """Infinite stream of (inputs, targets) batches from step ``start`` on (see module doc)."""
    if torch.is_tensor(data):
        return _tensor_stream(data, None, batch_size, seed, start)
    if isinstance(data, dict) and "inputs" in data:
        x, y = data["inputs"], data.get("targets")
        if not (torch.is_tensor(x) or isinstance(x, dict)):
            raise ValueError("data['inputs'] must be a Tensor or a dict of tensors")
        return _tensor_stream(x, y, batch_size, seed, start)
    if isinstance(data, dict):  # a dict of keyword tensors (whole data set, e.g. tokenised text)
        y = data.get("labels")
        x = {k: v for k, v in data.items() if k != "labels"}
        return _tensor_stream(x, y, batch_size, seed, start)
    if callable(data) or hasattr(data, "__iter__"):
        return _iter_stream(data, start)
    raise ValueError(
        f"unsupported data of type {type(data).__name__}: give a Tensor, a dict with 'inputs' "
        f"(and 'targets'), or an iterable of batches"
    )


def model_output(out) -> torch.Tensor:
    """The main output tensor: logits / last_hidden_state of HF outputs, the first item of tuples."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None) if not isinstance(out, dict) else out.get(key)
        if torch.is_tensor(v):
            return v
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise ValueError(f"cannot find the output tensor in the model's output ({type(out).__name__})")


_FINGERPRINT_BATCHES = 16  # the batches of an iterable that its fingerprint reads


def _hash_into(h, v) -> None:
    if torch.is_tensor(v):
        t = v.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(repr(k).encode())
            _hash_into(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(f"{type(v).__name__}{len(v)}".encode())
        for item in v:
            _hash_into(h, item)
    else:
        h.update(repr(v).encode())


def fingerprint(data) -> str:
    """A sha256 of the training data (part of the checkpoint signature: resuming on other data is refused).
    In-memory tensors and dicts: all of them; an object with a ``fingerprint()`` method: its own; any other
    iterable: its first 16 batches (a :class:`Replay` replays them, so nothing is consumed)."""
    import hashlib

    h = hashlib.sha256()
    if hasattr(data, "fingerprint"):
        h.update(str(data.fingerprint()).encode())
    elif torch.is_tensor(data) or isinstance(data, dict):
        _hash_into(h, data)
    elif callable(data) and not hasattr(data, "__iter__"):
        h.update(getattr(data, "__qualname__", repr(data)).encode())
    else:
        for i, b in enumerate(data):
            if i >= _FINGERPRINT_BATCHES:
                break
            _hash_into(h, b)
    return h.hexdigest()
