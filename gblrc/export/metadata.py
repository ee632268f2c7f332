"""An ONNX model's metadata (``model.metadata_props``) read and written in one place.

gblrc records what it chose in a file's metadata under ``gblrc.*`` keys (the attention form, the example
shapes, the fusion, the quantisation, ...).  :func:`set_metadata` merges keys into what a model already
holds (one entry per key, the order kept); :func:`get_metadata` reads them all as a dict.
"""

from __future__ import annotations

import json
from typing import Mapping

import onnx

__all__ = ["get_metadata", "set_metadata", "get_json"]


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """``model``'s metadata as a dict key -> value (the last entry wins where a key repeats)."""
    return {p.key: p.value for p in model.metadata_props}


def get_json(model: onnx.ModelProto, key: str):
    """The JSON value recorded under ``key`` (None when the model has none)."""
    value = get_metadata(model).get(key)
    return None if value is None else json.loads(value)


def set_metadata(model: onnx.ModelProto, items: Mapping[str, object] | None = None, /, **kv) -> None:
    """Merge ``items`` and ``kv`` into ``model``'s metadata, in place.

    Keys with dots (``gblrc.attention``) go in ``items``; a value that is not a string is written as compact
    JSON; None removes the key."""
    props = get_metadata(model)
    for key, value in {**(items or {}), **kv}.items():
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    onnx.helper.set_model_props(model, props)
