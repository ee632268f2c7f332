"""Loading the model that `gblrc compress` works on: a pickled nn.Module or a Hugging Face folder.

Pickled modules (``torch.save(model)``) are read with ``torch.load(weights_only=True)`` and an
allow-list of classes: nn.Module subclasses defined in ``torch.nn`` and ``gblrc``.  A file that
needs any other class would run code from the file while loading; it is refused unless the user
passes the explicit trust flag (then ``weights_only=False``).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gblrc.errors import GblrcError

__all__ = ["LoadedModel", "load_model", "model_path", "safe_load", "allowed_globals", "hf_auto_class"]

TRUST_FLAG = "--trust-pickle"
_SAFE_PREFIXES = ("torch.nn.", "gblrc.")

# Where the modules of gblrc 0.1.0 (before the package was split into subpackages) live now: a model
# pickled then records its classes under the old paths (e.g. gblrc.layer.GBLRLinear).
MOVED_MODULES = {"gblrc.layer": "gblrc.nn.layer", "gblrc.conv": "gblrc.nn.conv", "gblrc.monarch": "gblrc.nn.monarch"}


def current_name(name: str) -> str:
    """A pickled global's name with a gblrc 0.1.0 module path replaced by today's."""
    mod, _, attr = name.rpartition(".")
    return f"{MOVED_MODULES[mod]}.{attr}" if mod in MOVED_MODULES else name


@dataclass
class LoadedModel:
    """A model ready for compression, with what is needed to feed it and to save it again."""

    model: Any  # torch.nn.Module
    kind: str  # "module" (pickled nn.Module) or "hf" (Hugging Face folder)
    path: Path
    tokenizer: Any = None  # HF tokenizer, when the folder has one
    auto_class: str | None = None  # HF: name of the transformers Auto class used to build it
    extra: dict = field(default_factory=dict)


def _resolve(name: str):
    mod, _, attr = current_name(name).rpartition(".")
    if not mod:
        return None
    try:
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def allowed_globals(names: list[str]) -> tuple[list, list[str]]:
    """Split global names found in a checkpoint into (allowed objects, refused names).

    An allowed class saved under a gblrc 0.1.0 module path is given as (class, old name), the form
    ``torch.serialization.safe_globals`` maps it with.
    Allowed: nn.Module subclasses (and nn.Parameter) defined under ``torch.nn`` or ``gblrc``.
    Only modules of those two packages are ever imported here.
    """
    import torch

    ok, refused = [], []
    for n in names:
        obj = _resolve(n) if n.startswith(_SAFE_PREFIXES) else None
        good = isinstance(obj, type) and (issubclass(obj, torch.nn.Module) or obj is torch.nn.Parameter)
        if good and obj.__module__.startswith(_SAFE_PREFIXES):
            ok.append(obj if current_name(n) == n else (obj, n))  # (class, name it was saved under)
        else:
            refused.append(n)
    return ok, refused


def _moved_pickle():
    """The pickle module with an Unpickler that finds classes saved under gblrc 0.1.0 module paths."""
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return super().find_class(MOVED_MODULES.get(module, module), name)

    return types.SimpleNamespace(
        __name__="pickle",
        Unpickler=Unpickler,
        load=pickle.load,
        loads=pickle.loads,
        UnpicklingError=pickle.UnpicklingError,
    )


def _unreadable(path: Path, err: BaseException) -> GblrcError:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return GblrcError(f"cannot read {str(path)!r}: not a valid PyTorch file ({msg[:120]})")


def safe_load(path: str | os.PathLike, *, trust: bool = False, what: str = "model file"):
    """torch.load a file with the torch.nn/gblrc allow-list; any other class needs ``trust``."""
    import pickle

    import torch

    path = Path(path)
    if trust:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_moved_pickle())
        except (ModuleNotFoundError, AttributeError) as e:
            raise GblrcError(f"cannot load {str(path)!r}: the code it needs is not importable ({e})") from None
        except Exception as e:  # corrupt file
            raise _unreadable(path, e) from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = None  # not a zip checkpoint: let torch.load report what is wrong
    allowed, refused = allowed_globals(names or [])
    if refused:
        shown = ", ".join(refused[:3]) + (", ..." if len(refused) > 3 else "")
        raise GblrcError(
            f"{what} {str(path)!r} needs code outside torch.nn to load ({shown}); loading it would run "
            f"that code: pass {TRUST_FLAG} only if you trust the file"
        )
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd files; errors are reported below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise GblrcError(
                f"{what} {str(path)!r} needs code outside torch.nn to load; "
                f"pass {TRUST_FLAG} only if you trust the file"
            ) from None
        raise _unreadable(path, e) from None
    except Exception as e:
        raise _unreadable(path, e) from None


_HF_SUFFIXES = (  # architecture name suffix -> transformers Auto class
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
)


def hf_auto_class(architectures: list[str] | None) -> str:
    """Name of the transformers Auto class that rebuilds a config's architecture (AutoModel by default)."""
    for arch in architectures or []:
        for suffix, auto in _HF_SUFFIXES:
            if arch.endswith(suffix):
                return auto
    return "AutoModel"


def _hf_quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _load_hf(path: Path, trust: bool) -> LoadedModel:
    _hf_quiet()
    try:
        cfg_dict = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise GblrcError(f"{str(path / 'config.json')!r} is not valid JSON ({e})") from None
    if cfg_dict.get("auto_map") and not trust:
        raise GblrcError(
            f"the Hugging Face model in {str(path)!r} needs its own Python code (auto_map); "
            f"pass --trust-remote-code only if you trust it"
        )
    import transformers

    auto = hf_auto_class(cfg_dict.get("architectures"))
    try:
        model = getattr(transformers, auto).from_pretrained(str(path), local_files_only=True, trust_remote_code=trust)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise GblrcError(f"cannot load the Hugging Face model in {str(path)!r}: {msg}") from None
    tok = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust)
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token  # GPT-2 style tokenizers have no pad token
        except Exception:
            tok = None
    return LoadedModel(model.eval(), "hf", path, tokenizer=tok, auto_class=auto)


def model_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path to an existing model file or folder; the one-line error otherwise."""
    p = Path(path)
    if not p.exists():
        raise GblrcError(
            f"model {str(p)!r} does not exist; give a .pt file saved with torch.save(model) or a Hugging Face folder"
        )
    return p


def load_model(path: str | os.PathLike, *, trust: bool = False) -> LoadedModel:
    """Load a pickled nn.Module file or a Hugging Face model folder (offline) for compression."""
    import torch

    p = model_path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GblrcError(f"folder {str(p)!r} has no config.json; give a Hugging Face model folder or a .pt file")
        return _load_hf(p, trust)
    obj = safe_load(p, trust=trust)
    if isinstance(obj, dict) and obj.get("format") == "gblrc.compressed":
        raise GblrcError(f"{str(p)!r} is already a gblrc compressed model; give the original dense model")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GblrcError(
            f"{str(p)!r} holds a state_dict (weights without the architecture); save the whole model "
            f"with torch.save(model) or give a Hugging Face model folder"
        )
    if not isinstance(obj, torch.nn.Module):
        raise GblrcError(f"{str(p)!r} holds a {type(obj).__name__}, not a model; save the model with torch.save(model)")
    return LoadedModel(obj.eval(), "module", p)
