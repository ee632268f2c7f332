"""Which linear layers of a model to compress, and replacing them in place with GBLR layers.

Linear layers are ``nn.Linear`` and the HF GPT-2 ``transformers.pytorch_utils.Conv1D`` (a Linear
whose weight is stored transposed, in x out).  ``nn.Conv2d`` layers with ``groups == 1`` and zero
padding are compressible too, as their kernel matrix ``weight.reshape(out, in*kh*kw)``; they become
:class:`gblrc.nn.conv.GBLRConv2d` layers.

Default selection rule (``find_linears`` without ``include``): a linear layer is compressed unless

* it is small: ``min(in_features, out_features) < min_features`` (default 16; for a convolution
  ``min(out_channels, in_channels*kh*kw)``, so e.g. a first 3x3 convolution on 1 channel stays dense), or
* it is an output head: one of the dotted parts of its qualified name is a head name
  (``lm_head``, ``classifier``, ``head``, ``heads``, ``score``, ``qa_outputs``, ``cls``,
  ``pooler``, ``output_head``), or — for models that are not HF ``PreTrainedModel`` s
  (plain ``nn.Sequential`` s and hand-written modules) — it is the last linear layer registered
  in the model, which for such models is the layer that produces the output (convolutions never
  count as that last layer).

``include`` / ``exclude`` are regular expressions searched (``re.search``) in the qualified module
name.  ``include`` replaces the default rule (any matching linear layer is selected, whatever its
size or name); ``exclude`` then removes matches.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from gblrc.nn.conv import GBLRConv2d, conv_as_linear, conv_geometry, unsupported_conv
from gblrc.nn.layer import GBLRLinear

__all__ = [
    "HEAD_NAMES",
    "is_linear",
    "is_conv2d",
    "is_compressible",
    "as_linear",
    "find_linears",
    "replace_linears",
    "set_module",
    "get_module",
]

HEAD_NAMES = frozenset(
    {"lm_head", "classifier", "head", "heads", "score", "qa_outputs", "cls", "pooler", "output_head"}
)


def _is_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(m, "nf")


def is_linear(m: nn.Module) -> bool:
    """True for nn.Linear and HF GPT-2 Conv1D (never for GBLRLinear)."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def is_conv2d(m: nn.Module) -> bool:
    """True for an nn.Conv2d that can become a GBLRConv2d (groups == 1, zero padding)."""
    return isinstance(m, nn.Conv2d) and unsupported_conv(m) is None


def is_compressible(m: nn.Module) -> bool:
    """A linear layer (:func:`is_linear`) or a supported convolution (:func:`is_conv2d`)."""
    return is_linear(m) or is_conv2d(m)


def _shape(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer (of a convolution's kernel matrix)."""
    if isinstance(m, nn.Conv2d):
        return int(m.weight[0].numel()), int(m.out_channels)
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    n_in, n_out = m.weight.shape  # Conv1D: weight is (in, out)
    return int(n_in), int(n_out)


def as_linear(m: nn.Module) -> nn.Linear:
    """``m`` as an nn.Linear with the same function (Conv1D is transposed; nn.Linear is returned as is).

    For an nn.Conv2d: the Linear whose weight is the kernel matrix (applied to each receptive field)."""
    if isinstance(m, nn.Linear):
        return m
    if isinstance(m, nn.Conv2d):
        return conv_as_linear(m)
    if not _is_conv1d(m):
        raise TypeError(f"not a linear layer: {type(m).__name__}")
    n_in, n_out = _shape(m)
    lin = nn.Linear(n_in, n_out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(m.weight.t())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the dotted ``name`` (works for Sequential/ModuleList indices)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = get_module(root, parent_name)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def find_linears(
    model: nn.Module, include: str | None = None, exclude: str | None = None, min_features: int = 16
) -> list[tuple[str, nn.Module]]:
    """[(qualified name, module)] of the linear layers to compress, in registration order (rule above)."""
    try:
        inc = re.compile(include) if include else None
        exc = re.compile(exclude) if exclude else None
    except re.error as e:
        raise ValueError(f"invalid --include/--exclude regular expression: {e}") from None
    # modules inside GBLR layers are never candidates; GBLRLinear has no linear children anyway
    all_lin = [(n, m) for n, m in model.named_modules() if n and is_compressible(m)]
    linears = [n for n, m in all_lin if is_linear(m)]
    last = linears[-1] if linears and not _is_hf(model) else None
    out = []
    for name, m in all_lin:
        if inc is not None:
            keep = inc.search(name) is not None
        else:
            n_in, n_out = _shape(m)
            head = any(p in HEAD_NAMES for p in name.split(".")) or name == last
            keep = min(n_in, n_out) >= min_features and not head
        if keep and exc is not None and exc.search(name):
            keep = False
        if keep:
            out.append((name, m))
    return out


def replace_linears(
    model: nn.Module, names_or_pairs, budget: float, *, fit=None, **fit_kwargs
) -> dict[str, GBLRLinear]:
    """Replace the named linear layers of ``model`` in place by GBLR layers fitted at ``budget``.

    ``names_or_pairs``: qualified names, or (name, module) pairs as returned by :func:`find_linears`;
    ``budget``: one cost ratio for all, or {name: ratio}.
    Each layer is initialised with :func:`gblrc.nn.layer.fit_dense` (Conv1D converted to Linear first; a
    Conv2d's kernel matrix as a Linear, the result becoming a :class:`GBLRConv2d`); ``fit_kwargs`` go to
    it; ``fit`` replaces it (e.g. ``gblrc.nn.layer.svd_layer``).  Returns {name: new GBLRLinear}.
    """
    from gblrc.nn.layer import fit_dense

    fit = fit or fit_dense
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in names_or_pairs]
    budgets = dict(budget) if isinstance(budget, dict) else {n: budget for n in names}
    for b in budgets.values():
        if not (0.0 < float(b) <= 1.0):
            raise ValueError(f"budget must be in (0, 1], got {b}")
    out = {}
    for name in names:
        m = get_module(model, name)
        if isinstance(m, nn.Conv2d) and not is_conv2d(m):
            raise ValueError(f"{name!r} cannot be compressed: {unsupported_conv(m)}")
        if not is_compressible(m):
            raise ValueError(f"{name!r} is not a linear layer ({type(m).__name__})")
        if not torch.isfinite(m.weight).all() or (m.bias is not None and not torch.isfinite(m.bias).all()):
            raise ValueError(f"layer {name!r} has NaN or Inf weights; fix the model before compressing")
        g = fit(as_linear(m), budgets[name], **fit_kwargs).eval()
        if isinstance(m, nn.Conv2d):
            g = GBLRConv2d.from_gblr(g, **conv_geometry(m)).eval()
        g.to(device=m.weight.device)
        set_module(model, name, g)
        out[name] = g
    return out
