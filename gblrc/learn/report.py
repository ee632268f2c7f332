"""Side files of `gblrc compress`: the JSON report and a picture of every layer's learned blocks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["write_json", "draw_structure", "layer_structures", "structure_movement"]


def _jsonable(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):  # torch tensors
        return o.tolist()
    return str(o)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write ``report`` as indented JSON (numpy/torch numbers converted)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=_jsonable)
        f.write("\n")


def layer_structures(model) -> list[tuple[str, object]]:
    """[(name, Structure)] of every GBLRLinear in ``model``, in module order."""
    from gblrc.nn.layer import GBLRLinear

    return [(n, m.structure().structure) for n, m in model.named_modules() if isinstance(m, GBLRLinear)]


def structure_movement(before: dict, after: dict) -> dict:
    """How far training moved the structure, from {layer name: Structure} before and after.

    ``blocks_changed``: the share of the initial components (counted in rank units, since components
    with equal spans merge into one block of their summed rank) whose (row spans, column spans) are gone
    after training (moved, resized or removed); ``cost_moved``: the share of the total cost that changed
    layers (sum over layers of the growth of their share of the cost); ``layers_changed``: the layers
    with any component changed.
    """
    from collections import Counter

    def ranks(st) -> Counter:
        c = Counter()
        for b in st.blocks:
            c[(tuple((sp.start, sp.stop) for sp in b.rows), tuple((sp.start, sp.stop) for sp in b.cols))] += b.rank
        return c

    total = changed = 0
    layers = []
    for name, s0 in before.items():
        r0, r1 = ranks(s0), ranks(after[name])
        moved = sum(max(0, r - r1.get(k, 0)) for k, r in r0.items())
        total += sum(r0.values())
        changed += moved
        if moved or r0 != r1:
            layers.append(name)
    c0 = sum(s.cost() for s in before.values()) or 1
    c1 = sum(after[n].cost() for n in before) or 1
    moved_cost = sum(max(0.0, after[n].cost() / c1 - before[n].cost() / c0) for n in before)
    return {
        "blocks_changed": round(changed / total, 6) if total else 0.0,
        "cost_moved": round(moved_cost, 6),
        "layers_changed": layers,
    }


_PIXELS = 256  # the depth map's resolution in the structure picture (per side, at most)


def _binned(a, most: int):
    """``a`` (2-D) averaged over bins so that neither side exceeds ``most`` (the last partial bins dropped
    into the previous ones' grid: every entry counts)."""
    import numpy as np

    for axis in (0, 1):
        n = a.shape[axis]
        if n > most:
            edges = np.linspace(0, n, most + 1).astype(int)
            a = np.add.reduceat(a, edges[:-1], axis=axis) / np.diff(edges).reshape((-1, 1) if axis == 0 else (1, -1))
    return a


def draw_structure(model, path: str | os.PathLike, *, title: str = "", fmt: str = "png") -> int:
    """One subplot per GBLR layer: the outline of every block (each row span x column span),
    coloured by the block's rank, over a grey map of the total rank covering each weight entry
    ("depth"); x is the weight's columns (inputs), y its rows (outputs).
    Returns the number of layers drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    layers = layer_structures(model)
    n = max(len(layers), 1)
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.6 * cols + 1, 2.6 * rows + 0.8), squeeze=False, layout="constrained"
    )
    max_rank = max([b.rank for _, s in layers for b in s.blocks] or [1])
    norm = Normalize(vmin=1, vmax=max(max_rank, 2))
    cmap = plt.get_cmap("viridis")
    for ax in axes.flat[len(layers) :]:
        ax.axis("off")
    for ax, (name, s) in zip(axes.flat, layers):
        import numpy as np

        depth = np.zeros((s.out_features, s.in_features), np.float32)  # total rank covering each weight entry
        rects, colors = [], []
        for b in s.blocks:
            depth[np.ix_(b.row_index(), b.col_index())] += b.rank
            for r in b.rows:
                for c in b.cols:
                    rects.append(Rectangle((c.start, r.start), len(c), len(r)))
                    colors.append(cmap(norm(b.rank)))
        depth = _binned(depth, _PIXELS)  # a subplot is ~260 pixels a side: the full map would only cost memory
        ax.imshow(
            depth,
            cmap="Greys",
            aspect="auto",
            interpolation="nearest",
            extent=(0, s.in_features, s.out_features, 0),
            vmin=0,
            vmax=max(depth.max(), 1),
        )
        ax.add_collection(PatchCollection(rects, facecolors="none", edgecolors=colors, linewidths=0.6))
        ax.set_xlim(0, s.in_features)
        ax.set_ylim(s.out_features, 0)
        ax.set_title(
            f"{name}\n{len(s.blocks)} blocks, cost {s.cost_ratio():.2f}, depth<={int(depth.max())}", fontsize=7
        )
        ax.tick_params(labelsize=6)
    if not layers:
        axes.flat[0].text(0.5, 0.5, "no GBLR layers", ha="center", va="center")
    fig.suptitle(
        (title + "\n" if title else "") + "GBLR blocks: x = input column, y = output row\n"
        "outline = block (colour: rank), grey = total rank per entry",
        fontsize=8,
    )
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.6, label="block rank")
    fig.savefig(str(Path(path)), format=fmt, dpi=90)
    plt.close(fig)
    return len(layers)
