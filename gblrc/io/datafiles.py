"""Data for `gblrc compress --data D`: a .pt file, a text file, or `module:function`.

Each form becomes a :class:`Data`: what the trainer receives (``train``), one small batch of
inputs used to check that the data fits the model before training starts, and optionally a
labelled set for measuring accuracy before/after.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gblrc.errors import GblrcError

__all__ = ["Data", "load_data", "check_fits", "forward_order", "call_model", "guess_example_inputs"]

MAX_TOKENS = 128


@dataclass
class Data:
    train: Any  # what gblrc.learn.compress.compress(data=...) accepts
    sample: Any  # one small batch of inputs: Tensor or dict name -> Tensor
    has_targets: bool = False
    eval_inputs: Any = None  # labelled set for accuracy (Tensor or dict), optional
    eval_targets: Any = None
    eval_name: str = ""  # "held-out" or "training"


def _head(x, n: int):
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def _length(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise GblrcError("data inputs are a 0-d tensor; give a batch (first axis = examples)")
        return x.shape[0]
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in x.values()):
        sizes = {v.shape[0] for v in x.values()}
        if len(sizes) != 1:
            raise GblrcError(f"data inputs have different numbers of examples: {sorted(sizes)}")
        return sizes.pop()
    raise GblrcError("data inputs must be a tensor or a dict of tensors (first axis = examples)")


def _from_pt(path: Path, trust: bool) -> Data:
    import torch

    from gblrc.io.loading import safe_load

    obj = safe_load(path, trust=trust, what="data file")
    if isinstance(obj, torch.Tensor):
        return Data(train=obj, sample=_head(obj, 2)) if _length(obj) else _empty(path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        obj = {"inputs": obj[0], "targets": obj[1]}
    if not isinstance(obj, dict):
        raise GblrcError(
            f"data file {str(path)!r} holds a {type(obj).__name__}; save a tensor of inputs or "
            f"a dict with 'inputs' (and 'targets')"
        )
    if "inputs" not in obj:
        obj = {"inputs": dict(obj)}  # a dict of keyword inputs, e.g. input_ids + attention_mask
    x, y = obj["inputs"], obj.get("targets")
    n = _length(x)
    if n == 0:
        return _empty(path)
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != n):
        raise GblrcError(f"data file {str(path)!r}: 'targets' must be a tensor with one entry per input ({n})")
    ex, ey = obj.get("eval_inputs"), obj.get("eval_targets")
    held = ex is not None and ey is not None
    train = {"inputs": x} if y is None else {"inputs": x, "targets": y}
    return Data(
        train=train,
        sample=_head(x, 2),
        has_targets=y is not None,
        eval_inputs=ex if held else (x if y is not None else None),
        eval_targets=ey if held else y,
        eval_name="held-out" if held else "training",
    )


def _empty(path) -> Data:
    raise GblrcError(f"data {str(path)!r} holds no examples")


def tokenize(tokenizer, lines: list[str], model=None) -> dict:
    """Tokenise sentences with padding and truncation (max 128 tokens); keep the keys forward accepts."""
    enc = tokenizer(lines, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    out = {k: v for k, v in enc.items()}
    if model is not None:
        names = set(forward_order(model))
        out = {k: v for k, v in out.items() if k in names} or out
    return out


class TextBatches:
    """Re-iterable batches of tokenised lines, padded per batch (not to the longest line of the file).

    Pass k over the data (the k-th ``iter()``) shuffles the lines with ``seed`` and k, so the
    sequence of batches is the same in every process (a resumed run sees the same batches).
    """

    def __init__(self, lines: list[str], tokenizer, model, batch_size: int, seed: int):
        self.lines, self.tok, self.model = lines, tokenizer, model
        self.bs, self.seed, self.passes = max(1, min(int(batch_size), len(lines))), int(seed), 0

    def with_lines(self, lines: list[str]) -> "TextBatches":
        """The same batcher over other lines (e.g. a held-out part)."""
        return TextBatches(lines, self.tok, self.model, self.bs, self.seed)

    def fingerprint(self) -> str:
        """What the batches are made of (the lines, batch size and seed), without iterating (which shuffles)."""
        import hashlib

        return hashlib.sha256(f"{self.bs} {self.seed}\n{chr(10).join(self.lines)}".encode()).hexdigest()

    def batch(self, idx) -> dict:
        return tokenize(self.tok, [self.lines[i] for i in idx], self.model)

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        perm = torch.randperm(len(self.lines), generator=g).tolist()
        for i in range(0, len(perm), self.bs):
            yield self.batch(perm[i : i + self.bs])


def _from_text(path: Path, loaded, batch_size: int, seed: int, general: int = 0) -> Data:
    if loaded.kind != "hf" or loaded.tokenizer is None:
        raise GblrcError(
            f"text data {str(path)!r} needs a Hugging Face model folder with a tokenizer; "
            f"for other models give a .pt file of input tensors"
        )
    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except UnicodeDecodeError:
        raise GblrcError(f"data file {str(path)!r} is neither a .pt file nor UTF-8 text") from None
    if not lines:
        _empty(path)
    probe_lines = lines[:64]  # the file's first lines: before/after agreement
    if general:
        from gblrc.io.zoo import mix_text

        lines = mix_text(lines, general, seed=seed)
    batches = TextBatches(lines, loaded.tokenizer, loaded.model, batch_size, seed)
    probe = tokenize(loaded.tokenizer, probe_lines, loaded.model)
    return Data(train=batches, sample=_head(probe, 2), eval_inputs=probe, eval_name="first lines")


def _from_function(spec: str) -> Data:
    import torch

    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            s = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
            if s is None or not Path(mod_name).is_file():
                raise ImportError(f"no file {mod_name}")
            mod = importlib.util.module_from_spec(s)
            s.loader.exec_module(mod)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # modules in the current folder
            mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)
    except (ImportError, AttributeError) as e:
        raise GblrcError(f"cannot import data function {spec!r}: {' '.join(str(e).split())}") from None
    if not callable(fn):
        raise GblrcError(f"{spec!r} is not a function")
    try:
        first = next(iter(fn()))
    except StopIteration:
        raise GblrcError(f"data function {spec!r} returned no batches") from None
    except Exception as e:
        raise GblrcError(f"data function {spec!r} failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    has_y = isinstance(first, (tuple, list))
    if has_y and len(first) != 2:
        raise GblrcError(f"data function {spec!r}: a batch must be inputs, a dict of inputs or (inputs, targets)")
    x = first[0] if has_y else first
    if not isinstance(x, (torch.Tensor, dict)):
        raise GblrcError(f"data function {spec!r} yields {type(x).__name__}; batches must hold tensors")
    _length(x)
    return Data(train=fn, sample=_head(x, 2), has_targets=has_y)


GENERAL_TEXT = 12000  # sentences of built-in English mixed into text data by default (docs/results.md: Fidelity)


def is_text_data(spec: str | None) -> bool:
    """True when ``--data`` names a text file (one example per line), not a .pt file or module:function."""
    if spec is None:
        return False
    p = Path(spec)
    if not p.is_file() or p.suffix in (".pt", ".pth", ".bin"):
        return False
    with open(p, "rb") as f:
        return not f.read(4).startswith(b"PK")


def load_data(
    spec: str | None, loaded, *, batch_size: int, seed: int, trust: bool = False, general_text: int = 0
) -> Data | None:
    """Read ``--data``: a .pt file, a text file (HF models), or ``module:function``; None for no data.

    ``batch_size`` and ``seed``: the run's (the CLI passes its CompressConfig's; no default of their own here).

    ``general_text``: add that many sentences of the built-in general text to a text file's lines
    (:func:`gblrc.io.zoo.mix_text`); an error for other kinds of data."""
    if spec is None:
        if general_text:
            raise GblrcError("--general-text needs --data (a text file to mix it into)")
        return None
    text = is_text_data(spec)
    if general_text and not text:
        raise GblrcError("--general-text mixes built-in English into a text file's lines; --data is not a text file")
    p = Path(spec)
    if p.is_file():  # a .pt file, or a torch.save zip file with another suffix, else text
        return _from_text(p, loaded, batch_size, seed, general_text) if text else _from_pt(p, trust)
    if ":" in spec and not p.exists():
        return _from_function(spec)
    raise GblrcError(f"data {spec!r} does not exist; give a .pt file, a text file or module:function")


def forward_order(model) -> list[str]:
    """Names of ``model.forward``'s parameters, in order (no *args/**kwargs)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in sig.parameters.items() if p.kind in kinds]


def call_model(model, x):
    """Run ``model`` on a tensor or a dict of keyword inputs."""
    return model(**x) if isinstance(x, dict) else model(x)


def check_fits(model, sample) -> None:
    """One small batch through the model before training: a one-line error if it does not fit."""
    import torch

    try:
        with torch.no_grad():
            call_model(model, sample)
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise GblrcError(
            f"the data does not fit the model: {msg}; give inputs of the shape the model expects"
        ) from None


def example_inputs(model, sample, kind: str) -> "OrderedDict[str, Any]":
    """Name -> tensor in forward's order, for `gblrc lower`: call model(*values) or model(**dict)."""
    names = forward_order(model)
    if not isinstance(sample, dict):
        return OrderedDict([(names[0] if names else "input", sample.detach().clone())])
    if kind == "hf":  # input_ids, plus attention_mask only where it is forward's second parameter
        keep = ["input_ids"] + (["attention_mask"] if names[1:2] == ["attention_mask"] else [])
        sample = {k: v for k, v in sample.items() if k in keep} or sample
    mask = sample.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] > 1:  # drop columns that are padding in all rows
        used = mask.ne(0).any(0).nonzero()
        keep_len = int(used.max()) + 1 if used.numel() else 1
        sample = {
            k: (v[:, :keep_len] if v.dim() >= 2 and v.shape[1] == mask.shape[1] else v) for k, v in sample.items()
        }
    order = {n: i for i, n in enumerate(names)}
    keys = sorted(sample, key=lambda k: order.get(k, len(order)))
    return OrderedDict((k, sample[k].detach().clone()) for k in keys)


def guess_example_inputs(loaded):
    """A small input batch when no data is given: tokenised sentences (HF) or (2, in_features)."""
    import torch

    if loaded.kind == "hf":
        if loaded.tokenizer is not None:
            return tokenize(loaded.tokenizer, ["A small example sentence.", "Another one."], loaded.model)
        vocab = int(getattr(loaded.model.config, "vocab_size", 100))
        return {"input_ids": torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))}
    for m in loaded.model.modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int) and len(list(m.children())) == 0:
            x = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
            try:
                with torch.no_grad():
                    loaded.model(x)
                return x
            except Exception:
                return None
    return None
