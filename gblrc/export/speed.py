"""How fast a compressed model runs once lowered: dense fp32, lowered fp32 and lowered + int8, timed together.

:func:`lowered_speed` lowers the model the way the default `gblrc lower` does (the default pass pipeline,
parity-gated against PyTorch) with its dense reference (``--with-dense``: every GBLR layer as its dense
MatMul, the baseline of `gblrc bench`), quantises the lowered graph to int8 the way `gblrc lower
--quantize int8` does (dynamic, per-channel chosen by fidelity), and times the three with the project's
harness (:func:`gblrc.runtime.timing.best_of_sessions`: interleaved runs, medians, best of fresh
sessions) on the example inputs.  Everything is built in a temporary folder, removed afterwards.

:func:`measure_speed` puts that into a report (``report["fidelity_search"]["lowered"]``: what `gblrc
compress --target-fidelity` records beside the budget it chose), or, for a model that cannot be exported,
lowered or timed, ``{"skipped": why}`` and one line in ``report["warnings"]``: the compression stands.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import onnx

from gblrc.errors import GblrcError, OptionError

__all__ = ["LABELS", "lowered_speed", "measure_speed", "speed_line"]

LABELS = ("dense_fp32", "lowered_fp32", "lowered_int8")
DENSE_NOTE = "the dense reference: the same graph with every GBLR layer as its dense MatMul (gblrc lower --with-dense)"


def lowered_speed(
    module,
    example_inputs,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    repeats: int = 15,
    sessions: int = 3,
    warmup: int = 3,
) -> dict:
    """Time ``module`` (with GBLR layers) lowered to ONNX, in fp32 and int8, against its dense reference.

    example_inputs: what `gblrc.lower` takes (a tensor, a tuple or a dict name -> tensor); the models are
    exported and timed at these inputs.  provider: "cpu" (default: int8 is for CPUs), "cuda" or "auto";
    threads: intra-op threads (default: one per core).  Returns {"time_ratio_fp32", "time_ratio_int8"
    (each: seconds per run / the dense reference's, same run), "seconds_per_run", "session_medians_s",
    "provider", "threads", "inputs" (name -> shape), "repeats", "sessions", "warmup", "ops" (op counts of
    each model timed), "int8" (mode, per_channel, fidelity to the lowered fp32 graph), "parity", "dense"}.
    GblrcError (one line) when the model cannot be exported, lowered, quantised or run.
    """
    from gblrc.export.graph import normalize_inputs
    from gblrc.runtime.timing import effective_threads, resolve_provider

    from gblrc.export.options import at_least

    for name, value, low in (("repeats", repeats, 1), ("sessions", sessions, 1), ("warmup", warmup, 0)):
        at_least(name, value, low)
    try:
        prov = resolve_provider(provider)
    except ValueError as e:
        raise GblrcError(str(e)) from None
    m = copy.deepcopy(module).cpu().eval()  # the caller's model stays where and as it is
    inputs = normalize_inputs(example_inputs)
    inputs = type(inputs)((k, v.detach().cpu()) for k, v in inputs.items())
    feeds = {k: v.numpy() for k, v in inputs.items()}
    models, facts = _models(m, inputs, feeds, prov, threads)
    best, medians = _time(models, feeds, prov, threads, repeats, sessions, warmup)
    from gblrc.export.lowering import op_counts

    out = {
        "time_ratio_fp32": best["lowered_fp32"] / best["dense_fp32"],
        "time_ratio_int8": best["lowered_int8"] / best["dense_fp32"],
        "seconds_per_run": best,
        "session_medians_s": medians,
        "provider": prov,
        "threads": effective_threads(threads),
        "inputs": {k: list(v.shape) for k, v in feeds.items() if k in _graph_inputs(models["lowered_fp32"])},
        "repeats": repeats,
        "sessions": sessions,
        "warmup": warmup,
        "ops": {k: op_counts(v) for k, v in models.items()},
        **facts,
    }
    for k in ("time_ratio_fp32", "time_ratio_int8"):
        if not (math.isfinite(out[k]) and out[k] > 0):
            raise GblrcError(f"timing gave an invalid {k} ({out[k]}); rerun")
    return out


def measure_speed(model, report: dict, example_inputs, *, log=None, **options) -> dict:
    """:func:`lowered_speed` of ``model`` at ``example_inputs`` (``options``: provider, threads, repeats,
    sessions, warmup) into report["fidelity_search"]["lowered"] (created when missing), and returned.  A
    model that cannot be exported, lowered or timed gets {"skipped": why} there and a line in
    report["warnings"] (not a silent fallback; the compression result stands); a bad setting raises."""
    say = log or (lambda s: None)
    say("  timing the result lowered to ONNX: dense fp32, lowered fp32, lowered + int8")
    try:
        got = lowered_speed(model, example_inputs, **options)
    except OptionError:  # a bad setting (repeats, ...) is the caller's to fix, not the model's
        raise
    except Exception as e:  # the model cannot be exported / lowered / run: said, and the compression stands
        why = " ".join(str(e).split())[:300] or type(e).__name__
        got = {"skipped": why}
        report.setdefault("warnings", []).append(
            f"speed of the lowered model not measured (the compression result stands): {why}"
        )
    report.setdefault("fidelity_search", {})["lowered"] = got
    return got


def _graph_inputs(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.input}


def _models(module, inputs, feeds: dict, provider: str, threads) -> tuple[dict, dict]:
    """{label: ModelProto} of the dense reference, the lowered fp32 model and its int8 copy, and the facts
    of their making (parity, int8 settings and fidelity), built in a temporary folder."""
    from gblrc.export.lowering import lower
    from gblrc.export.precision import quantize_checked

    with tempfile.TemporaryDirectory(prefix="gblrc-speed-") as d:
        path, dense_path = Path(d, "model.onnx"), Path(d, "dense.onnx")
        rep = lower(
            module,
            inputs,
            path,
            with_dense=dense_path,
            attention_provider=provider,
            attention_threads=threads,
        )
        lowered, dense = onnx.load(str(path)), onnx.load(str(dense_path))
    used = _graph_inputs(lowered)
    q, per_channel, fid, candidates = quantize_checked(
        lowered, [{k: v for k, v in feeds.items() if k in used}], mode="dynamic", per_channel="auto"
    )
    facts = {
        "int8": {"mode": "dynamic", "per_channel": per_channel, "fidelity": fid.as_dict(), "candidates": candidates},
        "parity": {"lowered_max_rel_err": rep.max_rel_err, "dense_max_rel_err": rep.dense_max_rel_err},
        "gblr_layers": rep.gblr_layers,
        "dense": DENSE_NOTE,
    }
    return {"dense_fp32": dense, "lowered_fp32": lowered, "lowered_int8": q}, facts


def _time(models: dict, feeds: dict, provider: str, threads, repeats: int, sessions: int, warmup: int):
    """(best seconds per run, every session's median) of each model, the three interleaved."""
    from gblrc.runtime.timing import best_of_sessions

    try:
        t = best_of_sessions(
            models, feeds, provider=provider, threads=threads, repeats=repeats, sessions=sessions, warmup=warmup
        )
    except Exception as e:
        raise GblrcError(f"timing the lowered models failed on {provider}: {' '.join(str(e).split())[:240]}") from None
    return {k: float(t.best[k]) for k in LABELS}, {k: [float(x) for x in t.medians[k]] for k in LABELS}


def speed_line(speed: dict) -> str:
    """``lowered fp32 0.61x dense time, + int8 0.38x (ONNX Runtime CPU, 2 threads, inputs 8x64)``."""
    prov = {"CPUExecutionProvider": "CPU", "CUDAExecutionProvider": "CUDA"}.get(speed["provider"], speed["provider"])
    shapes = speed["inputs"]
    if len(shapes) == 1:
        fed = "inputs " + "x".join(map(str, next(iter(shapes.values()))))
    else:
        fed = ", ".join(f"{k}={'x'.join(map(str, s))}" for k, s in shapes.items())
    n = speed["threads"]
    return (
        f"lowered fp32 {speed['time_ratio_fp32']:.2f}x dense time, + int8 {speed['time_ratio_int8']:.2f}x "
        f"(ONNX Runtime {prov}, {n} thread{'s' if n != 1 else ''}, {fed})"
    )
