"""MiniLM in the fastest export form: dense and gblrc-lowered, SDPA vs eager attention, --optimize, int8, and the
--hf-folder output's embeddings (issue 22).

Rows, all in one process, timed in one interleaved run (gblrc.runtime.timing: I/O binding, medians of --repeats
runs, best of --sessions fresh sessions), ratios to the *fastest* dense fp32 export of the same run (the faster
of the SDPA and the eager export) and to the SDPA dense export (the baseline before issue 22):

- dense SDPA export / dense eager export / dense int8 dynamic (of the fastest dense form);
- per compressed model (.gblr.pt): lowered as before (``attention="sdpa"``), lowered as `gblrc lower` writes now
  (``attention="auto"``: timed, recorded), lowered + int8 dynamic, ``--optimize`` (fp32), ``--optimize`` + int8.

`lower` is given --batch x --seq example inputs, so its own attention timing and --optimize's per-block timing
run at the benchmark's shape.  Then each model's --hf-folder output: embeddings through the folder (its
tokenizer, ONNX Runtime on onnx/model.onnx, sentence-transformers' Pooling and Normalize from its module files)
against gblrc.load's model, on --heldout pydoc sentences; with --st-python PY also through
``SentenceTransformer(OUT, backend="onnx")`` in that Python (one with sentence-transformers + optimum-onnx).

    python -m benchmarks.export_form_minilm out/minilm/default.gblr.pt out/minilm/lowrank.gblr.pt --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import gblrc  # noqa: E402
from gblrc.export.attention import attention_form, record_choice, AttentionChoice  # noqa: E402
from gblrc.export.graph import export_onnx  # noqa: E402
from gblrc.export.hf_folder import write_hf_folder  # noqa: E402
from gblrc.export.precision import quantize_checked  # noqa: E402
from gblrc.io.zoo import english_sentences, load_minilm, minilm_path  # noqa: E402
from gblrc.runtime import make_session  # noqa: E402
from gblrc.runtime.timing import best_of_sessions  # noqa: E402
from benchmarks.common import provenance  # noqa: E402


def max_len(folder: Path) -> int:
    """The folder's sentence-transformers max_seq_length (what SentenceTransformer truncates at)."""
    cfg = folder / "sentence_bert_config.json"
    return int(json.loads(cfg.read_text()).get("max_seq_length", 512)) if cfg.is_file() else 512


def folder_embeddings(folder: Path, sentences, bs=32) -> np.ndarray:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    sess = make_session(folder / "onnx" / "model.onnx", log=False, threads=1)
    pool, norm = Pooling.load(str(folder), subfolder="1_Pooling"), Normalize()
    out = []
    for i in range(0, len(sentences), bs):
        enc = tok(sentences[i : i + bs], padding=True, truncation=True, max_length=max_len(folder), return_tensors="pt")
        (h,) = sess.run(["last_hidden_state"], {x.name: enc[x.name].numpy() for x in sess.get_inputs()})
        f = norm(pool({"token_embeddings": torch.from_numpy(h), "attention_mask": enc["attention_mask"]}))
        out.append(f["sentence_embedding"].numpy())
    return np.concatenate(out)


@torch.no_grad()
def model_embeddings(model, folder: Path, sentences, bs=32) -> np.ndarray:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    pool, norm = Pooling.load(str(folder), subfolder="1_Pooling"), Normalize()
    out = []
    for i in range(0, len(sentences), bs):
        enc = tok(sentences[i : i + bs], padding=True, truncation=True, max_length=max_len(folder), return_tensors="pt")
        h = model(**enc).last_hidden_state
        out.append(
            norm(pool({"token_embeddings": h, "attention_mask": enc["attention_mask"]}))["sentence_embedding"].numpy()
        )
    return np.concatenate(out)


ST_CHECK = """
import json, sys
from sentence_transformers import SentenceTransformer
st = SentenceTransformer(sys.argv[1], backend="onnx", device="cpu")
print(json.dumps({"emb": st.encode(json.load(open(sys.argv[2])), batch_size=32).tolist(),
                  "backend": type(st[0].auto_model).__name__}))
"""


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="compressed MiniLM files (.gblr.pt)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--no-optimize", action="store_true", help="skip the --optimize rows")
    ap.add_argument("--st-python", help="a Python with sentence-transformers + optimum-onnx for the real loader")
    a = ap.parse_args()
    print(provenance(getattr(a, "threads", None)), flush=True)  # results files name the commit, libraries and cores
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dense, tok = load_minilm()
    sents = english_sentences()
    random.Random(0).shuffle(sents)
    held = sents[: a.heldout]
    enc = tok(sents[: a.batch], padding="max_length", truncation=True, max_length=a.seq, return_tensors="pt")
    ex = OrderedDict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    feeds = {k: v.numpy() for k, v in ex.items()}
    rows: "OrderedDict[str, str]" = OrderedDict()
    notes = []
    with tempfile.TemporaryDirectory() as d:
        P = lambda k: os.path.join(d, f"{k}.onnx")  # noqa: E731
        for form in ("sdpa", "eager"):
            with attention_form(dense, form):
                m = export_onnx(dense, ex)
            record_choice(m, AttentionChoice(form=form, chosen_by="option"))
            onnx.save(m, P(f"dense_{form}"))
            rows[f"dense_{form}"] = f"dense fp32, {form} export"
        for i, path in enumerate(a.models):
            cm = gblrc.load(path).eval()
            name = os.path.basename(path)
            variants = [
                ("sdpa", dict(attention="sdpa"), "lowered fp32, sdpa export (gblrc lower before issue 22)"),
                ("auto", dict(), "lowered fp32, `gblrc lower` now (attention auto)"),
                ("auto8", dict(quantize="int8"), "lowered + int8 dynamic (attention auto)"),
            ]
            if not a.no_optimize:
                variants += [
                    ("opt", dict(optimize=True), "lowered --optimize fp32"),
                    ("opt8", dict(optimize=True, quantize="int8"), "lowered --optimize + int8 dynamic"),
                ]
            for key, kw, label in variants:
                r = gblrc.lower(cm, ex, P(f"m{i}_{key}"), attention_threads=a.threads, **kw)
                rows[f"m{i}_{key}"] = f"{name}: {label}"
                line = f"{name} {key}: {r.attention.line()}; {r.parity_line()}"
                if r.quantization:
                    line += f"; int8 per-channel {'on' if r.quantization['per_channel'] else 'off'}"
                notes.append(line)
                if r.fusion is not None:
                    notes += [f"{name} {key}: {x}" for x in r.fusion.lines()]
                print(notes[-1], flush=True)
        # dense int8 of the faster dense form: a quick pre-timing picks it (the main run re-measures both forms)
        pre = best_of_sessions(
            {f: P(f"dense_{f}") for f in ("sdpa", "eager")}, feeds, threads=a.threads, repeats=a.repeats, sessions=2
        ).best
        fast = min(pre, key=pre.get)
        q, pc, _, _ = quantize_checked(onnx.load(P(f"dense_{fast}")), [feeds], mode="dynamic")
        onnx.save(q, P("dense8"))
        rows["dense8"] = f"dense int8 dynamic ({fast} export, per-channel {'on' if pc else 'off'})"
        print("timing ...", flush=True)
        t = best_of_sessions(
            {k: P(k) for k in rows}, feeds, threads=a.threads, repeats=a.repeats, sessions=a.sessions
        ).best
        # --hf-folder: embeddings through the folder vs gblrc.load's model
        hf_lines = []
        for i, path in enumerate(a.models):
            out = Path(d) / f"hf{i}"
            cm = gblrc.load(path).eval()
            write_hf_folder(
                cm,
                OrderedDict(ex),
                out,
                (cm.gblrc_meta or {}).get("source") or minilm_path(),
                attention_threads=a.threads,
            )
            ref = model_embeddings(cm, out, held)
            c = cosines(folder_embeddings(out, held), ref)
            line = (
                f"{os.path.basename(path)} --hf-folder: folder (tokenizer + ORT + sentence-transformers Pooling/"
                f"Normalize) vs gblrc.load: cosine min {c.min():.7f}, 1 - min {1 - c.min():.2e} over {len(held)} "
                f"sentences"
            )
            if a.st_python:
                sj = Path(d) / "sents.json"
                sj.write_text(json.dumps(held))
                r = subprocess.run(
                    [a.st_python, "-c", ST_CHECK, str(out), str(sj)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
                if r.returncode == 0:
                    got = json.loads(r.stdout.strip().splitlines()[-1])
                    c2 = cosines(np.asarray(got["emb"]), ref)
                    line += (
                        f"; SentenceTransformer(OUT, backend='onnx') ({got['backend']}) vs gblrc.load: cosine "
                        f"min {c2.min():.7f}, 1 - min {1 - c2.min():.2e}"
                    )
                else:
                    line += f"; SentenceTransformer(backend='onnx') failed: {r.stderr.strip().splitlines()[-1][:200]}"
            hf_lines.append(line)
            print(line, flush=True)

    base = min(t["dense_sdpa"], t["dense_eager"])
    fastest = "eager" if t["dense_eager"] <= t["dense_sdpa"] else "sdpa"
    print()
    print(
        f"{provenance(a.threads)[2:]}, Python {platform.python_version()}; "
        f"CPU provider, {a.threads} threads, {a.batch}x{a.seq} tokens, medians of {a.repeats} interleaved runs, "
        f"best of {a.sessions} fresh sessions; {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"fastest dense fp32 export in this run: {fastest} (dense eager / dense sdpa "
        f"{t['dense_eager'] / t['dense_sdpa']:.3f})"
    )
    print()
    print("| model | time / fastest dense fp32 | time / dense SDPA export |")
    print("|---|---|---|")
    for k, label in rows.items():
        print(f"| {label} | {t[k] / base:.3f} | {t[k] / t['dense_sdpa']:.3f} |")
    print()
    for line in notes + hf_lines:
        print(line)


if __name__ == "__main__":
    main()
