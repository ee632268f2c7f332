"""`gblrc bench`: time an ONNX model (against another) on this machine, the way gblrc times everything."""

from __future__ import annotations

import json

import click

from gblrc.cli._errors import api_errors

__all__ = ["bench_cmd"]

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("bench", context_settings=_CTX)
@click.argument("model", metavar="MODEL.onnx")
@click.option(
    "--against",
    metavar="OTHER.onnx",
    help="Time this model too (e.g. the dense reference from `gblrc lower --with-dense`) and print the "
    "time ratio MODEL / OTHER and how far MODEL's outputs are from OTHER's. Inputs are paired by name, or "
    "by position (said on a line) when the names differ but the counts, dimensions and element kinds agree.",
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime provider (auto: CUDA when this ONNX Runtime has it).",
)
@click.option("--threads", type=int, default=None, metavar="N", help="Intra-op threads [default: one per core].")
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NAME=D0xD1",
    help="Shape of an input (repeat, or separate by commas); needed for dynamic dimensions, "
    "e.g. --shape input_ids=8x128 --shape attention_mask=8x128.",
)
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed runs per model per session.")
@click.option(
    "--sessions",
    type=int,
    default=3,
    show_default=True,
    help="Fresh sessions per model; the best session's median counts (a session's speed can be bimodal "
    "on a busy machine).",
)
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed rounds before timing, per session.")
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="With --provider cuda: capture a CUDA graph (static shapes, every node on the GPU).",
)
@click.option("--json", "json_out", metavar="OUT.json", help="Also write the measurements as JSON.")
def bench_cmd(model, against, provider, threads, shapes, repeats, sessions, warmup, cuda_graph, json_out):
    """Time MODEL.onnx (and --against OTHER.onnx) in one process on generated inputs: runs interleaved,
    inputs and outputs bound once (I/O binding), the median over --repeats runs, best of --sessions fresh
    sessions; prints time per run, throughput and the time ratio.

    \b
    Inputs: floats ~ N(0, 1); integer inputs named *mask* all ones, *type* ids zeros, other integers
    (token ids) uniform below the size of the embedding table they index.
    Example:
      gblrc lower m.gblr.pt -o m.onnx --quantize int8 --with-dense dense.onnx
      gblrc bench m.onnx --against dense.onnx --shape input_ids=8x128 --shape attention_mask=8x128
    """
    from gblrc.export.bench import bench
    from gblrc.cli.lower import parse_input_shapes
    from gblrc.io.fileio import atomic_path, check_output_path

    if json_out is not None:
        check_output_path(json_out)
    parsed = parse_input_shapes(shapes, option="--shape")
    with api_errors():
        res = bench(
            [model] + ([against] if against else []),
            parsed,
            provider=provider,
            threads=threads or None,
            repeats=repeats,
            sessions=sessions,
            warmup=warmup,
            cuda_graph=cuda_graph,
        )
    for line in res.lines():
        click.echo(line)
    if json_out is not None:
        with atomic_path(json_out) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(res.as_dict(), f, indent=1)
        click.echo(f"wrote {json_out}")
