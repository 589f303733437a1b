"""``mlray compress NAME --version N --method METHOD``: a gated, registered variant (see :mod:`mlray.compress`)."""

from __future__ import annotations

from typing import Annotated

import typer

from mlray.cli import console
from mlray.cli.options import JsonOpt


def compress(
    name: Annotated[str, typer.Argument(help="registered model NAME, or models:/NAME/VERSION")],
    method: Annotated[str, typer.Option(
        help="dynamic-int8 | static-int8 | fp16 | bf16 | prune | onnx")],
    version: Annotated[int | None, typer.Option(help="the parent version")] = None,
    tolerance: Annotated[float, typer.Option(help="metric points the variant may lose")] = 1.0,
    sparsity: Annotated[float, typer.Option(help="prune: the fraction of weights set to zero")] = 0.5,
    as_json: JsonOpt = False,
) -> None:
    """Make a compressed variant of a version, measure it against its parent, register it within tolerance."""
    from mlray.cli.commands import _model, _setup_logging, _version_of
    from mlray.compress import compress as do_compress

    _setup_logging(False)
    ref = _model(name)
    version = _version_of(ref, version, "compress")
    result = do_compress(ref.name, version=version, method=method, tolerance=tolerance, sparsity=sparsity)
    if as_json:
        console.print_json({"model": ref.name, "method": result.method, "parent_version": result.parent_version,
                            "version": result.version, "run_id": result.run_id, "figures": result.figures})
        return
    figures = result.figures
    metric = "test_accuracy" if "test_accuracy" in figures else "test_rmse"
    typer.echo(f"{ref.name} version {result.version}: {result.method} of version {result.parent_version}, "
               f"{metric} {figures[metric]:.4f} (parent {figures['parent_' + metric]:.4f}), "
               f"{figures['size_ratio']:.2f}x smaller, {figures['speedup_b1']:.2f}x / "
               f"{figures['speedup_b64']:.2f}x latency at batch 1 / 64")
