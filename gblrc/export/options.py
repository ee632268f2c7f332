"""The checks of `gblrc.lower`'s settings, written once: `lower()` makes them, and the CLI calls them early.

A bad setting raises :class:`SettingError`: an :class:`gblrc.errors.OptionError` (the CLI shows the settings
its text names as its flags: ``{quant_mode}`` reads ``quant_mode`` from Python, ``--quant-mode`` from the
CLI) that is also a :class:`gblrc.errors.GblrcError`, as the errors of `lower()` have always been.
"""

from __future__ import annotations

import numbers
import os
import re
from pathlib import Path

from gblrc.errors import GblrcError, OptionError

__all__ = ["SettingError", "PRECISIONS", "QUANT_MODES", "at_least", "check_quant_mode", "check_lower_options"]

PRECISIONS = ("fp32", "fp16")
QUANT_MODES = ("dynamic", "static")
OPSETS = range(14, 21)
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


def _check_precision(
    precision: str,
    quantize: str | None,
    quant_mode: str | None,
    keep_gblr_ops: bool,
    calib_feeds,
    calib_batches: int | None,
) -> None:
    if precision not in PRECISIONS:
        raise SettingError("precision", f"unknown {{precision}} {precision!r}; choose fp32 or fp16")
    if quantize not in (None, "int8"):
        raise SettingError("quantize", f"{quantize!r} is unknown; the one supported is int8")
    check_quant_mode(quant_mode)
    if quantize is None:
        if keep_gblr_ops and precision != "fp32":
            raise SettingError(
                "precision", "fp16 and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)"
            )
        return
    if precision != "fp32":
        raise SettingError(
            "quantize",
            "int8 and {precision} fp16 exclude each other: int8 is for CPUs (ONNX "
            "Runtime quantises the fp32 graph), fp16 for GPUs; choose one",
        )
    if keep_gblr_ops:
        raise SettingError("quantize", "and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)")
    check_quant_mode(quant_mode, bool(calib_feeds))
    at_least("calib_batches", calib_batches, 1)


def check_lower_options(
    path: str | os.PathLike | None = None,
    *,
    opset: int = 17,
    keep_gblr_ops: bool = False,
    precision: str = "fp32",
    quantize: str | None = None,
    quant_mode: str | None = "dynamic",
    calib_feeds=None,
    calib_batches: int | None = None,
    with_dense=None,
    optimize: bool = False,
    tune=False,
) -> None:
    """Check the settings of :func:`gblrc.export.lowering.lower` together, before any slow work.

    path: the output file (None: not checked here); calib_feeds: the calibration batches, or anything
    that stands for them (the CLI's --data); calib_batches: how many of them
    (:func:`gblrc.export.inputs.calibration_feeds`)."""
    from gblrc.io.fileio import check_output_path

    if path is not None:
        check_output_path(path)
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset not in OPSETS:
        raise SettingError("opset", f"must be an integer from 14 to 20 (default 17), got {opset!r}")
    if optimize and keep_gblr_ops:
        raise SettingError("optimize", "and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)")
    _check_precision(precision, quantize, quant_mode, keep_gblr_ops, calib_feeds, calib_batches)
    if with_dense is not None:
        if keep_gblr_ops:
            raise SettingError("with_dense", "and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)")
        check_output_path(with_dense)
        if path is not None and Path(with_dense).resolve() == Path(path).resolve():
            raise SettingError("with_dense", "names the output file itself; choose another path")
    if tune and keep_gblr_ops:
        raise SettingError("tune", "and {keep_gblr_ops} exclude each other ({keep_gblr_ops} does not lower)")
