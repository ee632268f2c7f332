"""How ``gblrc compress --steps 0`` and ``gblrc lower`` grow with depth and width (issue 29).

Random-initialised BERT and GPT-2 encoders (MiniLM's tokenizer; FFN 4 x width, heads of 64) of each depth
and width are saved as Hugging Face folders and run through the command line, one fresh process each, on
the same text (stdlib docstrings, the CLI's default mix with built-in package sentences)::

    .venv/bin/python -m benchmarks.scale --depths 3,6,12,24 --widths 256 --threads 2
    .venv/bin/python -m benchmarks.scale --depths 12 --widths 768 --archs bert --no-lower   # the RSS point

Each row: compress wall time, time per layer, the compress process's peak RSS (``wait4``'s ru_maxrss, the
process alone), lower wall time, the lowered graph's node count and size.  The growth exponent of compress
(and lower) time with depth is the slope of log(time) on log(depth), per architecture and width.  Writes
OUT.txt (the table, headed by the provenance line), OUT.json and OUT.png (log-log time against depth).
Timings of one process each: quote ratios between rows of one run, not absolute times.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import ROOT, display_path, provenance

ARCHS = ("bert", "gpt2")


def _model(arch: str, depth: int, width: int, vocab: int):
    import torch
    import transformers

    torch.manual_seed(0)
    heads = max(1, width // 64)
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            max_position_embeddings=512,
        )
        return transformers.BertModel(cfg)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=depth, n_head=heads, n_positions=512)
    return transformers.GPT2Model(cfg)


def _run(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB of that process alone, output) of one command."""
    # PYTHONPATH: the gblrc of this checkout (the console script alone may import another, editable, one)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise click.ClickException(f"{' '.join(cmd[:4])} ... failed:\n{out[-2000:]}")
    return wall, usage.ru_maxrss / 1e6, out  # ru_maxrss: kilobytes on Linux


def _fit(xs, ys) -> float | None:
    """Slope of log(y) on log(x) (least squares); None with fewer than two points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def _ints(_ctx, _param, value):
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of whole numbers; got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"whole numbers >= 1; got {value!r}")
    return out


@click.command()
@click.option("--depths", default="3,6,12,24", show_default=True, callback=_ints, help="encoder layers")
@click.option("--widths", default="256", show_default=True, callback=_ints, help="hidden sizes (FFN 4x)")
@click.option(
    "--archs",
    default="bert",
    show_default=True,
    callback=lambda _c, _p, v: [a for a in v.split(",") if a] or ["bert"],
    help=f"comma-separated, of {', '.join(ARCHS)}",
)
@click.option("--budget", default=0.4, show_default=True)
@click.option("--sentences", default=3000, show_default=True, help="training sentences (stdlib docstrings)")
@click.option("--lower/--no-lower", "do_lower", default=True, show_default=True, help="also time gblrc lower")
@click.option("--threads", default=2, show_default=True, help="torch threads of each process")
@click.option("--out", default="benchmarks/results/scale", show_default=True, help="OUT.txt, .json, .png")
def main(depths, widths, archs, budget, sentences, do_lower, threads, out):
    """compress --steps 0 and lower on random-initialised encoders of each depth x width: time, time per
    layer, peak RSS, graph size, and the growth exponent with depth."""
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise click.BadParameter(f"unknown architecture {bad[0]!r}; choose from {', '.join(ARCHS)}")
    from gblrc.io.zoo import docstring_sentences, load_minilm

    _, tok = load_minilm()
    head = provenance(threads)
    click.echo(head)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        lines = docstring_sentences()[:sentences]
        text.write_text("\n".join(lines) + "\n")
        for arch in archs:
            for width in widths:
                for depth in depths:
                    folder = Path(tmp) / f"{arch}-{depth}x{width}"
                    _model(arch, depth, width, tok.vocab_size).save_pretrained(folder)
                    tok.save_pretrained(folder)
                    cm = Path(tmp) / f"{arch}-{depth}x{width}.gblr.pt"
                    gblrc = [str(Path(sys.executable).parent / "gblrc")]
                    args = ["compress", str(folder), "--budget", str(budget), "--data", str(text), "--steps", "0"]
                    wall, rss, _ = _run(gblrc + args + ["-o", str(cm)], threads)
                    row = dict(arch=arch, depth=depth, width=width, compress_s=round(wall, 1))
                    row.update(per_layer_s=round(wall / depth, 2), peak_rss_gb=round(rss, 3))
                    report = json.loads(Path(f"{cm}.report.json").read_text())
                    row["refine_s"] = report.get("refine", {}).get("seconds")
                    if do_lower:
                        onnx = Path(tmp) / f"{arch}-{depth}x{width}.onnx"
                        lw, lrss, _ = _run(gblrc + ["lower", str(cm), "-o", str(onnx)], threads)
                        import onnx as onnx_lib

                        g = onnx_lib.load(str(onnx), load_external_data=False).graph
                        row.update(lower_s=round(lw, 1), lower_per_layer_s=round(lw / depth, 2))
                        row.update(lower_rss_gb=round(lrss, 3), nodes=len(g.node))
                        row["onnx_mb"] = round(sum(f.stat().st_size for f in Path(tmp).glob(onnx.name + "*")) / 1e6, 1)
                    rows.append(row)
                    click.echo("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
                    for f in Path(tmp).glob(f"{arch}-{depth}x{width}*"):
                        if f.is_file():
                            f.unlink()
    fits = {}
    for arch in archs:
        for width in widths:
            rs = [r for r in rows if r["arch"] == arch and r["width"] == width]
            key = f"{arch} width {width}"
            fits[key] = {"compress": _fit([r["depth"] for r in rs], [r["compress_s"] for r in rs])}
            if do_lower:
                fits[key]["lower"] = _fit([r["depth"] for r in rs], [r["lower_s"] for r in rs])
    table = _table(rows, fits, do_lower, budget, sentences)
    click.echo(table)
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".txt").write_text(head + "\n" + table + "\n")
    settings = dict(depths=depths, widths=widths, archs=archs, budget=budget, sentences=sentences, threads=threads)
    doc = {"provenance": head, "settings": settings, "rows": rows, "exponents": fits}
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    _plot(rows, do_lower, base.with_suffix(".png"), head)
    click.echo(f"wrote {display_path(base.with_suffix('.txt'))}, .json, .png")


def _table(rows, fits, do_lower, budget, sentences) -> str:
    cols = ["arch", "depth", "width", "compress_s", "per_layer_s", "refine_s", "peak_rss_gb"]
    if do_lower:
        cols += ["lower_s", "lower_per_layer_s", "nodes", "onnx_mb"]
    lines = [
        f"gblrc compress --budget {budget} --steps 0 on {sentences} sentences, then gblrc lower "
        "(one fresh process each)",
        "",
        "| " + " | ".join(cols) + " |",
        "|---" * len(cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
    lines.append("")
    for key, f in fits.items():
        parts = [f"{k} time ~ depth^{v:.2f}" for k, v in f.items() if v is not None]
        if parts:
            lines.append(f"- {key}: " + ", ".join(parts))
    for arch in {r["arch"] for r in rows}:
        for width in sorted({r["width"] for r in rows}):
            rs = sorted((r for r in rows if r["arch"] == arch and r["width"] == width), key=lambda r: r["depth"])
            if len(rs) >= 2:
                lo, hi = rs[0], rs[-1]
                lines.append(
                    f"- {arch} width {width}: compress s/layer at {hi['depth']} layers / at {lo['depth']}: "
                    f"{hi['per_layer_s'] / lo['per_layer_s']:.2f}x"
                    + (f"; lower s/layer: {hi['lower_per_layer_s'] / lo['lower_per_layer_s']:.2f}x" if do_lower else "")
                )
    return "\n".join(lines)


def _plot(rows, do_lower, path: Path, head: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arch in sorted({r["arch"] for r in rows}):
        for width in sorted({r["width"] for r in rows}):
            rs = sorted((r for r in rows if r["arch"] == arch and r["width"] == width), key=lambda r: r["depth"])
            if not rs:
                continue
            d = [r["depth"] for r in rs]
            ax.plot(d, [r["compress_s"] for r in rs], "o-", label=f"compress {arch} w{width}")
            if do_lower:
                ax.plot(d, [r["lower_s"] for r in rs], "s--", label=f"lower {arch} w{width}")
    ds = sorted({r["depth"] for r in rows})
    if len(ds) >= 2:
        c0 = min(r["compress_s"] for r in rows if r["depth"] == ds[0])
        ax.plot(ds, [c0 * d / ds[0] for d in ds], ":", color="gray", label="linear in depth")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ds)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("layers")
    ax.set_ylabel("wall time (s)")
    ax.set_title("gblrc compress --steps 0 and lower, by depth", fontsize=10)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.005, head[2:][:110], fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
