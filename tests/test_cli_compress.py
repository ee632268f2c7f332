"""`gblrc compress`: end to end on tiny models, and every bad input ending in a one-line error."""

from __future__ import annotations

import json
import subprocess

import click
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import gblrc
from gblrc.cli import main
from gblrc.nn.layer import GBLRLinear


pytestmark = pytest.mark.usefixtures("one_thread")


class UserCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        return self.out(self.fc(x).relu())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small trained classifier (torch.nn classes only) and its data, as the CLI's inputs."""
    d = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = x[:, :4].argmax(1)  # learnable 4-class labels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.eval(), d / "mlp.pt")
    torch.save({"inputs": x, "targets": y}, d / "data.pt")
    return d


def invoke(*args):
    return CliRunner().invoke(main, ["compress", *map(str, args)], catch_exceptions=True)


def assert_user_error(r, out, *words):
    """Non-zero exit, a last line that is a one-line error, no traceback, no output file."""
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    text = r.output.strip()
    assert "Traceback" not in text
    last = text.splitlines()[-1]
    assert last.startswith("Error: "), text
    for w in words:
        assert w.lower() in last.lower(), last
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")) if out.parent.is_dir() else True
    return last


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_compress_meets_budget_and_writes_loadable_outputs(files, tmp_path, budget):
    out = tmp_path / "m.gblr.pt"
    r = invoke(
        files / "mlp.pt",
        "--budget",
        budget,
        "--data",
        files / "data.pt",
        "--steps",
        30,
        "--batch-size",
        64,
        "-o",
        out,
        "--checkpoint-every",
        10,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.gblr.pt.report.json").read_text())
    assert rep["achieved_ratio"] <= budget + 1e-12
    assert rep["achieved_ratio"] >= budget - 0.02, rep["achieved_ratio"]
    assert rep["gblr_cost"] <= budget * rep["dense_cost"]
    # the default rule leaves the output layer (4 x 48) dense
    assert [L["name"] for L in rep["layers"]] == ["0", "2"] and rep["loss_curve"]
    assert 0.0 <= rep["accuracy_after"] <= 1.0 and rep["accuracy_before"] > 0.8
    assert "total" in r.output and "blocks" in r.output  # the summary table
    assert (tmp_path / "m.gblr.pt.structure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "m.gblr.pt.ckpt").exists()  # checkpoints removed after success
    m = gblrc.load(out)
    assert not m.training and sum(isinstance(x, GBLRLinear) for x in m.modules()) == 2
    assert sum(x.flops() for x in m.modules() if isinstance(x, GBLRLinear)) == rep["gblr_cost"]
    ((name, ex),) = m.gblrc_example_inputs.items()
    assert name == "input" and ex.shape == (2, 16)
    assert m(*m.gblrc_example_inputs.values()).shape == (2, 4)
    acc = float(
        (m(torch.load(files / "data.pt")["inputs"]).argmax(1) == torch.load(files / "data.pt")["targets"])
        .float()
        .mean()
    )
    assert abs(acc - rep["accuracy_after"]) < 1e-6  # the report measures the saved model


def test_no_data_initialises_with_a_warning(files, tmp_path):
    out = tmp_path / "init.gblr.pt"
    r = invoke(files / "mlp.pt", "--budget", "0.6", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert "warning: no data given" in r.output
    rep = json.loads((tmp_path / "init.gblr.pt.report.json").read_text())
    assert 0.58 <= rep["achieved_ratio"] <= 0.6
    assert gblrc.load(out).gblrc_example_inputs["input"].shape == (2, 16)


def test_default_output_beside_model(files, tmp_path):
    import shutil

    shutil.copy(files / "mlp.pt", tmp_path / "net.pt")
    r = invoke(tmp_path / "net.pt", "--budget", "0.5", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "net.gblr.pt").is_file() and (tmp_path / "net.gblr.pt.report.json").is_file()


@pytest.mark.parametrize("budget", ["0", "-0.1", "1.5", "abc", "nan"])
def test_bad_budget(files, tmp_path, budget):
    out = tmp_path / "o.pt"
    assert_user_error(invoke(files / "mlp.pt", "--budget", budget, "-o", out), out, "budget")


def test_missing_and_corrupt_model(files, tmp_path):
    out = tmp_path / "o.pt"
    assert_user_error(invoke(tmp_path / "nope.pt", "--budget", "0.5", "-o", out), out, "does not exist")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a model" * 20)
    assert_user_error(invoke(bad, "--budget", "0.5", "-o", out), out, "not a valid PyTorch file")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((files / "mlp.pt").read_bytes()[:500])
    assert_user_error(invoke(trunc, "--budget", "0.5", "-o", out), out)


def test_no_compressible_layer(tmp_path):
    p, out = tmp_path / "conv.pt", tmp_path / "o.pt"
    torch.save(nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU()), p)
    assert_user_error(invoke(p, "--budget", "0.5", "-o", out), out, "no compressible layer")


def test_include_matching_nothing(files, tmp_path):
    out = tmp_path / "o.pt"
    assert_user_error(
        invoke(files / "mlp.pt", "--budget", "0.5", "--include", "^nothing$", "-o", out), out, "no compressible layer"
    )
    assert_user_error(
        invoke(files / "mlp.pt", "--budget", "0.5", "--include", "([", "-o", out), out, "regular expression"
    )


def test_data_that_does_not_fit(files, tmp_path):
    out, bad = tmp_path / "o.pt", tmp_path / "wide.pt"
    torch.save({"inputs": torch.randn(32, 7), "targets": torch.zeros(32, dtype=torch.long)}, bad)
    assert_user_error(invoke(files / "mlp.pt", "--budget", "0.5", "--data", bad, "-o", out), out, "does not fit")
    text = tmp_path / "lines.txt"
    text.write_text("a sentence\n")
    assert_user_error(invoke(files / "mlp.pt", "--budget", "0.5", "--data", text, "-o", out), out, "Hugging Face")


def test_nan_weights(files, tmp_path):
    m = torch.load(files / "mlp.pt", weights_only=False)
    with torch.no_grad():
        m[2].weight[3, 5] = float("nan")
    p, out = tmp_path / "nan.pt", tmp_path / "o.pt"
    torch.save(m, p)
    assert_user_error(invoke(p, "--budget", "0.5", "-o", out), out, "NaN")


def test_unwritable_outputs(files, tmp_path):
    assert_user_error(
        invoke(files / "mlp.pt", "--budget", "0.5", "-o", tmp_path / "missing" / "o.pt"), None, "does not exist"
    )
    f = tmp_path / "a_file"
    f.write_text("x")
    assert_user_error(invoke(files / "mlp.pt", "--budget", "0.5", "-o", f / "o.pt"), None, "not a folder")
    ro = tmp_path / "readonly"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (root ignores permission bits)")
    try:
        assert_user_error(invoke(files / "mlp.pt", "--budget", "0.5", "-o", ro / "o.pt"), ro / "o.pt", "not writable")
    finally:
        subprocess.run(["chattr", "-i", str(ro)])


def test_pickle_with_code_needs_the_trust_flag(tmp_path):
    p, out = tmp_path / "custom.pt", tmp_path / "o.pt"
    torch.save(UserCode(), p)
    assert_user_error(invoke(p, "--budget", "0.5", "-o", out), out, "--trust-pickle")
    r = invoke(p, "--budget", "0.5", "-o", out, "--trust-pickle", "-q")
    assert r.exit_code == 0, r.output
    assert isinstance(gblrc.load(out, trust_pickle=True).fc, GBLRLinear)


def test_stale_checkpoint_needs_resume(files, tmp_path):
    out = tmp_path / "o.pt"
    (tmp_path / "o.pt.ckpt").mkdir()
    assert_user_error(invoke(files / "mlp.pt", "--budget", "0.5", "-o", out), out, "--resume")


def test_help_lists_the_options():
    r = CliRunner().invoke(main, ["compress", "--help"])
    assert r.exit_code == 0
    for opt in (
        "--budget",
        "--data",
        "--steps",
        "--include",
        "--exclude",
        "--resume",
        "--checkpoint-every",
        "--trust-pickle",
        "--trust-remote-code",
        "-o, --output",
    ):
        assert opt in r.output


def test_hugging_face_folder_with_text_data(tmp_path):
    """A (random, tiny) BERT folder with MiniLM's real tokenizer, distilled on English text lines."""
    import shutil

    from transformers import BertConfig, BertModel

    from gblrc.io.zoo import english_sentences, minilm_path

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    torch.manual_seed(0)
    d = tmp_path / "bert"
    BertModel(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / f).exists():
            shutil.copy(minilm_path() / f, d / f)
    txt = tmp_path / "sentences.txt"
    txt.write_text("\n".join(english_sentences()[:48]) + "\n")
    r = invoke(d, "--budget", "0.5", "--data", txt, "--steps", 6, "--batch-size", 8, "-q")
    assert r.exit_code == 0, r.output
    out = tmp_path / "bert.gblr.pt"  # default: beside the folder
    rep = json.loads((tmp_path / "bert.gblr.pt.report.json").read_text())
    assert 0.48 <= rep["achieved_ratio"] <= 0.5
    assert len(rep["layers"]) == 6  # q, k, v, attention output, intermediate, output; the pooler stays dense
    m = gblrc.load(out)
    assert type(m).__name__ == "BertModel" and list(m.gblrc_example_inputs) == ["input_ids", "attention_mask"]
    assert sum(x.flops() for x in m.modules() if isinstance(x, GBLRLinear)) == rep["gblr_cost"]
    with torch.no_grad():
        h = m(*m.gblrc_example_inputs.values()).last_hidden_state
    assert h.shape[-1] == 32 and torch.isfinite(h).all()
    assert rep["agreement_with_dense"]["examples"] == 48

    # the compress output lowers from the CLI with no extra flags, and runs at another batch/sequence shape
    import numpy as np
    import onnx

    from gblrc.runtime import make_session

    onnx_path = tmp_path / "bert.onnx"
    r = CliRunner().invoke(main, ["lower", str(out), "-o", str(onnx_path)])
    assert r.exit_code == 0, r.output
    assert "max rel error" in r.output
    assert not [n for n in onnx.load(onnx_path).graph.node if n.domain == "gblrc"]
    ids = torch.randint(1000, 2000, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    sess = make_session(onnx_path, log=False)
    y = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = m(ids, mask).last_hidden_state.double().numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_gpt2_style_folder_with_token_tensors(tmp_path):
    """A causal LM folder (GPT-2: Conv1D layers, AutoModelForCausalLM) and a .pt dict of input_ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, architectures=["GPT2LMHeadModel"])
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt")
    torch.save({"input_ids": torch.randint(0, 64, (40, 12))}, tmp_path / "ids.pt")
    out = tmp_path / "gpt.gblr.pt"
    r = invoke(
        tmp_path / "gpt",
        "--budget",
        "0.5",
        "--data",
        tmp_path / "ids.pt",
        "--steps",
        4,
        "--batch-size",
        8,
        "-o",
        out,
        "-q",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "gpt.gblr.pt.report.json").read_text())
    assert {L["name"].rsplit(".", 1)[-1] for L in rep["layers"]} == {"c_attn", "c_proj", "c_fc"}
    assert 0.48 <= rep["achieved_ratio"] <= 0.5
    m = gblrc.load(out)
    assert type(m).__name__ == "GPT2LMHeadModel" and list(m.gblrc_example_inputs) == ["input_ids"]
    with torch.no_grad():
        logits = m(*m.gblrc_example_inputs.values()).logits
    assert logits.shape == (2, 12, 64)
    bad = tmp_path / "long.pt"
    torch.save({"input_ids": torch.randint(0, 64, (8, 40))}, bad)  # longer than n_positions = 32
    assert_user_error(
        invoke(tmp_path / "gpt", "--budget", "0.5", "--data", bad, "-o", tmp_path / "x.pt"),
        tmp_path / "x.pt",
        "does not fit",
    )


def test_data_from_a_python_function(files, tmp_path):
    (tmp_path / "feed.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    d = torch.load(%r)\n"
        "    return [(d['inputs'][i:i + 32], d['targets'][i:i + 32]) for i in range(0, 256, 32)]\n"
        % str(files / "data.pt")
    )
    out = tmp_path / "f.gblr.pt"
    r = invoke(
        files / "mlp.pt", "--budget", "0.5", "--data", f"{tmp_path / 'feed.py'}:batches", "--steps", 12, "-o", out, "-q"
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "f.gblr.pt.report.json").read_text())
    assert len(rep["loss_curve"]) == 12 and 0.48 <= rep["achieved_ratio"] <= 0.5
    assert gblrc.load(out).gblrc_example_inputs["input"].shape == (2, 16)


def test_failure_while_writing_leaves_no_output(files, tmp_path, monkeypatch):
    import gblrc.learn.report

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gblrc.learn.report, "draw_structure", broken)
    out = tmp_path / "w.gblr.pt"
    r = invoke(files / "mlp.pt", "--budget", "0.5", "-o", out, "-q")
    assert r.exit_code != 0 and isinstance(r.exception, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no report, no temporary files


@pytest.mark.parametrize("allocate", ["uniform", "sensitivity"])
def test_allocate_option_splits_the_budget(files, tmp_path, allocate):
    out = tmp_path / "m.gblr.pt"
    r = invoke(
        files / "mlp.pt",
        "--budget",
        "0.4",
        "--data",
        files / "data.pt",
        "--steps",
        "10",
        "-q",
        "--allocate",
        allocate,
        "--structure",
        "lowrank",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.gblr.pt.report.json").read_text())
    assert rep["achieved_ratio"] <= 0.4
    ratios = [row["ratio"] for row in rep["layers"]]
    if allocate == "uniform":  # the same number of whole components fits each 48-wide layer
        assert max(ratios) - min(ratios) < 0.1
    assert rep["allocate"] == allocate


def test_every_config_option_defaults_to_the_dataclass_value_and_its_choices():
    """The CLI's defaults and choices are the config's (one source): each option that is a CompressConfig or
    TrainingConfig field defaults to the field's default, a choice option offers the config's allowed values."""
    import dataclasses

    from gblrc.cli.compress import compress
    from gblrc.learn import config as C

    fields = {f.name: f for c in (C.CompressConfig, C.TrainingConfig) for f in dataclasses.fields(c)}
    allowed = {
        "structure": C.STRUCTURES,
        "allocate": C.ALLOCATIONS,
        "budget_unit": C.UNITS,
        "device": C.DEVICES,
        "mixed_precision": C.PRECISIONS,
    }
    seen = set()
    for p in compress.params:
        if p.name not in fields or p.name == "budget":
            continue
        seen.add(p.name)
        want = C.CLI_DEVICE if p.name == "device" else fields[p.name].default
        default = None if p.default is getattr(click.core, "UNSET", object()) else p.default  # click's "none given"
        assert default == want, p.name
        if p.name in allowed:
            assert tuple(p.type.choices) == allowed[p.name], p.name
    assert {"steps", "lr", "batch_size", "structure", "allocate", "refine_steps", "checkpoint_every"} <= seen
