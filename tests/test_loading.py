"""Model and data loading for `gblrc compress` (gblrc.io.loading, gblrc.io.datafiles)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from gblrc.io.datafiles import check_fits, example_inputs, load_data
from gblrc.errors import GblrcError
from gblrc.io.loading import hf_auto_class, load_model, safe_load


pytestmark = pytest.mark.usefixtures("one_thread")


class NeedsCode(nn.Module):  # a user class: unpickling it runs code outside torch.nn
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * 2


B = dict(batch_size=32, seed=0)  # load_data takes the run's batch size and seed


def one_line(e: GblrcError) -> str:
    msg = e.format_message()
    assert "\n" not in msg and msg
    return msg


@pytest.fixture
def mlp_file(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    p = tmp_path / "mlp.pt"
    torch.save(m, p)
    return p, m


def test_pickled_torch_nn_module_loads_without_trust(mlp_file):
    p, m = mlp_file
    lm = load_model(p)
    assert lm.kind == "module" and not lm.model.training
    x = torch.randn(5, 4)
    torch.testing.assert_close(lm.model(x), m.eval()(x))


def test_pickle_with_user_code_is_refused_unless_trusted(tmp_path):
    p = tmp_path / "custom.pt"
    torch.save(NeedsCode(), p)
    with pytest.raises(GblrcError) as ei:
        load_model(p)
    msg = one_line(ei.value)
    assert "--trust-pickle" in msg and "NeedsCode" in msg
    lm = load_model(p, trust=True)
    assert isinstance(lm.model, NeedsCode)


def test_state_dict_missing_and_corrupt_files_are_refused(tmp_path, mlp_file):
    p, m = mlp_file
    sd = tmp_path / "sd.pt"
    torch.save(m.state_dict(), sd)
    with pytest.raises(GblrcError, match="state_dict"):
        load_model(sd)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04 definitely not a torch file" * 10)
    with pytest.raises(GblrcError, match="not a valid PyTorch file") as ei:
        load_model(bad)
    one_line(ei.value)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(p.read_bytes()[:300])
    with pytest.raises(GblrcError):
        load_model(trunc)
    with pytest.raises(GblrcError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(GblrcError, match="config.json"):
        load_model(tmp_path)  # a folder that is not a Hugging Face model


def test_hf_auto_class_choice():
    assert hf_auto_class(["GPT2LMHeadModel"]) == "AutoModelForCausalLM"
    assert hf_auto_class(["LlamaForCausalLM"]) == "AutoModelForCausalLM"
    assert hf_auto_class(["BertModel"]) == "AutoModel"
    assert hf_auto_class(None) == "AutoModel"


def tiny_bert_folder(tmp_path):
    """A random 2-layer BERT with MiniLM's real tokenizer, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel

    from gblrc.io.zoo import minilm_path

    src = minilm_path()
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    torch.manual_seed(0)
    d = tmp_path / "tiny_bert"
    BertModel(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy(src / f, d / f)
    return d


def test_hf_folder_and_text_data(tmp_path):
    d = tiny_bert_folder(tmp_path)
    lm = load_model(d)
    assert lm.kind == "hf" and lm.auto_class == "AutoModel" and lm.tokenizer is not None
    txt = tmp_path / "s.txt"
    lines = [
        "Short.",
        "The first sentence is short.",
        "A second, rather longer sentence follows here, with many more words than the others have.",
    ] * 3
    txt.write_text("\n\n".join(lines) + "\n")
    data = load_data(str(txt), lm, batch_size=2, seed=1)
    passes = [list(data.train) for _ in range(2)]
    assert [len(p) for p in passes] == [5, 5]  # 9 lines (blank lines skipped), batches of 2
    for b in passes[0]:  # padded per batch: no column is padding in every row
        assert b["input_ids"].shape == b["attention_mask"].shape and b["attention_mask"][:, -1].any()
    assert len({b["input_ids"].shape[1] for b in passes[0]}) > 1
    again = load_data(str(txt), lm, batch_size=2, seed=1)  # the same sequence in a fresh process
    for p, q in zip(passes[0], list(again.train)):
        assert torch.equal(p["input_ids"], q["input_ids"])
    assert not all(torch.equal(p["input_ids"], q["input_ids"]) for p, q in zip(*passes))  # reshuffled per pass
    check_fits(lm.model, data.sample)
    ex = example_inputs(lm.model, data.sample, "hf")
    assert list(ex) == ["input_ids", "attention_mask"]
    out = lm.model(*ex.values()).last_hidden_state
    assert out.shape[:2] == ex["input_ids"].shape


def test_hf_custom_code_needs_trust(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(GblrcError, match="--trust-remote-code"):
        load_model(d)


def test_pt_data_forms_and_errors(tmp_path, mlp_file):
    lm = load_model(mlp_file[0])
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch.save(x, tmp_path / "x.pt")
    torch.save({"inputs": x, "targets": y}, tmp_path / "xy.pt")
    torch.save({"inputs": x, "targets": y[:7]}, tmp_path / "bad_y.pt")
    torch.save(torch.randn(10, 7), tmp_path / "wide.pt")
    d = load_data(str(tmp_path / "x.pt"), lm, **B)
    assert not d.has_targets and torch.equal(d.train, x)
    d = load_data(str(tmp_path / "xy.pt"), lm, **B)
    assert d.has_targets and torch.equal(d.eval_targets, y) and d.eval_name == "training"
    with pytest.raises(GblrcError, match="one entry per input"):
        load_data(str(tmp_path / "bad_y.pt"), lm, **B)
    wide = load_data(str(tmp_path / "wide.pt"), lm, **B)
    with pytest.raises(GblrcError, match="does not fit the model") as ei:
        check_fits(lm.model, wide.sample)
    one_line(ei.value)
    (tmp_path / "t.txt").write_text("some text\n")
    with pytest.raises(GblrcError, match="Hugging Face"):
        load_data(str(tmp_path / "t.txt"), lm, **B)
    with pytest.raises(GblrcError, match="does not exist"):
        load_data(str(tmp_path / "missing.pt"), lm, **B)


def test_module_function_data(tmp_path, monkeypatch, mlp_file):
    lm = load_model(mlp_file[0])
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(3)]\n"
        "def broken():\n"
        "    raise RuntimeError('no data today')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    d = load_data("mydata:batches", lm, **B)
    assert d.has_targets and callable(d.train) and len(list(d.train())) == 3
    assert d.sample.shape == (2, 4)
    d2 = load_data(str(tmp_path / "mydata.py") + ":batches", lm, **B)
    assert d2.sample.shape == (2, 4)
    with pytest.raises(GblrcError, match="no data today"):
        load_data("mydata:broken", lm, **B)
    with pytest.raises(GblrcError, match="cannot import"):
        load_data("mydata:nothing_here", lm, **B)


def test_safe_load_allows_only_torch_nn_and_gblrc(tmp_path):
    from gblrc.nn.layer import GBLRLinear

    p = tmp_path / "g.pt"
    torch.save({"m": nn.Sequential(GBLRLinear(4, 4), nn.ReLU())}, p)
    assert isinstance(safe_load(p)["m"][0], GBLRLinear)
    q = tmp_path / "fn.pt"
    torch.save({"f": shutil.rmtree}, q)  # a callable global: never allowed without trust
    with pytest.raises(GblrcError, match="--trust-pickle"):
        safe_load(q)
