"""`gblrc lower ... --hf-folder OUT/`: a folder the loaders users already call load with no re-export.

``sentence_transformers.SentenceTransformer(OUT, backend="onnx")`` and Optimum's
``ORTModelForFeatureExtraction.from_pretrained(OUT)`` (both look for ``onnx/model.onnx``, feed the inputs
the ONNX graph names, read the output ``last_hidden_state``) load::

    OUT/config.json                      the compressed model's config (its architecture, as loaded)
    OUT/tokenizer.json, vocab.txt, ...   the tokenizer files of the source folder
    OUT/modules.json, 1_Pooling/, ...    the sentence-transformers module files of the source folder, when present
    OUT/onnx/model.onnx                  the lowered model: inputs input_ids, attention_mask (and token_type_ids
                                         when the model has them), output last_hidden_state; fp32, fp16 or int8

No PyTorch weights are written (the folder holds the lowered compressed model only).  The folder is built
beside OUT and renamed into place at the end: a failure leaves nothing.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from gblrc.errors import GblrcError
from gblrc.io.fileio import output_mode

__all__ = [
    "TOKENIZER_FILES",
    "ST_FILES",
    "OUTPUT_NAME",
    "check_hf_folder_target",
    "hf_inputs",
    "source_folder",
    "source_files",
    "write_hf_folder",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
OUTPUT_NAME = "last_hidden_state"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_hf_folder_target(out: str | os.PathLike, keep_gblr_ops: bool = False) -> Path:
    """OUT must not exist, or be an empty folder; its parent must exist; the graph must be lowered."""
    from gblrc.export.options import SettingError

    if keep_gblr_ops:
        raise SettingError(
            "keep_gblr_ops", "{hf_folder} and {keep_gblr_ops} exclude each other (the loaders need a lowered graph)"
        )
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise GblrcError(f"--hf-folder {str(p)!r} exists and is not an empty folder; choose a new folder")
    if not p.resolve().parent.is_dir():
        raise GblrcError(f"--hf-folder {str(p)!r}: the folder {str(p.resolve().parent)!r} does not exist")
    return p


def _is_hf(module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def hf_inputs(module, examples: "OrderedDict") -> "OrderedDict":
    """The example inputs under the loaders' names: input_ids, attention_mask and, when the model's forward
    takes them and its config has token types, token_type_ids (zeros when the examples lack them)."""
    import torch

    if "input_ids" not in examples:
        raise GblrcError(
            "--hf-folder needs a text model with an input_ids input; this model's example inputs are: "
            f"{', '.join(examples) or 'none'}"
        )
    ids = examples["input_ids"]
    params = inspect.signature(module.forward).parameters
    out = OrderedDict(input_ids=ids)
    out["attention_mask"] = examples.get("attention_mask", torch.ones_like(ids))
    if "token_type_ids" in params and int(getattr(module.config, "type_vocab_size", 0) or 0) > 0:
        out["token_type_ids"] = examples.get("token_type_ids", torch.zeros_like(ids))
    extra = [k for k in examples if k not in _INPUTS]
    if extra:
        raise GblrcError(f"--hf-folder writes the inputs {', '.join(_INPUTS)}; the model also takes {extra[0]!r}")
    return out


def source_folder(module, source: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """``source``, or else the folder ``module`` was compressed from (as recorded in it; None when it is not),
    which must still be here."""
    if source is not None:
        return source
    recorded = (getattr(module, "gblrc_meta", None) or {}).get("source")
    if recorded and not Path(recorded).is_dir():
        raise GblrcError(
            f"the folder the model was compressed from ({recorded!r}) is not here; give the tokenizer's "
            "folder with --hf-source DIR"
        )
    return recorded


def source_files(source: Path) -> list[tuple[Path, str]]:
    """(file, path in OUT) of the tokenizer and sentence-transformers files of ``source`` (a HF folder)."""
    files = [(source / n, n) for n in TOKENIZER_FILES + ST_FILES if (source / n).is_file()]
    modules = source / "modules.json"
    if modules.is_file():
        try:
            mods = json.loads(modules.read_text())
        except (OSError, ValueError) as e:
            raise GblrcError(f"{str(modules)!r} is not valid JSON ({e})") from None
        for m in mods:
            rel = str(m.get("path", "")).strip("/")
            if not rel:  # the Transformer module: the folder itself (config, tokenizer, the ONNX model)
                continue
            d = source / rel
            if d.is_dir():
                files += [(f, str(f.relative_to(source))) for f in sorted(d.rglob("*")) if f.is_file()]
    return files


def write_hf_folder(
    module, examples: "OrderedDict", out: str | os.PathLike, source: str | os.PathLike | None, **lower_kwargs
):
    """Lower ``module`` (a compressed Hugging Face model) into the folder ``out`` (see the module doc).

    source: the Hugging Face folder the model was compressed from (tokenizer and sentence-transformers files);
    lower_kwargs: the options of :func:`gblrc.export.lowering.lower`.  Returns the LowerReport."""
    from gblrc.export.lowering import lower

    out = check_hf_folder_target(out, lower_kwargs.get("keep_gblr_ops", False))
    if not _is_hf(module):
        raise GblrcError("--hf-folder needs a Hugging Face model (one compressed from a Hugging Face folder)")
    if source is None:
        raise GblrcError(
            "--hf-folder needs the tokenizer of the source model, and the compressed model does not "
            "name its source folder; give it with --hf-source DIR"
        )
    src = Path(source)
    if not (src / "config.json").is_file():
        raise GblrcError(
            f"the source folder {str(src)!r} (tokenizer and module files) is not a Hugging Face folder "
            "(no config.json); give the right one with --hf-source DIR"
        )
    files = source_files(src)
    if not any(n in TOKENIZER_FILES for _, n in files):
        raise GblrcError(
            f"the source folder {str(src)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, "
            "...); the loaders need them"
        )
    inputs = hf_inputs(module, examples)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        os.chmod(tmp, output_mode(folder=True))  # mkdtemp makes it 0700; the served folder is read by others
        (tmp / "onnx").mkdir()
        rep = lower(module, inputs, tmp / "onnx" / "model.onnx", output_names=[OUTPUT_NAME], **lower_kwargs)
        module.config.to_json_file(os.fspath(tmp / "config.json"))
        for f, rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        if out.exists():  # an empty folder (checked above)
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rep.path = os.fspath(out / "onnx" / "model.onnx")
    return rep
