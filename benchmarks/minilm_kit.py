"""What every subcommand of the MiniLM benchmark (``python -m benchmarks.minilm``) is made of, in one place.

- **Data**: the text sources (:func:`source`), the training text as ``gblrc compress --data`` makes it
  (:func:`training_text`, :func:`training_batches`: the CLI's own ``TextBatches`` and built-in mix), the
  judge sets (:func:`judge_sets`) and the example / timing inputs (:func:`example_inputs`).
- **Judges**: cosine of mean-pooled embeddings to the dense PyTorch model, by the library's own judge
  (:class:`gblrc.learn.fidelity.Fidelity`; an ONNX graph is judged through :class:`OnnxEncoder`, a module
  that runs it in ONNX Runtime), and a downstream consumer (:func:`consumer_judge`): frozen classifiers
  fitted on the dense model's embeddings of labelled text (:func:`labelled_text`), scored on held-out text
  through each model's embeddings.
- **Model cache**: compressed models saved with the facts of their making (:class:`ModelCache`), and
  :func:`compress_timed`, one ``gblrc.compress`` run timed as a whole.
- **Export and timing**: the dense baseline in its fastest attention form (:func:`export_dense`, as `gblrc
  lower` chooses), and :func:`time_graphs` (the project's harness, gblrc.runtime.timing, which `gblrc
  bench` and gblrc.export.speed use).

Nothing here loads MiniLM itself: the functions take the model and tokenizer, so the tests run them on a
tiny random BERT.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gblrc.errors import GblrcError  # noqa: E402
from gblrc.io.datafiles import GENERAL_TEXT, MAX_TOKENS, TextBatches  # noqa: E402

INCLUDE = r"^encoder\."  # the 36 encoder Linear layers
GENRES = ("readme", "sklearn", "changelog")  # "other genres": text the training mix never contains
SOURCES = "pydoc, stdlib-a, stdlib-b, packages[:N], readme, sklearn, changelog"
CONSUMERS = ("docstrings", "readme")  # labelled text of the consumer judge: its genre, then the other

# ---------------------------------------------------------------------------------------------- data


def load_dense(folder=None):
    """(dense model, tokenizer): the installed all-MiniLM-L6-v2 (gblrc.io.zoo.load_minilm), or the Hugging
    Face model folder ``folder`` (the tests give a tiny random BERT), offline, in eval mode."""
    if folder is None:
        from gblrc.io.zoo import load_minilm

        return load_minilm()
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def source(name: str, seed: int = 0) -> list[str]:
    """The sentences of one text source, shuffled with ``seed``:

    pydoc (CPython's documentation prose), stdlib-a / stdlib-b (docstrings of two disjoint halves of the
    standard library's modules), packages[:N] (docstrings of installed third-party packages), and the other
    genres of gblrc.io.genres (readme, sklearn, changelog)."""
    from gblrc.io.genres import GENRES as ALL_GENRES, genre_sentences
    from gblrc.io.zoo import docstring_sentences, english_sentences, package_sentences

    if name == "pydoc":
        s = english_sentences()
    elif name in ("stdlib-a", "stdlib-b"):
        k = 0 if name.endswith("a") else 1
        s = docstring_sentences(part=(k, 2), exclude=set(docstring_sentences(part=(1 - k, 2))))
    elif name.split(":")[0] == "packages":
        s = package_sentences(limit=int(name.split(":")[1]) if ":" in name else 30000)
    elif name in ALL_GENRES:
        s = genre_sentences(name)
    else:
        raise GblrcError(f"unknown text source {name!r}: choose from {SOURCES}")
    s = list(s)
    random.Random(seed).shuffle(s)
    return s


def training_text(
    train: str = "stdlib-a", heldout: int = 256, general: int = GENERAL_TEXT, share: float = 0.5, limit: int = 0
):
    """(held-out sentences, training lines): ``heldout`` sentences of ``train`` kept back (the in-domain judge
    set), the rest (at most ``limit``; 0: all) mixed with ``general`` built-in package sentences so that they
    stay ``share`` of the text (gblrc.io.zoo.mix_text, seed 0: what ``gblrc compress --data FILE`` does with
    its default mix; ``general`` 0: no mix)."""
    from gblrc.io.zoo import mix_text

    lines = source(train)
    held, rest = lines[:heldout], lines[heldout:]
    return held, mix_text(rest[:limit] if limit else rest, general, share=share, seed=0)


def training_batches(tok, model, lines: list[str], batch_size: int = 32, seed: int = 0) -> TextBatches:
    """The batches ``gblrc compress --data`` trains on: gblrc.io.datafiles.TextBatches (shuffled per pass with
    ``seed``, padded per batch, at most 128 tokens)."""
    return TextBatches(lines, tok, model, batch_size, seed)


def data_facts(a) -> dict:
    """What the training data of a model was (the cache compares it): the options of :func:`training_text`."""
    keys = ("train", "heldout", "general", "general_share", "train_n")
    return {"text": {k: getattr(a, k, None) for k in keys}, "batches": "gblrc.io.datafiles.TextBatches"}


def batches(tok, sents: list[str], bs: int = 64, max_len: int = MAX_TOKENS) -> list[dict]:
    """Judge batches: input_ids and attention_mask, padded per batch, in order."""
    out = []
    for i in range(0, len(sents), bs):
        enc = tok(sents[i : i + bs], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def judge_sets(tok, held: list[str], train: list[str], names, n: int = 300) -> dict[str, list[dict]]:
    """{name: batches}: "in domain" (the held-out training sentences), then ``n`` sentences of each source
    in ``names`` that are not in the training text (shuffled with seed 1)."""
    sets = {"in domain": batches(tok, held)}
    seen = set(train)
    for name in names:
        sets[name] = batches(tok, [s for s in source(name, seed=1) if s not in seen][:n])
    return sets


def example_inputs(tok, sents: list[str], batch: int = 8, seq: int = 128) -> "OrderedDict[str, torch.Tensor]":
    """``batch`` sentences padded to ``seq`` tokens: the inputs every graph is exported and timed at."""
    enc = tok(sents[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


def numpy_feeds(batch: dict) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


# -------------------------------------------------------------------------------------------- judges


class OnnxEncoder(torch.nn.Module):
    """An ONNX MiniLM graph as a module: forward(input_ids, attention_mask) -> last hidden state (float32),
    run by ONNX Runtime, so that the library's judges score the graph that deploys."""

    def __init__(self, path, threads: int = 1):
        super().__init__()
        from gblrc.runtime import make_session

        self.session = make_session(str(path), log=False, threads=threads)
        self.names = {i.name for i in self.session.get_inputs()}

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "token_type_ids" in self.names:  # e.g. a --hf-folder graph: the inputs sentence-transformers feeds
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            feeds["token_type_ids"] = types.numpy()
        (h, *_) = self.session.run(None, {k: v for k, v in feeds.items() if k in self.names})
        return torch.from_numpy(np.asarray(h, dtype=np.float32))


def as_module(model):
    """A model, or the path of an ONNX graph as an :class:`OnnxEncoder`."""
    return OnnxEncoder(model) if isinstance(model, (str, os.PathLike)) else model


def cosine_judges(dense, sets: dict[str, list[dict]]) -> dict:
    """{set: gblrc.learn.fidelity.Fidelity} of the dense model's mean-pooled embeddings on each judge set."""
    from gblrc.learn.fidelity import Fidelity

    return {k: Fidelity(dense, [(b, None) for b in bl]) for k, bl in sets.items()}


def cosines(judges: dict, model) -> dict[str, tuple[float, float]]:
    """{set: (mean, min) cosine to the dense model} of a model or an ONNX graph (a path)."""
    m = as_module(model)
    out = {}
    for k, judge in judges.items():
        s = judge(m)
        out[k] = (round(s["cosine"], 4), round(s["cosine_min"], 3))
    return out


def other_mean(fid: dict):
    """Mean of the other genres' mean cosines present in ``fid`` (None when none is)."""
    vals = [fid[g][0] for g in GENRES if g in fid]
    return round(sum(vals) / len(vals), 4) if vals else None


@torch.no_grad()
def embed(model, bl: list[dict]) -> np.ndarray:
    """Mean-pooled last hidden states (over the real tokens) of a model or ONNX graph on batches."""
    from gblrc.learn.data import model_output

    m = as_module(model)
    m.eval()
    out = []
    for b in bl:
        h = model_output(m(**b)).double()
        w = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(((h * w).sum(1) / w.sum(1).clamp_min(1.0)).numpy())
    return np.concatenate(out)


def embedder(model, tok):
    """embed_fn(sentences) -> (n, hidden) array: the model's (or ONNX graph's) sentence embeddings."""
    m = as_module(model)
    return lambda sents: embed(m, batches(tok, list(sents)))


@dataclass
class Labelled:
    """Labelled sentences for the consumer judge: balanced classes, train and test parts, fixed order."""

    name: str
    classes: list[str]
    train: list[str]
    train_y: np.ndarray
    test: list[str]
    test_y: np.ndarray


def _readme_groups() -> dict[str, list[str]]:
    """{distribution: sentences of its README prose} (installed distributions' METADATA, markup stripped)."""
    import importlib.metadata as md
    import re

    from gblrc.io.genres import strip_markup
    from gblrc.io.zoo import _sentences

    texts = {}
    for dist in md.distributions():
        meta = dist.metadata
        name = (meta.get("Name") or "").lower()
        desc = (meta.get_payload() if hasattr(meta, "get_payload") else None) or meta.get("Description") or ""
        if name and desc.strip() and name not in texts:
            texts[name] = desc
    seen, out = set(), {}
    for name in sorted(texts):
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", strip_markup(texts[name])) if p.strip()]
        out[name] = _sentences(paras, 6, 40, seen)
    return out


def _docstring_groups() -> dict[str, list[str]]:
    """{top-level module: its docstring sentences} of the stdlib-b half of the standard library (modules the
    training text, stdlib-a, does not hold; their sentences that stdlib-a also has left out)."""
    import sysconfig

    from gblrc.io.zoo import _docstrings, _py_files, _sentences, docstring_sentences

    root = sysconfig.get_paths()["stdlib"]
    seen, out = set(docstring_sentences(part=(0, 2))), {}
    for f in _py_files(root, part=(1, 2)):
        top = os.path.relpath(f, root).split(os.sep)[0].removesuffix(".py")
        out.setdefault(top, []).extend(_sentences(_docstrings([f]), 6, 40, seen))
    return out


def labelled_text(kind: str = "readme", per_class: int = 30, test: int = 10, seed: int = 0) -> Labelled:
    """Sentences labelled by where they come from, every class with ``per_class`` of them (``test`` held out
    for scoring, the rest for fitting), classes in sorted order, sentences shuffled with ``seed``.

    kind "readme": which installed distribution's README a sentence is from (another genre than the
    training text); "docstrings": which standard-library module's docstrings (stdlib-b, the training text's
    genre but none of its sentences).  Only sources with at least ``per_class`` sentences are classes."""
    if not 0 < test < per_class:
        raise GblrcError(f"need 0 < test < per_class; got test={test}, per_class={per_class}")
    groups = {"readme": _readme_groups, "docstrings": _docstring_groups}.get(kind)
    if groups is None:
        raise GblrcError(f"unknown labelled text {kind!r}: choose from {', '.join(CONSUMERS)}")
    groups = groups()
    classes = sorted(k for k, v in groups.items() if len(v) >= per_class)
    if len(classes) < 2:
        raise GblrcError(f"{kind}: fewer than 2 sources with {per_class} sentences on this machine")
    rng = random.Random(seed)
    train, train_y, held, held_y = [], [], [], []
    for i, c in enumerate(classes):
        s = list(groups[c])
        rng.shuffle(s)
        held += s[:test]
        held_y += [i] * test
        train += s[test:per_class]
        train_y += [i] * (per_class - test)
    return Labelled(kind, classes, train, np.array(train_y), held, np.array(held_y))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ConsumerJudge:
    """A downstream consumer frozen on the dense model: a multinomial logistic regression fitted on the dense
    model's (L2-normalised) embeddings of ``data.train``; :meth:`score` feeds it another model's embeddings of
    ``data.test``: accuracy on the labels, and agreement with the dense model's own predictions."""

    def __init__(self, dense_embed, data: Labelled, C: float = 10.0):
        from sklearn.linear_model import LogisticRegression

        self.data = data
        self.classifier = LogisticRegression(C=C, max_iter=2000)
        self.classifier.fit(_unit(dense_embed(data.train)), data.train_y)
        self.dense_pred = self.predict(dense_embed)
        self.dense = self.score(dense_embed)

    def predict(self, embed_fn) -> np.ndarray:
        return self.classifier.predict(_unit(embed_fn(self.data.test)))

    def score(self, embed_fn) -> dict:
        """{"accuracy": on the test labels, "agreement": share of test sentences predicted as the dense
        model's embeddings are} of the model whose embeddings ``embed_fn(sentences)`` gives."""
        pred = self.predict(embed_fn)
        return {
            "accuracy": round(float((pred == self.data.test_y).mean()), 4),
            "agreement": round(float((pred == self.dense_pred).mean()), 4),
        }

    def line(self) -> str:
        d = self.data
        return (
            f"consumer {d.name}: {len(d.classes)} classes, {len(d.train)} fitting / {len(d.test)} test sentences; "
            f"dense accuracy {self.dense['accuracy']:.4f} (chance {1 / len(d.classes):.3f})"
        )


def consumer_judge(dense_embed, data: Labelled | str | None = None, **labelled) -> ConsumerJudge:
    """A :class:`ConsumerJudge` fitted on ``dense_embed`` (sentences -> embeddings of the dense model) over
    ``data`` (a :class:`Labelled`, or the kind of :func:`labelled_text`; default "readme")."""
    if not isinstance(data, Labelled):
        data = labelled_text(data or "readme", **labelled)
    return ConsumerJudge(dense_embed, data)


# ---------------------------------------------------------------------------------------- model cache


class ModelCache:
    """Compressed models in a folder, ``NAME.gblr.pt`` beside ``NAME.json`` (the facts of its making: the
    CompressConfig, the data, the seconds of its one compress run).  A model is used again only when the
    facts it was made with are the ones asked for now."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.gblr.pt", self.folder / f"{name}.json"

    def has(self, name: str) -> bool:
        return all(p.is_file() for p in self.paths(name))

    def stale(self, name: str, want: dict) -> str | None:
        """Why the cached ``name`` is not the model asked for (None: it is, or it is not there)."""
        if not self.has(name):
            return None
        info = json.loads(self.paths(name)[1].read_text())
        diff = sorted(k for k in want if info.get(k) != want[k])
        return f"made with other {', '.join(diff)}" if diff else None

    def get(self, name: str, want: dict):
        """(model, facts) when ``name`` is cached with the facts ``want``, else None."""
        if not self.has(name) or self.stale(name, want):
            return None
        import gblrc

        info = json.loads(self.paths(name)[1].read_text())
        return gblrc.load(self.paths(name)[0]).eval(), {**info, "cached": True}

    def put(self, name: str, model, facts: dict, example) -> None:
        import gblrc
        from gblrc.io.fileio import atomic_path

        path, info_path = self.paths(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            gblrc.save(model, tmp, example_inputs=example, meta={"benchmark": name, **facts})
        info_path.write_text(json.dumps(facts, indent=1) + "\n")


def config_facts(cfg) -> dict:
    """A CompressConfig as JSON-able settings (what the cache compares)."""
    d = asdict(cfg)
    d.pop("progress", None)
    return json.loads(json.dumps(d, default=str))


def compress_timed(dense, cfg, data) -> tuple:
    """(compressed model, facts): one ``gblrc.compress(copy of dense, cfg, data=data)`` run, timed as a whole
    (initialisation, refinement and training together, as a user running `gblrc compress` waits)."""
    import warnings

    import gblrc

    t0 = time.perf_counter()
    with warnings.catch_warnings():  # they come back in the report (as `gblrc compress` prints them after)
        warnings.simplefilter("ignore")
        cm, rep = gblrc.compress(copy.deepcopy(dense), cfg, data=data)
    facts = {
        "config": config_facts(cfg),
        "compress_s": round(time.perf_counter() - t0, 1),
        "achieved_ratio": rep["achieved_ratio"],
        "torch_threads": torch.get_num_threads(),
        "made": time.strftime("%Y-%m-%d %H:%M"),
        "warnings": list(rep.get("warnings", [])),
    }
    return cm.eval(), facts


# ------------------------------------------------------------------------------------ export and timing


def export_dense(dense, ex, path, feeds, *, form: str = "auto", threads=2, repeats=15, sessions=3):
    """Write the dense ONNX export of ``dense`` at ``ex`` to ``path``; ``form`` "auto": its fastest attention
    form (eager or SDPA, both timed on ``feeds``: gblrc.export.attention, as `gblrc lower` chooses), else that
    form.  Returns the AttentionChoice.  Every dense baseline of the MiniLM benchmark is the "auto" one."""
    import onnx

    from gblrc.export.attention import export_in_fastest_form, record_choice
    from gblrc.export.graph import export_onnx

    model, choice = export_in_fastest_form(
        dense,
        lambda: export_onnx(dense, ex),
        attention=form,
        feeds=feeds,
        threads=threads,
        repeats=repeats,
        sessions=sessions,
    )
    record_choice(model, choice)
    onnx.save(model, str(path))
    return choice


def time_graphs(paths: dict, feeds: dict, *, threads=2, repeats=15, sessions=3) -> dict[str, float]:
    """{key: best seconds per run} of every graph, all in one process, runs interleaved, medians of
    ``repeats``, best of ``sessions`` fresh sessions (gblrc.runtime.timing.best_of_sessions)."""
    from gblrc.runtime.timing import best_of_sessions

    return best_of_sessions(
        {k: str(p) for k, p in paths.items()}, feeds, threads=threads, repeats=repeats, sessions=sessions
    ).best
