"""`gblrc example`: fit GBLR layers to a real pretrained weight and compare with truncated SVD."""

from __future__ import annotations

import time

import click


@click.command()
@click.option(
    "--budget",
    type=float,
    default=0.4,
    show_default=True,
    help="Cost budget as a fraction of the dense multiply-adds, in (0, 1].",
)
@click.option(
    "--layer",
    default="encoder.layer.0.intermediate.dense",
    show_default=True,
    help="Name of the MiniLM Linear layer to fit.",
)
def example(budget: float, layer: str):
    """Built-in example: fit a GBLR layer to a pretrained MiniLM weight under a budget
    and print its cost and relative error next to truncated SVD at the same cost."""

    from gblrc.errors import GblrcError
    from gblrc.cli._errors import api_errors
    from gblrc.nn.fit import check_budget, relative_error
    from gblrc.nn.layer import fit_dense, svd_layer
    from gblrc.io.zoo import minilm_linears

    with api_errors():  # the API's check of the budget, before the weights are read
        check_budget(budget)
    layers = dict(minilm_linears())
    if layer not in layers:
        raise GblrcError(f"no layer named {layer!r}; choose one of: {', '.join(list(layers)[:6])}, ...")
    lin = layers[layer]
    W = lin.weight.detach().double().numpy()
    t = time.perf_counter()
    g = fit_dense(lin, budget)
    dt = time.perf_counter() - t
    s = svd_layer(lin, budget).eval()
    ir = g.structure()
    click.echo(f"MiniLM {layer}: weight {tuple(W.shape)} (out x in), budget {budget}")
    click.echo(f"{'method':<14}{'cost ratio':>12}{'blocks':>8}{'rel. error':>12}")
    click.echo(
        f"{'truncated SVD':<14}{s.flops() / s.dense_flops():>12.4f}{len(s.structure().structure.blocks):>8}"
        f"{relative_error(W, s.structure().dense()):>12.4f}"
    )
    click.echo(
        f"{'GBLR':<14}{ir.structure.cost_ratio():>12.4f}{len(ir.structure.blocks):>8}"
        f"{relative_error(W, ir.dense()):>12.4f}"
    )
    click.echo(f"fit time {dt:.1f} s")
