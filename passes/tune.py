"""Autotuning (`gblrc lower --tune`): the calibrated cost model for the decisions, timing for the lowering.

    out, results, setup = run_tuned_pipeline(model, TuneConfig(tokens=1024, threads=2))

1. The cost model is calibrated on the provider the model will run on (calibrate.py; cached).
2. The pipeline is pipeline.timed_pipeline (TIMED_PIPELINE): the default one with its cost-model
   passes (merge-blocks, choose-products, ...) given the calibrated model, dense-fallback dropped and
   lower-gblr replaced by lower-timed: every layer's candidate lowerings (dense among them) are timed
   and the fastest kept, the times cached per layer (lower_timed.TuneCache), so tuning the same model
   again measures nothing.  Given pass names, pipeline.passes_from_names configures them alike.

TuneConfig's timing defaults are timing.DEFAULT_TIMING's, which lower-timed reached by name uses too.
The static default pipeline stays as it is: no timing, no onnxruntime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import onnx

from .base import PassConfig, PassResult, Pipeline
from .calibrate import Calibration, calibrated_cost_model
from .cost_model import CostModel
from .lower_timed import Measure
from .pipeline import TIMED_PIPELINE, passes_from_names, timed_pipeline
from .timing import (
    DEFAULT_TIMING,
    RECHECK_ABOVE,
    TUNE_MARGIN,
    TimingConfig,
    cache_dir,
    effective_threads,
    resolve_provider,
)

__all__ = [
    "TuneConfig",
    "TuneSetup",
    "TUNE_MARGIN",
    "RECHECK_ABOVE",
    "prepare_tuning",
    "tuned_pipeline",
    "run_tuned_pipeline",
    "format_tuning",
]


@dataclass
class TuneConfig:
    """How to tune.  tokens: rows of X to time with (batch x sequence); threads: intra-op threads
    (0: one per core); provider: auto (CUDA when available), cpu or cuda; cache: the cache folder
    (None: $GBLRC_CACHE_DIR or ~/.cache/gblrc); use_cache: read and write the cache; repeats:
    timed runs per candidate (median); margin, recheck_above: see TimedLowering.  For tests: cost_model skips the
    calibration, measure replaces the timing of the candidates, calibration_measure that of the
    calibration."""

    tokens: int | None = None  # None: gblrc.lower takes it from the example inputs; else DEFAULT_TIMING.tokens
    threads: int = DEFAULT_TIMING.threads
    provider: str = DEFAULT_TIMING.provider
    cache: str | os.PathLike | None = DEFAULT_TIMING.cache
    use_cache: bool = DEFAULT_TIMING.use_cache
    repeats: int = DEFAULT_TIMING.repeats
    margin: float = DEFAULT_TIMING.margin
    recheck_above: float = DEFAULT_TIMING.recheck_above
    cost_model: CostModel | None = None
    measure: Measure | None = None
    calibration_measure: Callable | None = None


@dataclass
class TuneSetup:
    """A TuneConfig resolved: the provider and threads used, the cost model and its calibration."""

    config: TuneConfig
    provider: str
    threads: int
    cost_model: CostModel
    calibration: Calibration | None = None
    cache_folder: Path | None = None
    passes: list[str] = field(default_factory=list)

    @property
    def timing(self) -> TimingConfig:
        """How lower-timed times, as the config and the resolved provider, threads and cache say."""
        c = self.config
        return TimingConfig(
            tokens=c.tokens,
            repeats=c.repeats,
            threads=self.threads,
            provider=self.provider,
            margin=c.margin,
            recheck_above=c.recheck_above,
            use_cache=self.cache_folder is not None,
            cache=self.cache_folder,
        )

    def pass_config(self) -> PassConfig:
        """The configuration of the tuned passes: the calibrated cost model, the timing, the config's measure."""
        return PassConfig(cost_model=self.cost_model, timing=self.timing, measure=self.config.measure)


def prepare_tuning(config: TuneConfig) -> TuneSetup:
    """Resolve the provider and threads and get the calibrated cost model (cached)."""
    if config.tokens is None:
        config = replace(config, tokens=DEFAULT_TIMING.tokens)
    if config.tokens < 1 or config.repeats < 1:
        raise ValueError(f"tokens and repeats must be positive, got {config.tokens}, {config.repeats}")
    provider = resolve_provider(config.provider)
    threads = effective_threads(config.threads)
    folder = cache_dir(config.cache) if config.use_cache else None
    cal = None
    model = config.cost_model
    if model is None:
        cal = calibrated_cost_model(
            provider,
            threads,
            config.tokens,
            cache=config.cache,
            use_cache=config.use_cache,
            measure=config.calibration_measure,
        )
        model = cal.model
    return TuneSetup(config, provider, threads, model, cal, folder)


def tuned_pipeline() -> list[str]:
    """The names of the tuned pipeline (TIMED_PIPELINE, built by pipeline.timed_pipeline)."""
    return list(TIMED_PIPELINE)


def run_tuned_pipeline(
    model: onnx.ModelProto, config: TuneConfig | None = None, names: Sequence[str] | None = None
) -> tuple[onnx.ModelProto, list[PassResult], TuneSetup]:
    """Run the tuned pipeline (or the passes ``names``) configured by ``config``; an unknown name raises
    UnknownPassError before the calibration."""
    if names is not None:
        passes_from_names(names)  # the unknown-pass check, before the (slow) calibration
    setup = prepare_tuning(config or TuneConfig())
    pc = setup.pass_config()
    if names is None:
        pipeline = timed_pipeline(pc.cost_model, pc.timing, measure=pc.measure)
    else:
        pipeline = Pipeline(passes_from_names(names, pc))
    setup.passes = list(pipeline.names)
    out, results = pipeline(model)
    return out, results, setup


def format_tuning(details: Sequence[dict]) -> list[str]:
    """One line per tuned layer and a summary line."""
    lines = []
    for d in details:
        others = ", ".join(
            f"{k} {v / d['times']['dense']:.2f}"
            for k, v in sorted(d["times"].items())
            if k != "dense" and "dense" in d["times"]
        )
        head = (
            f"tune {d['node'] or '?'} ({d['out']}x{d['in']}, {d['blocks']} blocks, FLOP ratio "
            f"{d['flop_ratio']:.2f}): {d['choice']}"
        )
        if "dense" not in d["times"]:
            lines.append(
                f"{head} (not timed: no cheaper structure)"
                if not d["times"]
                else f"{head} (times: "
                + ", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in sorted(d["times"].items()))
                + ")"
            )
            continue
        rc = d.get("recheck")
        again = (
            "; rechecked: " + ", ".join(f"{k} {v / rc['dense']:.2f}" for k, v in sorted(rc.items()) if k != "dense")
            if rc and "dense" in rc
            else ""
        )
        lines.append(
            f"{head} {d['ratio']:.2f}x dense (dense {1e3 * d['times']['dense']:.3g} ms"
            f"{'; ' + others if others else ''}{again}){' [cached]' if d['cached'] else ''}"
        )
    if details:
        by = {}
        for d in details:
            by[d["choice"]] = by.get(d["choice"], 0) + 1
        timed = [d for d in details if "dense" in d["times"] and d["choice"] in d["times"]]
        tot_dense = sum(d["times"]["dense"] for d in timed)
        tot = sum(d["times"][d["choice"]] for d in timed)
        cached = sum(d["cached"] for d in details)
        lines.append(
            f"tuned {len(details)} layers ({cached} from cache): "
            + ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
            + (f"; timed layers together {tot / tot_dense:.2f}x dense" if tot_dense > 0 else "")
        )
    return lines
