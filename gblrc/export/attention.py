"""The attention form a model is exported in: the one the target provider runs fastest.

transformers 5 loads BERT-like models with SDPA attention (``torch.nn.functional.scaled_dot_product_attention``)
by default, and the TorchScript exporter writes what the model runs.  ONNX Runtime's CPU provider runs the
eager-attention export faster (MiniLM, 8 x 128 tokens, 2 threads: dense eager 0.86-0.92x dense SDPA; the
compressed, lowered model 0.675x -> 0.563x SDPA-dense), and only the eager export is one ONNX Runtime's
transformer optimizer fuses into Attention nodes.  So every model whose attention has more than one export
form (a Hugging Face model that can switch its ``attn_implementation`` between ``eager`` and ``sdpa``) is
exported in the form chosen here:

- ``attention="auto"``: each form is exported and its dense reference (every GBLR layer as its dense MatMul:
  the forms differ only outside the linear layers) timed on the provider, on the example inputs
  (gblrc.runtime.timing: interleaved runs, medians, best of fresh sessions); the faster is kept.  When the
  two are within :data:`TIE` of each other (noise on a shared machine) the form with fewer graph nodes is
  kept: the recorded rule, measured on ONNX Runtime 1.32 CPU, that the leaner eager graph is never slower.
- ``attention="eager"`` / ``"sdpa"``: that form (an error when the model has no such form).

What was chosen, how, and the measured times go into the model's metadata (``gblrc.attention``, JSON).
A model with a single form (plain torch modules, models that cannot switch) is exported as it is and
records that.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import onnx

from gblrc.errors import GblrcError
from gblrc.export.metadata import get_json, set_metadata
from gblrc.export.options import ATTENTION_OPTIONS

__all__ = [
    "FORMS",
    "OPTIONS",
    "TIE",
    "METADATA_KEY",
    "AttentionChoice",
    "attention_forms",
    "attention_form",
    "export_in_fastest_form",
    "record_choice",
    "read_choice",
]

OPTIONS = ATTENTION_OPTIONS  # "auto", then the forms (gblrc.export.options: LowerConfig checks it)
FORMS = OPTIONS[1:]
TIE = 0.02  # relative time difference under which two forms count as equally fast
METADATA_KEY = "gblrc.attention"


@dataclass
class AttentionChoice:
    form: str | None  # "eager", "sdpa", or None (a single export form)
    chosen_by: str  # "measured", "rule (within 2%: fewer nodes)", "option", "single form"
    forms: list[str] = field(default_factory=list)  # the forms the model has
    provider: str = ""
    threads: int = 0
    shapes: dict = field(default_factory=dict)  # input name -> shape timed
    seconds: dict = field(default_factory=dict)  # form -> best median seconds of its dense reference
    nodes: dict = field(default_factory=dict)  # form -> node count of the exported graph

    def ratio(self) -> float | None:
        """Time of the eager form over the SDPA form (None unless both were timed)."""
        s = self.seconds
        return s["eager"] / s["sdpa"] if "eager" in s and "sdpa" in s and s["sdpa"] > 0 else None

    def line(self) -> str:
        if self.form is None:
            return "attention: the model has one export form"
        r = self.ratio()
        timed = (
            ""
            if r is None
            else (
                f" (dense eager / dense sdpa {r:.3f} on {self.provider}, {self.threads} threads, "
                f"{', '.join(f'{k}=' + 'x'.join(map(str, v)) for k, v in self.shapes.items())})"
            )
        )
        return f"attention: exported {self.form} ({self.chosen_by}){timed}"

    def as_dict(self) -> dict:
        return asdict(self)


def _hf(module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(module, "config")


def attention_forms(module) -> list[str]:
    """The attention implementations ``module`` can be exported with (empty: one fixed form)."""
    if not _hf(module) or not hasattr(module, "set_attn_implementation"):
        return []
    current = getattr(module.config, "_attn_implementation", None)
    if current not in FORMS:
        return []
    try:
        can = module._can_set_attn_implementation()
    except Exception:
        can = False
    if not can:
        return []
    return ["eager"] + (["sdpa"] if getattr(module, "_supports_sdpa", False) else [])


@contextlib.contextmanager
def attention_form(module, form: str | None):
    """``module`` with attention implementation ``form`` inside the block (None: unchanged); restored after."""
    if form is None:
        yield module
        return
    before = module.config._attn_implementation
    if form == before:
        yield module
        return
    module.set_attn_implementation(form)
    try:
        if module.config._attn_implementation != form:
            raise GblrcError(
                f"the model did not switch to {form} attention (it kept {module.config._attn_implementation})"
            )
        yield module
    finally:
        module.set_attn_implementation(before)


def export_in_fastest_form(
    module,
    export: Callable[[], onnx.ModelProto],
    *,
    attention: str = "auto",
    feeds: dict | None = None,
    provider: str = "auto",
    threads: int | None = None,
    repeats: int = 10,
    sessions: int = 2,
) -> tuple[onnx.ModelProto, AttentionChoice]:
    """Export ``module`` with ``export()`` (called once per form tried) in the attention form asked for.

    attention: "auto" (time the dense references of both forms on ``feeds`` with ``provider``), "eager" or
    "sdpa".  Returns the exported graph of the chosen form and the choice (record it with
    :func:`record_choice`)."""
    if attention not in OPTIONS:
        raise GblrcError(f"unknown attention form {attention!r}; choose {', '.join(OPTIONS)}")
    forms = attention_forms(module)
    if attention != "auto" and attention not in forms:
        what = (
            f"its attention has the forms {', '.join(forms)}"
            if forms
            else "it has one attention export form (not a Hugging Face model that can switch between eager and sdpa)"
        )
        raise GblrcError(f"--attention {attention} does not apply to this model: {what}; use --attention auto")
    if not forms:
        return export(), AttentionChoice(form=None, chosen_by="single form")
    if attention != "auto" or len(forms) == 1:
        form = attention if attention != "auto" else forms[0]
        with attention_form(module, form):
            model = export()
        return model, AttentionChoice(
            form=form,
            chosen_by="option" if attention != "auto" else "single form",
            forms=forms,
            nodes={form: len(model.graph.node)},
        )
    graphs = {}
    for form in forms:
        with attention_form(module, form):
            graphs[form] = export()
    from gblrc.runtime.timing import effective_threads

    feeds = dict(feeds or {})
    prov, t = _time_dense_references(graphs, feeds, provider, threads, repeats, sessions)
    nodes = {f: len(g.graph.node) for f, g in graphs.items()}
    fast, slow = sorted(forms, key=lambda f: t.best[f])
    if t.best[slow] - t.best[fast] <= TIE * t.best[slow]:
        form, how = min(forms, key=lambda f: (nodes[f], f)), f"rule: within {TIE:.0%}, fewer nodes"
    else:
        form, how = fast, "measured"
    choice = AttentionChoice(
        form=form,
        chosen_by=how,
        forms=forms,
        provider=prov,
        threads=effective_threads(threads),
        shapes={k: list(v.shape) for k, v in feeds.items()},
        seconds=dict(t.best),
        nodes=nodes,
    )
    return graphs[form], choice


def _time_dense_references(graphs: dict, feeds: dict, provider: str, threads, repeats: int, sessions: int):
    """(resolved provider, best-of-sessions times) of the dense reference of each form's graph on ``feeds``."""
    from gblrc.export.reference import dense_reference_model
    from gblrc.runtime.timing import best_of_sessions, resolve_provider

    try:
        prov = resolve_provider(provider)
    except ValueError as e:
        raise GblrcError(str(e)) from None
    try:
        t = best_of_sessions(
            {f: dense_reference_model(g) for f, g in graphs.items()},
            feeds,
            provider=prov,
            threads=threads,
            repeats=repeats,
            sessions=sessions,
            warmup=2,
        )
    except Exception as e:
        raise GblrcError(
            f"timing the attention forms failed on {prov}: {' '.join(str(e).split())[:200]}; "
            "choose one with --attention eager|sdpa"
        ) from None
    return prov, t


def record_choice(model: onnx.ModelProto, choice: AttentionChoice) -> None:
    """Write the choice into ``model``'s metadata (``gblrc.attention``)."""
    set_metadata(model, {METADATA_KEY: choice.as_dict()})


def read_choice(model: onnx.ModelProto) -> dict | None:
    """The recorded choice of a model gblrc wrote (None when it has none)."""
    return get_json(model, METADATA_KEY)
