"""The package's layout: imports run one way along the pipeline, no import cycles (issue 14)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _layout import ALLOWED, cycles, group, import_graph, modules, violations

ROOT = Path(__file__).resolve().parents[1]


def test_the_project_has_no_wrong_way_import_and_no_cycle():
    assert violations(ROOT) == []


def test_the_graph_sees_the_modules_and_their_imports():
    edges, third = import_graph(ROOT)
    assert "gblrc.nn.fit" in edges["gblrc.nn.layer"]  # a module-level import
    assert "gblrc.nn.layer" in edges["gblrc.nn.replace"]  # a lazy import inside a function
    assert "gblrc.ir.structure" in edges["gblrc.passes.base"]  # passes/ installs as gblrc.passes
    assert "torch" in third["gblrc.nn.layer"] and "torch" not in third["gblrc.ir.structure"]
    assert {group(m) for m in edges} == set(ALLOWED)


def test_top_level_is_small_and_every_subpackage_says_what_it_may_import():
    top = [p.name for p in (ROOT / "gblrc").iterdir() if p.suffix == ".py"]
    assert len(top) <= 8, top
    for sub in ("ir", "nn", "io", "learn", "export"):
        doc = (ROOT / "gblrc" / sub / "__init__.py").read_text()
        assert "May import" in doc, sub


def _copy(tmp_path: Path) -> Path:
    for folder in ("gblrc", "passes", "runtime"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _plant(root: Path, rel: str, line: str) -> None:
    p = root / rel
    p.write_text(p.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_a_planted_cycle_fails_with_both_module_names(tmp_path):
    root = _copy(tmp_path)
    _plant(root, "gblrc/nn/masks.py", "from gblrc.nn.layer import GBLRLinear")  # layer imports masks
    v = violations(root)
    assert v == ["import cycle between gblrc.nn.layer, gblrc.nn.masks"]


def test_a_planted_cycle_in_the_passes_fails(tmp_path):
    root = _copy(tmp_path)
    _plant(root, "passes/cost_model.py", "from .lower_segmented import lower_segmented")
    assert any(
        "import cycle" in x and "gblrc.passes.cost_model" in x and "gblrc.passes.lower_segmented" in x
        for x in violations(root)
    )


def test_a_planted_wrong_way_import_fails_with_both_module_names(tmp_path):
    root = _copy(tmp_path)
    _plant(root, "gblrc/ir/conv.py", "from gblrc.io.zoo import minilm_path")
    assert violations(root) == ["wrong-way import: gblrc.ir.conv (ir) imports gblrc.io.zoo (io); ir may import []"]
    _plant(root, "gblrc/nn/masks.py", "import gblrc.learn.train")  # wrong way, and a cycle through train
    assert (
        "wrong-way import: gblrc.nn.masks (nn) imports gblrc.learn.train (learn); nn may import ['errors', 'ir']"
    ) in violations(root)


@pytest.mark.parametrize(
    "rel,line,word",
    [
        ("gblrc/ir/structure.py", "import torch", "torch"),
        ("passes/merge_blocks.py", "import torch", "torch"),
        ("gblrc/ir/cost.py", "import onnx", "onnx"),
        ("runtime/session.py", "import onnx", "onnx"),
    ],
)
def test_forbidden_third_party_imports_fail(tmp_path, rel, line, word):
    root = _copy(tmp_path)
    _plant(root, rel, line)
    v = violations(root)
    assert len(v) == 1 and v[0].startswith("forbidden import") and v[0].split(" imports ")[1].startswith(word)


def test_cycles_finds_only_strongly_connected_groups():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_importing_the_passes_or_the_ir_does_not_import_torch():
    code = "import sys, gblrc.passes, gblrc.ir.structure, gblrc.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_api_is_unchanged():
    import gblrc

    for name in (
        "compress",
        "lower",
        "save",
        "load",
        "GBLRLinear",
        "GBLRConv2d",
        "gaudi_mask",
        "boxcar_mask",
        "Span",
        "Block",
        "Structure",
        "GBLRWeights",
        "StructureError",
        "passes",
        "runtime",
    ):
        assert getattr(gblrc, name) is not None, name
    assert callable(gblrc.GBLRLinear.from_dense)
    assert set(modules(ROOT)) >= {"gblrc.cli", "gblrc.learn.compress", "gblrc.export.lowering"}
