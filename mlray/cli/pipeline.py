"""``mlray pipeline run`` and ``mlray lineage`` (see :mod:`mlray.pipeline`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlray.cli import console
from mlray.cli.options import AddressOpt, JsonOpt

pipeline = typer.Typer(help="The gated pipeline: train, gate, canary, promote or roll back.")


@pipeline.command("run")
def pipeline_run(
    config: Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML (configs/pipeline.yaml)")],
    pipeline_id: Annotated[str | None, typer.Option(
        "--id", help="the pipeline's id; the same id again resumes it from its last finished step")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and change nothing")] = False,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="override a pipeline field, KEY=VALUE (dotted; the value read as YAML), e.g. canary.hold_s=10",
    )] = None,
    address: AddressOpt = None,
    verbose: bool = False,
    as_json: JsonOpt = False,
) -> None:
    """Train, evaluate, gate, register, (compress), deploy as challenger, watch the canary, promote or roll back."""
    from mlray.cli.commands import _connect, _setup_logging
    from mlray.pipeline import load_pipeline, plan, run
    from mlray.pipeline.config import parse_sets
    from mlray.pipeline.runner import new_id

    _setup_logging(verbose)
    cfg = load_pipeline(config, overrides=parse_sets(sets))
    pipeline_id = pipeline_id or new_id()
    if dry_run:
        steps = plan(cfg, pipeline_id=pipeline_id)
        if as_json:
            console.print_json({"pipeline_id": pipeline_id, "plan": [{"step": s, "does": d} for s, d in steps]})
        else:
            typer.echo(f"pipeline {pipeline_id} (dry run: nothing changes)")
            for number, (step, does) in enumerate(steps, 1):
                typer.echo(f"  {number}. {step:<9} {does}")
        return
    _connect(address)
    result = run(cfg, pipeline_id=pipeline_id, address=address, progress=lambda line: typer.echo(line, err=True))
    if as_json:
        console.print_json(result.to_dict())
    else:
        seconds = "  ".join(f"{name} {s.seconds:.1f}s" for name, s in result.steps.items() if s.seconds)
        typer.echo(f"pipeline {result.pipeline_id}: {result.outcome}: {result.reason}  (run {result.run_id})")
        typer.echo(f"  {seconds}")
    if result.outcome != "champion":
        raise typer.Exit(code=1)


def lineage(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME@ALIAS or NAME")],
    as_json: JsonOpt = False,
) -> None:
    """Where a model version came from: training run, data fingerprint, git commit, pipeline run."""
    from mlray.cli.commands import _model, _setup_logging
    from mlray.pipeline.lineage import lineage as chain_of
    from mlray.pipeline.lineage import render

    _setup_logging(False)
    text = model if model.startswith("models:/") or "@" not in model else f"models:/{model}"
    ref = _model(text)
    chain = chain_of(ref.name, alias=ref.alias if ref.alias or ref.version is not None else "champion",
                     version=ref.version)
    console.print_json(chain) if as_json else typer.echo(render(chain))
