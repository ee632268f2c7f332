"""Build the built-in example: a small MLP classifier on scikit-learn's digits (offline).

Writes samples/digits_mlp.pt (the whole model, torch.save(model); only torch.nn classes, so
`gblrc compress` loads it without --trust-pickle) and samples/digits_data.pt (a dict with
'inputs'/'targets' = training split and 'eval_inputs'/'eval_targets' = held-out split).

    python samples/tiny_mlp.py
    gblrc compress samples/digits_mlp.pt --budget 0.4 --data samples/digits_data.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 digit images flattened and scaled to [0, 1]; 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(x))
    tr, te = perm[:n], perm[n:]
    return x[tr], y[tr], x[te], y[te]


def build(hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model, x, y, *, epochs: int = 60, batch: int = 64, lr: float = 2e-3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for digits_mlp.pt and digits_data.pt")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=60)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_split()
    model = train(build(a.hidden), xtr, ytr, epochs=a.epochs)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(model, a.out / "digits_mlp.pt")
    torch.save({"inputs": xtr, "targets": ytr, "eval_inputs": xte, "eval_targets": yte}, a.out / "digits_data.pt")
    print(
        f"digits MLP 64-{a.hidden}-{a.hidden}-10: train accuracy {accuracy(model, xtr, ytr):.4f}, "
        f"held-out accuracy {accuracy(model, xte, yte):.4f} ({len(xte)} images)"
    )
    print(f"wrote {a.out / 'digits_mlp.pt'} and {a.out / 'digits_data.pt'}")


if __name__ == "__main__":
    main()
