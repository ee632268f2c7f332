"""The paper's model families, small and self-written, for tests and benchmarks (offline, random init).

* :class:`ViT` — patch embedding as an ``nn.Linear`` on flattened patches, pre-LN transformer blocks
  (fused ``qkv`` or separate ``q``/``k``/``v`` Linears, output projection ``proj``, MLP ``fc1``/``fc2``),
  class token or mean pooling, linear ``head``;
* :class:`Mixer` — MLP-Mixer: the same patch embedding, token-mixing and channel-mixing MLPs of
  ``nn.Linear`` layers, mean pooling, linear ``head``;
* :class:`ResNet` — a small ResNet-style CNN: 3x3 ``nn.Conv2d`` stem and residual blocks (BatchNorm,
  residual adds, a strided stage with a 1x1 shortcut), global average pooling, linear ``head``;
* :func:`gpt2` — a Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (random init; its
  attention and MLP layers are HF ``Conv1D`` layers, linear layers to gblrc).

Images are (N, C, H, W) floats; the classifiers return logits (N, classes).  Every model exports to ONNX
with ``torch.onnx.export(..., dynamo=False)`` (the exporter gblrc uses) with a dynamic batch axis: only
plain tensor ops (Reshape, Transpose, MatMul, Softmax, LayerNormalization, Erf-GELU, Conv, ...).
The output layers are named ``head`` / ``lm_head`` so that gblrc's default selection keeps them dense.

``SIZES`` holds named settings: ``"tiny"`` for tests (a second or less per compress step), ``"bench"`` for
benchmarks (``benchmarks/families.py``).  Data helpers: :func:`digits` (scikit-learn's 8x8 digits, a
fixed split, optionally upsampled to 16x16) and :func:`pydoc_bytes` (CPython's bundled documentation
text as byte tokens).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViT", "Mixer", "ResNet", "gpt2", "build", "SIZES", "digits", "pydoc_bytes", "patchify"]


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/patch * W/patch, C * patch * patch), patches in row-major order."""
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    x = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, gh * gw, c * patch * patch)


# ------------------------------------------------------------------------------------------ ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, fused_qkv: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads, self.head_dim, self.fused = heads, dim // heads, fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h, hd = self.heads, self.head_dim
        if self.fused:
            q, k, v = self.qkv(x).reshape(n, t, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(x).reshape(n, t, h, hd).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)), dim=-1)
        return self.proj(torch.matmul(att, v).transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, fused_qkv: bool = True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused_qkv)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer for (N, channels, image_size, image_size) images."""

    def __init__(
        self,
        image_size: int = 16,
        patch: int = 4,
        channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        num_classes: int = 10,
        pool: str = "cls",
        fused_qkv: bool = True,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.patch, self.pool = patch, pool
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, fused_qkv) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(x, self.patch))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


# ---------------------------------------------------------------------------------------- Mixer
class MixerBlock(nn.Module):
    """x + token_mlp(LN(x) over tokens), then x + channel_mlp(LN(x) over channels)."""

    def __init__(self, tokens: int, dim: int, token_dim: int, channel_dim: int):
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(dim), MLP(tokens, token_dim)
        self.norm2, self.channel_mlp = nn.LayerNorm(dim), MLP(dim, channel_dim)

    def forward(self, x):
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer for (N, channels, image_size, image_size) images."""

    def __init__(
        self,
        image_size: int = 16,
        patch: int = 4,
        channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        token_dim: int = 64,
        channel_dim: int = 128,
        num_classes: int = 10,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim, token_dim, channel_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(patchify(x, self.patch))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


# --------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))); a strided block has a 1x1 strided conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem 3x3 conv, ``blocks`` residual blocks per stage, one stage per entry of ``widths`` (each
    stage after the first halves the resolution), global average pooling, linear head."""

    def __init__(self, channels: int = 1, widths: tuple = (16, 32), blocks: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


# ---------------------------------------------------------------------------------------- GPT-2
def gpt2(
    vocab_size: int = 256,
    n_embd: int = 32,
    n_layer: int = 1,
    n_head: int = 2,
    n_positions: int = 64,
    seed: int | None = 0,
):
    """A Hugging Face GPT2LMHeadModel with random weights (no dropout, eager attention), in eval mode.

    Call it with ``input_ids`` (and ``attention_mask``); its logits are ``out.logits``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import GPT2Config, GPT2LMHeadModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    try:
        model = GPT2LMHeadModel(cfg, attn_implementation="eager")
    except TypeError:  # older transformers: the attention implementation is a config field
        cfg._attn_implementation = "eager"
        model = GPT2LMHeadModel(cfg)
    return model.eval()


# ---------------------------------------------------------------------------------------- sizes
SIZES = {
    "tiny": {
        "vit": dict(image_size=8, patch=2, dim=32, depth=1, heads=2, mlp_dim=64),
        "mixer": dict(image_size=8, patch=2, dim=32, depth=1, token_dim=32, channel_dim=64),
        "cnn": dict(widths=(16, 32), blocks=1),
        "gpt2": dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32),
    },
    "bench": {
        "vit": dict(image_size=16, patch=4, dim=96, depth=3, heads=4, mlp_dim=192),
        "mixer": dict(image_size=16, patch=4, dim=128, depth=3, token_dim=64, channel_dim=256),
        "cnn": dict(widths=(32, 64), blocks=1),
        "gpt2": dict(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128),
    },
}


def build(family: str, size: str = "tiny", seed: int = 0, **overrides) -> nn.Module:
    """A fresh model of ``family`` ("vit", "mixer", "cnn", "gpt2") at the named size, in eval mode."""
    if family not in ("vit", "mixer", "cnn", "gpt2"):
        raise ValueError(f"unknown family {family!r}; choose vit, mixer, cnn or gpt2")
    kw = dict(SIZES[size][family], **overrides)
    torch.manual_seed(seed)
    if family == "gpt2":
        return gpt2(seed=seed, **kw)
    return {"vit": ViT, "mixer": Mixer, "cnn": ResNet}[family](**kw).eval()


# ----------------------------------------------------------------------------------------- data
def digits(image_size: int = 8, seed: int = 0, test_fraction: float = 0.2):
    """(x_train, y_train, x_test, y_test) of scikit-learn's digits as (N, 1, S, S) floats in [0, 1]
    (bilinearly upsampled when ``image_size`` is 16), a fixed random split (``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def pydoc_bytes(seq_len: int = 64, held_out: float = 0.1, max_bytes: int | None = None):
    """(train, test) LongTensors (N, seq_len + 1) of byte tokens (0-255) from CPython's bundled
    documentation text (``pydoc_data.topics``, topics in sorted order); the last ``held_out`` fraction
    of the text is the test split.  Each row is a window: inputs row[:-1], next-byte targets row[1:]."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    if max_bytes is not None:
        text = text[:max_bytes]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(data) * (1.0 - held_out))
    w = seq_len + 1

    def windows(t):
        n = len(t) // w
        return t[: n * w].reshape(n, w)

    return windows(data[:cut]), windows(data[cut:])
