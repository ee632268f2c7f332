"""Saving and loading compressed models (`model.gblr.pt`).

The file is a dict written with torch.save and readable with ``torch.load(weights_only=True)``:

- ``kind="module"``: the compressed nn.Module itself, pickled; loading allow-lists only nn.Module
  classes of torch.nn and gblrc (GBLRLinear), so a model made of those needs no trust.  A model
  with its own classes needs ``trust_pickle=True`` (the same rule as for the input model).
- ``kind="hf"``: a Hugging Face model as its config (plain dict), the name of the transformers
  Auto class, its state dict and the shapes of the GBLR layers; rebuilt with ``from_config`` and
  the GBLR layers re-inserted, then the state dict loaded strictly.

Both carry ``example_inputs``: [[name, tensor], ...] in forward's order, set on the loaded model as
``model.gblrc_example_inputs`` (an OrderedDict) so `gblrc lower` needs no input flags.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from gblrc.errors import GblrcError

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "gblrc.compressed"
VERSION = 1


def _is_hf(model) -> bool:
    cfg = getattr(model, "config", None)
    return type(model).__module__.startswith("transformers.") and hasattr(cfg, "to_json_string")


def _gblr_layers(model) -> dict[str, dict]:
    from gblrc.nn.layer import GBLRLinear

    def spec(m) -> dict:
        d = {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "num_components": m.num_components,
            "rank_per_component": m.rank_per_component,
            "bias": m.bias is not None,
        }
        if hasattr(m, "spec"):  # BlockSparseLinear: its block's place and family
            d["block_sparse"] = m.spec()
        if hasattr(m, "geometry_kwargs"):  # GBLRConv2d
            d["conv"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in m.geometry_kwargs().items()}
        return d

    return {n: spec(m) for n, m in model.named_modules() if isinstance(m, GBLRLinear)}


def _plain(obj) -> Any:
    """Only plain python values survive (weights_only files)."""
    return json.loads(json.dumps(obj, default=str))


def save(
    model, path: str | os.PathLike, *, example_inputs=None, meta: dict | None = None, auto_class: str | None = None
) -> Path:
    """Write ``model`` (with GBLRLinear layers) to ``path`` (written as is: wrap in atomic_path for safety).

    example_inputs: OrderedDict / dict name -> tensor (or a single tensor) in forward's order.
    meta: plain JSON-able facts (budget, achieved ratio, ...). auto_class: transformers Auto class
    name for Hugging Face models (default: chosen from config.architectures).
    """
    import torch

    if example_inputs is None:
        example_inputs = getattr(model, "gblrc_example_inputs", None)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = OrderedDict(input=example_inputs)
    ex = [[str(k), v.detach().cpu().clone()] for k, v in (example_inputs or {}).items()]
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "example_inputs": ex, "meta": _plain(meta or {})}
    if _is_hf(model):
        from gblrc.io.loading import hf_auto_class

        cfg = json.loads(model.config.to_json_string(use_diff=False))
        doc.update(
            kind="hf",
            config=cfg,
            auto_class=auto_class or hf_auto_class(cfg.get("architectures")),
            gblr_layers=_gblr_layers(model),
            state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        )
    else:
        doc.update(kind="module", module=model)
    stash = {k: model.__dict__.pop(k) for k in ("gblrc_example_inputs", "gblrc_meta") if k in model.__dict__}
    try:
        torch.save(doc, str(path))
    finally:
        model.__dict__.update(stash)
    return Path(path)


def _set_module(root, name: str, new) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _rebuild_hf(doc: dict, path: Path):
    import torch

    from gblrc.nn.layer import BlockSparseLinear, GBLRLinear
    from gblrc.io.loading import _hf_quiet

    _hf_quiet()
    import transformers

    cfg = dict(doc["config"])
    try:
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = getattr(transformers, doc["auto_class"]).from_config(config)
    except Exception as e:
        raise GblrcError(
            f"cannot rebuild the Hugging Face model of {str(path)!r}: {' '.join(str(e).split())[:200]}"
        ) from None
    for name, spec in doc["gblr_layers"].items():
        kw = {
            "num_components": spec["num_components"],
            "rank_per_component": spec["rank_per_component"],
            "bias": spec["bias"],
        }
        if "conv" in spec:
            from gblrc.nn.conv import GBLRConv2d

            layer = GBLRConv2d(**spec["conv"], **kw)
        elif "block_sparse" in spec:
            bs = spec["block_sparse"]
            layer = BlockSparseLinear(
                torch.zeros(bs["rows"][1], bs["cols"][1]),
                spec["out_features"],
                spec["in_features"],
                row_start=bs["rows"][0],
                col_start=bs["cols"][0],
                bias=torch.zeros(spec["out_features"]) if spec["bias"] else None,
                family=bs["family"],
            )
        else:
            layer = GBLRLinear(spec["in_features"], spec["out_features"], **kw)
        _set_module(model, name, layer)
    try:
        model.load_state_dict(doc["state_dict"], strict=True)
    except RuntimeError as e:
        raise GblrcError(
            f"{str(path)!r}: weights do not match the recorded architecture ({str(e).splitlines()[0]})"
        ) from None
    return model


def load(path: str | os.PathLike, *, trust_pickle: bool = False):
    """Load a compressed model written by :func:`save` / `gblrc compress`, in eval mode.

    The model gets ``gblrc_example_inputs`` (OrderedDict name -> tensor) and ``gblrc_meta`` (dict).
    ``trust_pickle`` allows classes outside torch.nn/gblrc (runs code from the file).
    """
    import torch

    from gblrc.io.loading import safe_load

    p = Path(path)
    if not p.is_file():
        raise GblrcError(f"compressed model {str(p)!r} does not exist")
    doc = safe_load(p, trust=trust_pickle, what="compressed model")
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT):
        raise GblrcError(f"{str(p)!r} is not a gblrc compressed model; make one with: gblrc compress MODEL --budget B")
    if doc.get("version", 0) > VERSION:
        raise GblrcError(f"{str(p)!r} was written by a newer gblrc (format {doc['version']}); upgrade gblrc")
    if doc["kind"] == "hf":
        model = _rebuild_hf(doc, p)
    elif doc["kind"] == "module" and isinstance(doc.get("module"), torch.nn.Module):
        model = doc["module"]
    else:
        raise GblrcError(f"{str(p)!r}: unknown compressed model kind {doc.get('kind')!r}")
    model.eval()
    model.gblrc_example_inputs = OrderedDict((k, v) for k, v in doc.get("example_inputs", []))
    model.gblrc_meta = dict(doc.get("meta", {}))
    return model
