"""The `gblrc` command line."""

from __future__ import annotations

import click

from gblrc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gblrc")
def main():
    """gblrc: compress a model's linear layers into learned Generalized Block Low-Rank
    (Gaudi-GBLR) matrices and compile them into ONNX graphs that run faster than dense.

    \b
    Typical use:
      gblrc compress model.pt --budget 0.4 --data inputs.pt   # learn the structure
      gblrc lower model.gblr.pt -o model.onnx                 # compile to standard ONNX
      gblrc inspect model.onnx                                # layers, blocks, costs
      gblrc bench model.onnx --against dense.onnx --shape x=8x384   # time it here
    """


from gblrc.cli.example import example  # noqa: E402

main.add_command(example)

from gblrc.cli.compress import compress  # noqa: E402

main.add_command(compress)

from gblrc.cli.lower import inspect_cmd, lower, opt, passes_cmd  # noqa: E402

for _cmd in (lower, opt, passes_cmd, inspect_cmd):
    main.add_command(_cmd)

from gblrc.cli.bench import bench_cmd  # noqa: E402

main.add_command(bench_cmd)
