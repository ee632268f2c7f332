"""The inputs `gblrc.lower` is given: example inputs at the shapes asked for, checked to run, and
calibration batches for static int8 (:func:`calibration_feeds`).  Errors are one line (GblrcError);
those of a setting are :class:`gblrc.export.options.SettingError` (``input_shapes``, ``data``, ``calib_batches``).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from types import SimpleNamespace

import torch

from gblrc.errors import GblrcError
from gblrc.export.options import SettingError, at_least

__all__ = ["reshape_inputs", "check_runs", "calibration_feeds"]

CALIB_BATCHES = 8  # calibration batches taken from the data by default
_ROWS = 32  # rows per calibration batch cut from a tensor of inputs


def _fit(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` tiled/cropped to ``shape``: values stay valid (token ids, masks)."""
    reps = [-(-s // max(d, 1)) for s, d in zip(shape, t.shape)]
    return t.repeat(*reps)[tuple(slice(0, s) for s in shape)].clone()


def reshape_inputs(examples: "OrderedDict", shapes: "OrderedDict[str, tuple[int, ...]]") -> "OrderedDict":
    """Example inputs with the shapes asked for (tiled from the stored examples, or random floats)."""
    if not examples and not shapes:
        raise SettingError(
            "input_shapes", "the model has no example inputs; give them with {input_shapes} NAME=D0xD1,..."
        )
    out = OrderedDict(examples)
    for name, shape in shapes.items():
        if examples and name not in examples:
            raise SettingError(
                "input_shapes", f"names unknown input {name!r}; the model's inputs are: {', '.join(examples)}"
            )
        ex = examples.get(name)
        if ex is None:
            out[name] = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            continue
        if len(shape) != ex.dim():
            raise SettingError(
                "input_shapes",
                f"{name}: {len(shape)} dimensions given, the input has {ex.dim()} "
                f"(example shape {'x'.join(map(str, ex.shape)) or 'scalar'})",
            )
        if ex.numel() == 0:
            raise GblrcError(f"the stored example for input {name!r} is empty; it cannot be resized")
        out[name] = _fit(ex, shape)
    return out


def check_runs(model: torch.nn.Module, inputs: "OrderedDict", reshaped: bool = False) -> None:
    """GblrcError unless ``model`` runs on ``inputs`` (``reshaped``: at shapes the user asked for)."""
    from gblrc.export.graph import wrap_for_export

    try:
        with torch.no_grad():
            wrap_for_export(model, list(inputs))(*inputs.values())
    except Exception as e:
        what = "the input shapes given do not fit the model" if reshaped else "the model fails on its example inputs"
        raise GblrcError(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _batches(train):
    if isinstance(train, dict) and "inputs" in train:
        x = train["inputs"]
        rows = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
        return (
            {k: v[i : i + _ROWS] for k, v in x.items()} if isinstance(x, dict) else x[i : i + _ROWS]
            for i in range(0, rows, _ROWS)
        )
    return iter(train() if callable(train) else train)


def _feed(b, examples: "OrderedDict") -> dict:
    """One batch as an ONNX feed (input name -> array, in the example inputs' dtypes)."""
    names = list(examples)
    if isinstance(b, (tuple, list)) and len(b) == 2:
        b = b[0]
    if isinstance(b, torch.Tensor):
        b = {names[0]: b}
    if not isinstance(b, dict):
        raise SettingError("data", f"batches must be tensors or dicts of tensors, got {type(b).__name__}")
    missing = [k for k in names if k not in b]
    if missing:
        raise SettingError("data", f"batches lack the model input {missing[0]!r} (they have: {', '.join(map(str, b))})")
    feed = {}
    for k in names:
        t = b[k]
        if not isinstance(t, torch.Tensor):
            raise SettingError("data", f"input {k!r} is a {type(t).__name__}, not a tensor")
        ex = examples[k]
        if t.dim() != ex.dim() or (ex.dim() and t.shape[-1] != ex.shape[-1] and ex.is_floating_point()):
            raise SettingError(
                "data",
                f"input {k!r} has shape {'x'.join(map(str, t.shape))}; the model's example "
                f"has {'x'.join(map(str, ex.shape))}",
            )
        feed[k] = t.detach().cpu().to(ex.dtype).numpy()
    return feed


def calibration_feeds(
    data: str, model: torch.nn.Module, examples: "OrderedDict", calib_batches: int | None = None, *, trust: bool = False
) -> list[dict]:
    """Up to ``calib_batches`` (default 8) batches of ``data`` (a .pt file or module:function, as
    :func:`gblrc.io.datafiles.load_data` reads) as ONNX feeds: the ``calib_feeds`` of `lower()`."""
    from gblrc.io.datafiles import load_data

    at_least("calib_batches", calib_batches, 1)
    n = calib_batches if calib_batches is not None else CALIB_BATCHES
    loaded = load_data(
        data, SimpleNamespace(kind="module", tokenizer=None, model=model), trust=trust, batch_size=_ROWS, seed=0
    )
    feeds = [_feed(b, examples) for b in itertools.islice(_batches(loaded.train), n)]
    if not feeds:
        raise SettingError("data", f"{data!r} gave no batches")
    return feeds
