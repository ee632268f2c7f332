"""Choose the budget by fidelity: the smallest budget whose held-out fidelity meets a target.

``compress_to_fidelity(model, 0.98, data=D, eval_data=E)``:

1. the fidelity of the cheap post-training compression (data-aware init, sequential refit, allocation;
   ``steps=0``) is measured at the largest allowed budget, then bisected over log-budget until the
   smallest budget meeting the target is bracketed to within ``tolerance`` of fidelity (or ~5% of budget);
2. with ``steps == 0`` that is the answer;
3. with training, the model is trained at that budget; training only adds fidelity, so when it lands
   more than ``tolerance`` above the target, the measured gain (in log(1 - cosine)) is carried to the
   init curve to pick a smaller budget, which is trained too and kept if it still meets the target.

Fidelity is the mean cosine to the dense model's outputs on ``eval_data`` (:mod:`gblrc.learn.fidelity`),
held out from ``data`` when no ``eval_data`` is given.  A target not met at the largest budget is a
ValueError, never a silent dense model.
"""

from __future__ import annotations

import copy
import math

import torch

from gblrc.errors import OptionError
from gblrc.learn.data import _rows, batch_rows
from gblrc.learn.fidelity import Fidelity, eval_batches, split_holdout

__all__ = ["compress_to_fidelity", "check_target", "holdout"]

MIN_BUDGET = 0.02


def holdout(data, fraction: float = 0.15):
    """(training data, held-out data) split from ``data`` (a Tensor, {"inputs", "targets"}, a text
    batcher with ``lines`` or an iterable of batches)."""
    if torch.is_tensor(data) or (isinstance(data, dict) and "inputs" in data):
        x, y = (data, None) if torch.is_tensor(data) else (data["inputs"], data.get("targets"))
        n = batch_rows(x)
        k = max(1, int(round(n * fraction)))
        if n - k < 1:
            raise ValueError("too little data to hold some out for judging fidelity; give eval data or more data")
        tr, ev = slice(0, n - k), slice(n - k, n)
        if torch.is_tensor(data):
            return _rows(x, tr), _rows(x, ev)
        return (
            {"inputs": _rows(x, tr), **({} if y is None else {"targets": y[tr]})},
            {"inputs": _rows(x, ev), **({} if y is None else {"targets": y[ev]})},
        )
    if hasattr(data, "lines") and hasattr(data, "with_lines"):  # gblrc.io.datafiles.TextBatches
        lines = data.lines
        k = max(1, int(round(len(lines) * fraction)))
        if len(lines) - k < 1:
            raise ValueError("too little text to hold some out for judging fidelity; give eval data or more lines")
        return data.with_lines(lines[:-k]), data.with_lines(lines[-k:])
    batches = list(data() if callable(data) and not hasattr(data, "__iter__") else data)
    return split_holdout(batches, fraction)


def _log_gap(f: float) -> float:
    return math.log(max(1e-6, 1.0 - f))


def check_target(target, has_data: bool, resume: bool = False) -> float:
    """The target fidelity as a float; OptionError when it is not a cosine in (0, 1), when there is no
    data to measure it on, or with ``resume`` (the search keeps no checkpoints)."""
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise OptionError("target_fidelity", f"must be a cosine in (0, 1), e.g. 0.98; got {target!r}") from None
    if not (0.0 < t < 1.0):
        raise OptionError("target_fidelity", f"must be a cosine in (0, 1), e.g. 0.98; got {target}")
    if not has_data:
        raise OptionError("target_fidelity", "needs --data (to initialise and to measure fidelity on)")
    if resume:
        raise OptionError("resume", "does not apply with a target fidelity (its runs keep no checkpoints)")
    return t


def compress_to_fidelity(
    model,
    target: float,
    *,
    data,
    eval_data=None,
    max_budget: float | None = None,
    steps: int | None = None,
    tolerance: float = 0.005,
    max_evals: int = 10,
    log=None,
    config=None,
    **kw,
):
    """Compress a copy of ``model`` at the smallest budget whose held-out fidelity is >= ``target``.

    The settings of every run: ``config`` (a CompressConfig: its budget is the largest allowed, its steps
    the training at the chosen budget) or :func:`gblrc.compress` keywords ``kw``; ``max_budget`` (default
    1.0) and ``steps`` (default 200) override them.  Returns (model, report); report["fidelity_search"]
    holds the measured curve [{"budget", "cosine", "trained"}], the chosen budget and the held-out set.
    """
    from gblrc.learn.config import as_config

    base = as_config(config if config is not None else 1.0, kw).replace(
        **{k: v for k, v in (("budget", max_budget), ("steps", steps)) if v is not None}
    )
    max_budget, steps = base.budget, base.steps
    target = check_target(target, data is not None, base.training.resume)
    held = "given" if eval_data is not None else "held out from the data"
    if eval_data is None:
        data, eval_data = holdout(data)
    judge = Fidelity(model, eval_batches(eval_data))  # ``model`` stays dense: every run compresses a copy
    say = log or (lambda s: None)
    run = _Runs(model, base, data, judge, say)
    curve = run.curve
    kept: dict[float, tuple] = {}
    hi = float(max_budget)
    m, rep, f_hi = run(hi, 0)
    kept[hi] = (m, rep)
    if f_hi < target and steps == 0:
        raise ValueError(
            f"fidelity {target} is out of reach: {f_hi:.4f} at budget {hi:g} "
            f"(the largest allowed); lower the target or allow a larger budget"
        )
    if f_hi >= target:
        hi, f_hi, kept = _bisect(run, target, hi, f_hi, kept, tolerance, max_evals)
    inits = sorted((p["budget"], p["cosine"]) for p in curve if not p["trained"])
    chosen = hi
    if steps > 0:
        m, rep, f_t = run(hi, steps)
        if f_t < f_hi:  # training lost held-out fidelity: keep the post-training compression (model selection)
            m, rep = kept[hi]
            f_t = f_hi
            say(f"  training lowered the held-out fidelity at budget {hi:.3f}; kept the initialisation")
        if f_t < target:
            raise ValueError(
                f"fidelity {target} is out of reach: {f_t:.4f} after training at budget {hi:g}"
                + (" (the largest allowed)" if hi >= max_budget else "")
                + "; lower the target, allow a larger budget or train longer"
            )
        kept = {hi: (m, rep)}
        gain = _log_gap(f_hi) - _log_gap(f_t)  # how much training closed the gap, in log(1 - cosine)
        if f_t - target > 2 * tolerance and gain > 0:
            want = _log_gap(target) + gain  # the init fidelity that training would lift to the target
            b2 = _budget_at(inits, 1.0 - math.exp(want))
            if b2 is not None and b2 < hi * 0.97:
                m2, rep2, f2 = run(b2, steps)
                if f2 >= target:
                    chosen, kept = b2, {b2: (m2, rep2)}
    m, rep = kept[chosen]
    return m, _with_search(rep, judge(m), judge, target, chosen, held, curve)


class _Runs:
    """The search's runs: each compresses a copy of the dense ``model`` at one budget (trained for some
    steps or not), judges it and adds the point to ``curve``; called as ``run(budget, steps)``."""

    def __init__(self, model, base, data, judge: Fidelity, say):
        self.model, self.base, self.data, self.judge, self.say = model, base, data, judge, say
        self.curve: list[dict] = []

    def __call__(self, b: float, n_steps: int):
        from gblrc.learn.compress import compress

        m, rep = compress(copy.deepcopy(self.model), self.base.replace(budget=b, steps=n_steps), data=self.data)
        f = self.judge(m)
        self.curve.append(
            {
                "budget": round(b, 4),
                "achieved_ratio": rep["achieved_ratio"],
                "cosine": f["cosine"],
                "cosine_min": f["cosine_min"],
                "trained": n_steps > 0,
            }
        )
        self.say(
            f"  budget {b:.3f}: fidelity {f['cosine']:.4f}" + (f" after {n_steps} steps" if n_steps else " (init)")
        )
        return m, rep, f["cosine"]


def _bisect(run: _Runs, target: float, hi: float, f_hi: float, kept: dict, tolerance: float, max_evals: int):
    """Bisect log-budget between MIN_BUDGET and ``hi`` (which meets ``target``, fidelity ``f_hi``) with
    untrained runs: the smallest budget found meeting the target, its fidelity and {budget: (model, report)}."""
    lo = MIN_BUDGET
    for _ in range(max_evals):
        if f_hi - target <= tolerance or hi / lo < 1.05:
            break
        mid = math.sqrt(lo * hi)
        m, rep, f = run(mid, 0)
        if f >= target:
            hi, f_hi = mid, f
            kept = {hi: (m, rep)}
        else:
            lo = mid
    return hi, f_hi, kept


def _with_search(rep: dict, final: dict, judge: Fidelity, target: float, chosen: float, held: str, curve) -> dict:
    """A copy of the chosen run's report with its final fidelity and the search (target, budget, curve)."""
    rep = dict(rep)
    rep["fidelity"] = {"examples": judge.examples, "dense": judge.dense, "final": final}
    rep["fidelity_search"] = {
        "target": target,
        "chosen_budget": round(chosen, 4),
        "eval_set": held,
        "curve": sorted(curve, key=lambda p: (p["trained"], p["budget"])),
    }
    return rep


def _budget_at(points: list[tuple[float, float]], f: float) -> float | None:
    """The budget where the (budget, cosine) init curve reaches ``f`` (log-linear interpolation)."""
    pts = [(b, c) for b, c in points]
    for (b0, c0), (b1, c1) in zip(pts, pts[1:]):
        if c0 <= f <= c1 and c1 > c0:
            t = (f - c0) / (c1 - c0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    if pts and f <= pts[0][1]:
        return pts[0][0]
    return None
