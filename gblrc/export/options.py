"""The settings of `gblrc.lower` as one object, :class:`LowerConfig`, checked where it is made.

``gblrc.lower(model, inputs, "m.onnx", config=LowerConfig(precision="fp16"))``; the older keyword form
``gblrc.lower(model, inputs, "m.onnx", precision="fp16")`` still works: :func:`as_lower_config` maps the
keywords onto the fields (an unknown keyword is a TypeError naming the fields).  The CLI builds the same
object from its flags and takes its defaults from the dataclass's fields, so each default is written once.

A bad setting raises :class:`SettingError`: an :class:`gblrc.errors.OptionError` (the CLI shows the settings
its text names as its flags: ``{quant_mode}`` reads ``quant_mode`` from Python, ``--quant-mode`` from the
CLI) that is also a :class:`gblrc.errors.GblrcError`, as the errors of `lower()` have always been.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from gblrc.errors import GblrcError, OptionError

__all__ = [
    "SettingError",
    "LowerConfig",
    "as_lower_config",
    "PRECISIONS",
    "QUANT_MODES",
    "ATTENTION_OPTIONS",
    "RTOL",
    "ATOL",
    "at_least",
    "check_quant_mode",
]

PRECISIONS = ("fp32", "fp16")
QUANT_MODES = ("dynamic", "static")
ATTENTION_OPTIONS = ("auto", "eager", "sdpa")  # gblrc.export.attention: auto, then its FORMS
OPSETS = range(14, 21)
RTOL, ATOL = 1e-4, 1e-5  # the fp32 graph's parity gate (fp16: gblrc.export.precision.FP16_RTOL / FP16_ATOL)
_NAME = re.compile(r"\{([a-z_]+)\}")


class SettingError(OptionError, GblrcError):
    """A bad value of the setting ``field``; ``text`` may name settings as ``{name}`` (``{field}`` itself is
    put in front when the text does not name it)."""

    def __init__(self, field: str, text: str):
        template = " ".join(str(text).split())
        if "{" + field + "}" not in template:
            template = "{" + field + "} " + template
        self.template = template
        message = _NAME.sub(lambda m: m.group(1), template)
        GblrcError.__init__(self, message)
        self.field = field
        self.text = message.removeprefix(field + " ")

    def __str__(self) -> str:
        return self.message

    def for_flags(self, flags: dict | None = None) -> str:
        """The message with every setting named as its CLI flag (``flags``: name -> flag, default --name)."""
        flags = flags or {}
        return _NAME.sub(lambda m: flags.get(m.group(1)) or "--" + m.group(1).replace("_", "-"), self.template)


def at_least(field: str, value, low: int, what: str = "") -> None:
    """SettingError unless ``value`` is None or at least ``low``."""
    if value is not None and value < low:
        raise SettingError(field, f"must be {what or f'at least {low}'}, got {value}")


def check_quant_mode(mode: str | None, calibrated: bool | None = None) -> None:
    """An int8 quantisation mode (None: dynamic): dynamic, or static with calibration batches (not checked
    when ``calibrated`` is None)."""
    if mode is not None and mode not in QUANT_MODES:
        raise SettingError("quant_mode", f"unknown {{quant_mode}} {mode!r}; choose dynamic or static")
    if mode == "static" and calibrated is not None and not calibrated:
        raise SettingError(
            "quant_mode",
            "{quant_mode} static needs calibration batches: give {calib_feeds} (or use {quant_mode} dynamic)",
        )


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise SettingError(name, f"must be True or False, got {value!r}")


def _names(name: str, value) -> tuple[str, ...] | None:
    """None, or a sequence of strings as a tuple (a lone string is refused: it is not a list of names)."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise SettingError(name, f"must be a list of names (strings) or None, got {value!r}")
    return tuple(value)


def _tolerance(name: str, value) -> None:
    ok = value is None or (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )
    if not ok:
        raise SettingError(name, f"must be a number >= 0, or None (the default), got {value!r}")


def _excludes_keep(name: str) -> SettingError:
    return SettingError(name, "and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)")


@dataclass(frozen=True)
class LowerConfig:
    """How :func:`gblrc.lower` exports, lowers, checks and writes a model (every field has a default).

    Lowering: ``passes`` (pass names; None: gblrc.passes.DEFAULT_PIPELINE), ``keep_gblr_ops`` (no passes:
    the file keeps gblrc::GBLRLinear nodes, which ONNX Runtime cannot run), ``tune`` (True or a
    gblrc.passes.TuneConfig: time each layer's candidate lowerings on the provider and keep the fastest).
    Export: ``opset`` (14 to 20), ``input_names`` (default: the example inputs' keys), ``output_names``
    (default ``output``), ``dynamic_axes``, ``attention`` ("auto": the form ``attention_provider`` with
    ``attention_threads`` runs faster, timed; "eager"; "sdpa").  ``optimize``: ONNX Runtime's transformer
    optimizer on the lowered graph, kept unless it times slower (:mod:`gblrc.export.fusion`).
    Parity gate: ``rtol`` / ``atol`` (None: :data:`RTOL` / :data:`ATOL`; with fp16, those of the fp16 graph,
    default FP16_RTOL / FP16_ATOL).  Precision: ``precision`` ("fp32", "fp16"), ``quantize`` (None,
    "int8") with ``quant_mode`` ("dynamic"; "static": calibrated on ``calib_feeds``, a list of feeds name ->
    array), ``per_channel`` (True, False, "auto": both, the one closer to the fp32 graph kept).
    ``with_dense``: also write the dense reference there.

    Values are checked when the object is made (:class:`SettingError`, one line naming the field); the
    output paths when it is used (:meth:`check_paths`).
    """

    passes: Sequence[str] | None = None
    opset: int = 17
    keep_gblr_ops: bool = False
    rtol: float | None = None
    atol: float | None = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    dynamic_axes: Mapping | None = None
    tune: object = False  # False, True or a gblrc.passes.TuneConfig
    precision: str = "fp32"
    quantize: str | None = None
    quant_mode: str = "dynamic"
    per_channel: bool | str = "auto"
    calib_feeds: Sequence[Mapping] | None = None
    with_dense: str | os.PathLike | None = None
    attention: str = "auto"
    attention_provider: str = "auto"
    attention_threads: int | None = None
    optimize: bool = False

    def __post_init__(self):

        def set_(name, value):  # a normalised value (frozen)
            object.__setattr__(self, name, value)

        o = self.opset
        if isinstance(o, bool) or not isinstance(o, numbers.Integral) or o not in OPSETS:
            default = _DEFAULT_OPSET
            raise SettingError("opset", f"must be an integer from 14 to 20 (default {default}), got {o!r}")
        set_("opset", int(o))
        for name in ("keep_gblr_ops", "optimize"):
            _flag(name, getattr(self, name))
        for name in ("passes", "input_names", "output_names"):
            set_(name, _names(name, getattr(self, name)))
        _tolerance("rtol", self.rtol)
        _tolerance("atol", self.atol)
        if self.dynamic_axes is not None and not isinstance(self.dynamic_axes, Mapping):
            raise SettingError("dynamic_axes", f"must be a dict input name -> axes, or None, got {self.dynamic_axes!r}")
        if not isinstance(self.tune, bool):
            from gblrc.passes import TuneConfig

            if not isinstance(self.tune, TuneConfig):
                raise SettingError("tune", f"must be True, False or a gblrc.passes.TuneConfig, got {self.tune!r}")
        if self.quant_mode is None:
            set_("quant_mode", "dynamic")
        if not (isinstance(self.per_channel, bool) or self.per_channel == "auto"):
            raise SettingError("per_channel", f"must be True, False or 'auto', got {self.per_channel!r}")
        if self.calib_feeds is not None:
            feeds = self.calib_feeds
            if isinstance(feeds, (str, Mapping)) or not isinstance(feeds, Sequence):
                raise SettingError("calib_feeds", f"must be a list of feeds (dicts input name -> array), got {feeds!r}")
            if not all(isinstance(f, Mapping) for f in feeds):
                raise SettingError("calib_feeds", "must be a list of feeds (dicts input name -> array)")
            set_("calib_feeds", tuple(feeds))
        if self.attention not in ATTENTION_OPTIONS:
            raise SettingError(
                "attention", f"unknown {{attention}} form {self.attention!r}; choose {', '.join(ATTENTION_OPTIONS)}"
            )
        if not isinstance(self.attention_provider, str):
            raise SettingError("attention_provider", f"must be auto, cpu or cuda, got {self.attention_provider!r}")
        at_least("attention_threads", self.attention_threads, 0, "0 (one per core) or more")
        if self.optimize and self.keep_gblr_ops:
            raise _excludes_keep("optimize")
        self._check_precision()
        if self.with_dense is not None and self.keep_gblr_ops:
            raise _excludes_keep("with_dense")
        if self.tune and self.keep_gblr_ops:
            raise _excludes_keep("tune")

    def _check_precision(self) -> None:
        if self.precision not in PRECISIONS:
            raise SettingError("precision", f"unknown {{precision}} {self.precision!r}; choose fp32 or fp16")
        if self.quantize not in (None, "int8"):
            raise SettingError("quantize", f"{self.quantize!r} is unknown; the one supported is int8")
        check_quant_mode(self.quant_mode)
        if self.quantize is None:
            if self.keep_gblr_ops and self.precision != "fp32":
                raise SettingError(
                    "precision", "fp16 and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)"
                )
            return
        if self.precision != "fp32":
            raise SettingError(
                "quantize",
                "int8 and {precision} fp16 exclude each other: int8 is for CPUs (ONNX "
                "Runtime quantises the fp32 graph), fp16 for GPUs; choose one",
            )
        if self.keep_gblr_ops:
            raise _excludes_keep("quantize")
        check_quant_mode(self.quant_mode, bool(self.calib_feeds))

    def check_paths(self, path: str | os.PathLike | None) -> None:
        """Before any slow work: the output file ``path`` (None: not checked) and ``with_dense`` can be written,
        and differ."""
        from gblrc.io.fileio import check_output_path

        if path is not None:
            check_output_path(path)
        if self.with_dense is not None:
            check_output_path(self.with_dense)
            if path is not None and Path(self.with_dense).resolve() == Path(path).resolve():
                raise SettingError("with_dense", "names the output file itself; choose another path")

    def replace(self, **changes) -> "LowerConfig":
        """A copy with ``changes`` (field names; an unknown one is a TypeError naming the fields), checked again."""
        return dataclasses.replace(self, **_known(changes)) if changes else self


FIELDS = tuple(f.name for f in dataclasses.fields(LowerConfig))
_DEFAULT_OPSET = next(f.default for f in dataclasses.fields(LowerConfig) if f.name == "opset")


def _known(options: dict) -> dict:
    for k in options:
        if k not in FIELDS:
            raise TypeError(f"unknown lower option {k!r}; LowerConfig has {', '.join(FIELDS)}")
    return options


def as_lower_config(config: LowerConfig | None = None, options: dict | None = None) -> LowerConfig:
    """``config`` (None: the defaults) with the keyword ``options`` (the older form of `gblrc.lower`) applied."""
    if config is None:
        return LowerConfig(**_known(dict(options or {})))
    if not isinstance(config, LowerConfig):
        raise TypeError(f"config must be a gblrc.LowerConfig, got {type(config).__name__}")
    return config.replace(**(options or {}))
