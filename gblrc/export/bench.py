"""`gblrc bench` underneath: feeds for an ONNX model's inputs, and a timed comparison of models.

The timing itself is gblrc.runtime.timing's (I/O binding, interleaved runs, medians, best of fresh
sessions): this module only makes inputs, checks the models can be compared and reports.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from gblrc.errors import GblrcError

__all__ = ["InputSpec", "graph_inputs", "make_feeds", "BenchResult", "bench", "recorded_shapes"]


@dataclass
class InputSpec:
    name: str
    dims: list  # int for a fixed dimension, str (its symbolic name or '?') for a dynamic one
    dtype: np.dtype

    def describe(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.dims)) or 'scalar'} {self.dtype.name}"


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph's real inputs (initializers excluded) with their dimensions and element types."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not i.type.HasField("tensor_type"):
            raise GblrcError(f"input {i.name!r} is not a tensor; gblrc bench feeds tensors only")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        try:
            dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            raise GblrcError(f"input {i.name!r} has an element type gblrc bench cannot make ({tt.elem_type})") from None
        out.append(InputSpec(i.name, dims, dt))
    return out


def _index_bound(model: onnx.ModelProto, name: str) -> int | None:
    """The smallest table size among the Gathers that index a table initializer with input ``name``
    (token ids must stay below the vocabulary size); None when it indexes none."""
    inits = {t.name: t for t in model.graph.initializer}
    sizes = [
        int(inits[n.input[0]].dims[0])
        for n in model.graph.node
        if n.op_type == "Gather"
        and len(n.input) > 1
        and n.input[1] == name
        and n.input[0] in inits
        and inits[n.input[0]].dims
    ]
    return min(sizes) if sizes else None


def make_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int = 0
) -> "OrderedDict[str, np.ndarray]":
    """Inputs for every graph input: the shapes in ``shapes`` (needed for dynamic dimensions, checked
    against fixed ones); floats ~ N(0, 1); integer inputs named like a mask all ones, token type ids
    zeros, other integers uniform below the vocabulary of the embedding table they index (else 0/1)."""
    specs = graph_inputs(model)
    known = {s.name for s in specs}
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise GblrcError(
            f"--shape names unknown input {unknown[0]!r}; the model's inputs are: "
            f"{', '.join(s.describe() for s in specs) or 'none'}"
        )
    rng = np.random.default_rng(seed)
    feeds: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for s in specs:
        given = shapes.get(s.name)
        if given is None:
            dynamic = [d for d in s.dims if not isinstance(d, int) or d < 1]
            if dynamic:
                example = "x".join(
                    str(d) if isinstance(d, int) and d > 0 else ("8" if i == 0 else "128") for i, d in enumerate(s.dims)
                )
                raise GblrcError(
                    f"input {s.name!r} has dynamic dimensions ({' x '.join(map(str, s.dims))}); "
                    f"give them with --shape {s.name}={example}"
                )
            shape = tuple(s.dims)
        else:
            shape = tuple(int(d) for d in given)
            if len(shape) != len(s.dims):
                raise GblrcError(
                    f"--shape {s.name}: {len(shape)} dimensions given, the input has {len(s.dims)} "
                    f"({' x '.join(map(str, s.dims))})"
                )
            for axis, (g, d) in enumerate(zip(shape, s.dims)):
                if isinstance(d, int) and d > 0 and g != d:
                    raise GblrcError(f"--shape {s.name}: dimension {axis} is fixed at {d} in the model, {g} given")
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == np.bool_:
            feeds[s.name] = np.ones(shape, np.bool_)
        elif np.issubdtype(s.dtype, np.integer):
            lname = s.name.lower()
            if "mask" in lname:
                feeds[s.name] = np.ones(shape, s.dtype)
            elif "type" in lname or "segment" in lname:
                feeds[s.name] = np.zeros(shape, s.dtype)
            else:
                bound = _index_bound(model, s.name)
                feeds[s.name] = rng.integers(0, max(2, min(bound, 30000)) if bound else 2, shape).astype(s.dtype)
        else:
            raise GblrcError(f"input {s.name!r} has element type {s.dtype}; gblrc bench makes numbers only")
    return feeds


@dataclass
class BenchResult:
    provider: str
    threads: int
    repeats: int
    sessions: int
    warmup: int
    cuda_graph: bool
    inputs: list[InputSpec]
    shapes: dict  # name -> shape fed
    labels: list[str]
    paths: list[str]
    best: dict  # label -> seconds per run (best session's median)
    medians: dict  # label -> every session's median
    batch: int | None
    agreement: dict = field(default_factory=dict)  # with two models: fidelity of the first to the second
    shapes_from: str = ""  # where the shapes came from when not given ("" = given or fixed in the graph)
    input_pairing: dict = field(default_factory=dict)  # first model's input -> second's, when paired by position

    def ratio(self) -> float | None:
        return self.best[self.labels[0]] / self.best[self.labels[1]] if len(self.labels) == 2 else None

    def lines(self) -> list[str]:
        import onnxruntime as ort

        fed = ", ".join(f"{n}={'x'.join(map(str, s))}" for n, s in self.shapes.items())
        out = [
            f"gblrc bench: ONNX Runtime {ort.__version__}, {self.provider}, {self.threads} "
            f"thread{'s' if self.threads != 1 else ''}; inputs {fed}",
            f"I/O binding{', CUDA graph' if self.cuda_graph else ''}; medians of {self.repeats} interleaved runs "
            f"after {self.warmup} warm-up rounds, best of {self.sessions} fresh sessions",
        ]
        if self.shapes_from:
            out.insert(
                1, f"no --shape given: inputs shaped as {self.shapes_from} ({fed}); --shape NAME=DIMS sets others"
            )
        if self.input_pairing:
            out.append("inputs paired by position: " + ", ".join(f"{a} -> {b}" for a, b in self.input_pairing.items()))
        w = max(12, *(len(k) for k in self.labels))
        out.append(f"{'model':<{w}}  {'time/run':>11}  {'runs/s':>9}" + (f"  {'samples/s':>10}" if self.batch else ""))
        for k in self.labels:
            t = self.best[k]
            row = f"{k:<{w}}  {t * 1e3:>8.3f} ms  {1 / t:>9.2f}"
            out.append(row + (f"  {self.batch / t:>10.1f}" if self.batch else ""))
        r = self.ratio()
        if r is not None:
            a, b = self.labels
            out.append(f"time ratio {a} / {b}: {r:.3f} ({1 / r:.2f}x the throughput)")
            if self.agreement.get("compared"):
                f = self.agreement
                out.append(
                    f"outputs of {a} vs {b}: max rel difference {f['max_rel']:.3g}, cosine mean "
                    f"{f['cosine_mean']:.4f} (min {f['cosine_min']:.4f}) over {f['n']} rows"
                )
            elif self.agreement:
                out.append(f"outputs not compared: {self.agreement.get('why', '')}")
        return out

    def as_dict(self) -> dict:
        import onnxruntime as ort

        models = []
        for k, p in zip(self.labels, self.paths):
            t = self.best[k]
            d = {"label": k, "path": p, "seconds_per_run": t, "session_medians_s": self.medians[k], "runs_per_s": 1 / t}
            if self.batch:
                d["samples_per_s"] = self.batch / t
            models.append(d)
        return {
            "onnxruntime": ort.__version__,
            "provider": self.provider,
            "threads": self.threads,
            "repeats": self.repeats,
            "sessions": self.sessions,
            "warmup": self.warmup,
            "cuda_graph": self.cuda_graph,
            "inputs": {n: list(s) for n, s in self.shapes.items()},
            "batch": self.batch,
            "models": models,
            "time_ratio": self.ratio(),
            "outputs": self.agreement or None,
            "shapes_from": self.shapes_from or None,
            "input_pairing": self.input_pairing or None,  # first model's input -> OTHER's, paired by position
        }


def _labels(paths: Sequence[str]) -> list[str]:
    names = [os.path.basename(p) for p in paths]
    return list(paths) if len(set(names)) < len(names) else names


def bench(
    paths: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    *,
    provider: str = "auto",
    threads: int | None = None,
    repeats: int = 15,
    sessions: int = 3,
    warmup: int = 3,
    cuda_graph: bool = False,
) -> BenchResult:
    """Time the ONNX files ``paths`` (one or two; the first against the second) on the same inputs."""
    from gblrc.export.inspection import load_onnx
    from gblrc.runtime.timing import CUDA, best_of_sessions, effective_threads, resolve_provider, timing_session

    from gblrc.export.options import at_least

    for name, value, low in (("repeats", repeats, 1), ("sessions", sessions, 1), ("warmup", warmup, 0)):
        at_least(name, value, low)
    at_least("threads", threads, 0, "0 (one per core) or more")
    try:
        prov = resolve_provider(provider)
    except ValueError as e:
        raise GblrcError(str(e)) from None
    if cuda_graph and prov != CUDA:
        raise GblrcError("--cuda-graph needs the CUDA provider (--provider cuda)")
    models = [load_onnx(p) for p in paths]
    shapes_from = ""
    if not shapes and any(not isinstance(d, int) or d < 1 for sp in graph_inputs(models[0]) for d in sp.dims):
        recorded = recorded_shapes(models[0])
        if recorded:
            shapes, shapes_from = recorded, f"the example shapes `gblrc lower` recorded in {paths[0]!r}"
    feeds = make_feeds(models[0], shapes)
    per_model, pairing = [feeds], {}
    for p, m in zip(paths[1:], models[1:]):
        f, pairing = _same_feeds(p, m, feeds, paths[0], graph_inputs(models[0]))
        per_model.append(f)
    labels = _labels(paths)
    for p, m, f in zip(paths, models, per_model):  # one session each first: a model that cannot run is named
        try:
            sess = timing_session(m, prov, threads, cuda_graph=cuda_graph)
            sess.run(None, dict(f))
        except Exception as e:
            raise GblrcError(f"cannot run {p!r} on {prov}: {' '.join(str(e).split())[:240]}") from None
    by_label = {k: m for k, m in zip(labels, models)}
    try:
        t = best_of_sessions(
            by_label,
            {k: f for k, f in zip(labels, per_model)},
            provider=prov,
            threads=threads,
            repeats=repeats,
            sessions=sessions,
            warmup=warmup,
            cuda_graph=cuda_graph,
            keep_outputs=len(paths) == 2,
        )
    except Exception as e:
        raise GblrcError(f"timing failed on {prov}: {' '.join(str(e).split())[:240]}") from None
    first = next(iter(feeds.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim >= 1 else None
    agreement = _agreement(t.outputs, labels) if len(paths) == 2 else {}
    return BenchResult(
        provider=prov,
        threads=effective_threads(threads),
        repeats=repeats,
        sessions=sessions,
        warmup=warmup,
        cuda_graph=cuda_graph,
        inputs=graph_inputs(models[0]),
        shapes={k: tuple(v.shape) for k, v in feeds.items()},
        labels=labels,
        paths=[str(p) for p in paths],
        best=t.best,
        medians=t.medians,
        batch=batch,
        agreement=agreement,
        shapes_from=shapes_from,
        input_pairing=pairing,
    )


def _kind(dt: np.dtype) -> str:
    return {"f": "float", "i": "integer", "u": "integer", "b": "bool"}.get(dt.kind, dt.name)


def _fits(a: InputSpec, b: InputSpec) -> bool:
    """Whether ``a`` and ``b`` can be fed the same array: the same rank, the same size on the dimensions
    both fix, the same kind of element (float, integer, bool: an fp16-input model gets the same numbers)."""
    return (
        len(a.dims) == len(b.dims)
        and _kind(a.dtype) == _kind(b.dtype)
        and all(
            not (isinstance(x, int) and x > 0 and isinstance(y, int) and y > 0) or x == y
            for x, y in zip(a.dims, b.dims)
        )
    )


def _pairing(specs: list[InputSpec], firsts: list[InputSpec], path: str, first: str) -> dict:
    """This model's input for each of the first model's: by name when the names agree, else by position when
    the counts agree, each pair can take the same array and no name both have sits at two positions;
    GblrcError (one line, saying why) otherwise.  Returns {first model's name: this model's name}."""
    names, first_names = [s.name for s in specs], [s.name for s in firsts]
    if set(names) == set(first_names):
        return {n: n for n in first_names}
    why = None
    if len(specs) != len(firsts):
        why = f"{len(specs)} input{'s' if len(specs) != 1 else ''} against {len(firsts)}"
    else:
        for a, b in zip(firsts, specs):
            if not _fits(a, b):
                why = f"by position, {a.describe()} and {b.describe()} differ"
                break
            if a.name != b.name and (a.name in names or b.name in first_names):
                shared = a.name if a.name in names else b.name
                why = f"by position, {a.name!r} would feed {b.name!r}, though both models have an input {shared!r}"
                break
    if why is not None:
        raise GblrcError(
            f"{path!r} has inputs {', '.join(s.describe() for s in specs) or 'none'}; {first!r} has "
            f"{', '.join(s.describe() for s in firsts) or 'none'}: bench compares models with the same inputs, "
            f"paired by name or by position ({why})"
        )
    return {a.name: b.name for a, b in zip(firsts, specs)}


def _same_feeds(path: str, model: onnx.ModelProto, feeds: dict, first: str, firsts: list[InputSpec]) -> tuple:
    """``feeds`` (of the first model, from ``first``, whose inputs are ``firsts``) for ``model``: the same values
    in its input types, paired by name or else by position (:func:`_pairing`); GblrcError when its inputs
    cannot be paired or differ in fixed dimensions.  Returns (feeds, pairing): pairing maps the first model's
    input names to this model's when they were paired by position, else is empty."""
    specs = graph_inputs(model)
    pairs = _pairing(specs, firsts, path, first)
    fed = {pairs[k]: v for k, v in feeds.items()}
    f = OrderedDict()
    for s in specs:  # same values, in this model's types (an fp16-input model gets the same numbers)
        f[s.name] = fed[s.name].astype(s.dtype)
        for axis, d in enumerate(s.dims):
            if isinstance(d, int) and d > 0 and (axis >= fed[s.name].ndim or fed[s.name].shape[axis] != d):
                raise GblrcError(
                    f"{path!r}: input {s.name!r} is fixed at {'x'.join(map(str, s.dims))}, "
                    f"fed {'x'.join(map(str, fed[s.name].shape))}"
                )
    return f, ({} if all(a == b for a, b in pairs.items()) else pairs)


def _agreement(outputs: dict, labels: Sequence[str]) -> dict:
    """How the two models' kept outputs agree (fidelity of the first to the second), or why they were not compared."""
    from gblrc.export.precision import fidelity

    a, b = (outputs[k] for k in labels)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return {"compared": False, "why": "the models' outputs differ in number or shape"}
    return {"compared": True, **fidelity([a], [b]).as_dict()}


def recorded_shapes(model: onnx.ModelProto) -> dict | None:
    """The example input shapes `gblrc lower` recorded in the model's metadata (None when there are none)."""
    from gblrc.export.inspection import EXAMPLE_SHAPES_KEY
    from gblrc.export.metadata import get_json

    try:
        d = get_json(model, EXAMPLE_SHAPES_KEY)
        return None if d is None else {str(k): tuple(int(x) for x in v) for k, v in d.items()}
    except (ValueError, TypeError, AttributeError):
        raise GblrcError(f"the model's {EXAMPLE_SHAPES_KEY} metadata is not valid; give --shape") from None
