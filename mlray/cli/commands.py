"""The ``mlray`` command: thin Typer commands over library functions that return values.

Every failure a user can cause ends in one ``error: ...`` line on stderr and exit code 1; exit code 2 is
kept for usage errors (a missing or unknown option), as Click decides them. ``--json`` prints a command's
result as JSON on stdout; progress goes to stderr (a live display on a terminal only).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mlray.cli import console
from mlray.cli.compress import compress
from mlray.cli.monitor import monitor
from mlray.cli.options import AddressOpt, AppOpt, ConfigOpt, JsonOpt, RayAddressOpt
from mlray.cli.pipeline import lineage, pipeline
from mlray.errors import ConfigError, MlrayError

app = typer.Typer(no_args_is_help=True, help="Train on Ray, track in MLflow, serve on Ray Serve.",
                  pretty_exceptions_enable=False)

def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        typer.echo(f"mlray {metadata.version('mlray')}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print mlray's version and exit")] = False) -> None:
    """Train on Ray, track in MLflow, serve on Ray Serve."""


def _setup_logging(verbose: bool) -> None:
    """Quiet by default: the commands print their own progress; --verbose shows mlray's, MLflow's and
    Serve's INFO logs as well."""
    level = logging.INFO if verbose else logging.WARNING
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))  # MLflow sets its own on import
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlray", "mlflow", "ray.serve", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(level)


def _job_config(config: Path | None, overrides: dict[str, Any]):  # type: ignore[no-untyped-def]
    from mlray.config import load_config

    return load_config(config, overrides=overrides)


def _model(text: str):  # type: ignore[no-untyped-def]
    from mlray.registry import parse_model_ref

    return parse_model_ref(text)


def _version_of(ref, version: int | None, verb: str) -> int:  # type: ignore[no-untyped-def]
    """``--version`` if given, else the version a ``models:/NAME/N`` argument names."""
    version = version if version is not None else ref.version
    if version is None:
        raise ConfigError(f"say which version to {verb}: --version N or models:/{ref.name}/N")
    return version


@app.command()
def train(
    config: ConfigOpt = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    workers: Annotated[int | None, typer.Option(help="override train.num_workers")] = None,
    name: Annotated[str | None, typer.Option(help="override the registered model name")] = None,
    run_name: Annotated[
        str | None, typer.Option(help="train.run_name: re-run with it to continue a killed run")
    ] = None,
    address: RayAddressOpt = None,
    verbose: bool = False,
    as_json: JsonOpt = False,
) -> None:
    """Train data-parallel on Ray, record the run in MLflow, register a new model version."""
    from mlray import cluster
    from mlray.training.train import train as run_training

    _setup_logging(verbose)
    cfg = _job_config(config, {"train.epochs": epochs, "train.num_workers": workers, "name": name,
                               "train.run_name": run_name})
    cluster.connect(address, log_to_driver=verbose)  # worker logs stay in the dashboard unless --verbose
    with console.progress(f"training {cfg.name}", total=cfg.train.epochs) as step:
        result = run_training(cfg, address=address, progress=step)
    out = {"run_id": result.run_id, "model": result.model_name, "version": result.version,
           "metrics": result.metrics}
    if as_json:
        console.print_json(out)
    else:
        metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()) if isinstance(v, float))
        typer.echo(f"registered models:/{result.model_name}/{result.version} (run {result.run_id})  {metrics}")


@app.command()
def tune(
    config: ConfigOpt = None,
    sweep_name: Annotated[str | None, typer.Option(help="tune.sweep_name: run again with it to resume")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    num_samples: Annotated[int | None, typer.Option(help="override tune.num_samples")] = None,
    address: RayAddressOpt = None,
    verbose: bool = False,
    as_json: JsonOpt = False,
) -> None:
    """Sweep hyperparameters on Ray Tune (each trial a distributed training); register the best model."""
    from mlray import cluster
    from mlray.training.tune import sweep

    _setup_logging(verbose)
    cfg = _job_config(config, {"tune.sweep_name": sweep_name, "train.epochs": epochs,
                               "tune.num_samples": num_samples})
    cluster.connect(address, log_to_driver=verbose)
    with console.progress(f"sweeping {cfg.name}"):
        result = sweep(cfg, address=address)
    out = {"sweep": result.sweep_name, "parent_run_id": result.parent_run_id, "best_run_id": result.best_run_id,
           "best_config": result.best_config, "best_metric": result.best_metric, "version": result.version,
           "trials": result.trials}
    if as_json:
        console.print_json(out)
    else:
        typer.echo(f"sweep {result.sweep_name}: {result.trials} trials; best run {result.best_run_id} "
                   f"({result.best_metric:.4f}, {result.best_config}) registered as version {result.version}")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="NAME, models:/NAME/VERSION or models:/NAME@ALIAS (the alias to move)")],
    version: Annotated[int | None, typer.Option(help="the candidate version")] = None,
    alias: Annotated[str | None, typer.Option(help="the alias to move (default champion)")] = None,
    force: Annotated[bool, typer.Option(help="move the alias even if the gate refuses (recorded)")] = False,
    reason: str = "",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move an alias to a version through the promotion gate (metric, direction, min improvement)."""
    from mlray.registry import promote as do_promote

    _setup_logging(False)
    ref = _model(name)
    version = _version_of(ref, version, "promote")
    alias = alias or ref.alias or "champion"
    gate = _job_config(config, {}).registry.gate
    result = do_promote(ref.name, version=version, alias=alias, gate=gate, force=force, reason=reason)
    if as_json:
        console.print_json(vars(result))
    else:
        typer.echo(f"{ref.name}@{alias} -> version {result.version} (was {result.previous_version}): {result.reason}")


@app.command()
def models(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List registered models with their versions, aliases and the promotion gate's metric."""
    from mlray.registry import list_models

    _setup_logging(False)
    metric = _job_config(config, {}).registry.gate.metric
    listed = list_models()
    if as_json:
        console.print_json({"gate_metric": metric, "models": listed})
        return
    for model in listed:
        aliases = ", ".join(f"@{a}={v}" for a, v in sorted(model["aliases"].items())) or "no aliases"
        typer.echo(f"{model['name']}  ({aliases})")
        for v in model["versions"]:
            value = v["metrics"].get(metric)
            shown = f"{metric}={value:.4f}" if value is not None else f"{metric}=-"
            tags = " ".join("@" + a for a in v["aliases"])
            typer.echo(f"  v{v['version']:<4} {tags:<12} run {v['run_id'][:12]}  {shown}")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve YAML (serve_apps/*.yaml)")] = None,
    model: Annotated[str | None, typer.Option(help="override args.model (NAME or models:/NAME@ALIAS)")] = None,
    alias: Annotated[str | None, typer.Option(help="override args.alias")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default from the YAML, 8000)")] = None,
    num_cpus: int = 4,
    as_json: JsonOpt = False,
) -> None:
    """Deploy the Serve app on the local cluster (started if needed); it keeps serving until `mlray down`."""
    from mlray import cluster
    from mlray.serving.deploy import deploy, load_plan

    _setup_logging(False)
    overrides: dict[str, Any] = {"alias": alias}
    if model is not None:
        ref = _model(model)
        if ref.version is not None:
            raise ConfigError(f"--model {model!r}: serve follows an alias; use models:/{ref.name}@ALIAS")
        overrides.update(model=ref.name, alias=alias or ref.alias)
    plan = load_plan(config, overrides=overrides, port=port)
    with console.progress(f"deploying models:/{plan.args['model']}@{plan.args.get('alias')}") as step:
        step("starting the local Ray head")
        head = cluster.start_head(num_cpus=num_cpus)
        cluster.connect(head.address)
        step(f"waiting for the app at {plan.url}")
        url = deploy(plan)
    if as_json:
        console.print_json({"model": plan.args["model"], "alias": plan.args.get("alias"), "url": url})
    else:
        typer.echo(f"serving models:/{plan.args['model']}@{plan.args.get('alias')} at {url}")


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="NAME or models:/NAME@ALIAS (the app serving NAME answers)")],
    instances: Annotated[str, typer.Option(help="JSON list of rows, or @file.json")],
    url: str = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="MLRAY_API_KEY", show_envvar=True,
                                                help="sent as 'Authorization: Bearer KEY'")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send rows to a served model and print its answer (JSON either way)."""
    from mlray.client import predict as do_predict

    name = _model(model).name
    text = Path(instances[1:]).read_text() if instances.startswith("@") else instances
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"file {instances[1:]!r}" if instances.startswith("@") else "--instances"
        raise ConfigError(f"{where} is not JSON ({err}); give a list of rows such as [[0, 1.5, ...]]") from None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    answer = do_predict(url, name, rows.get("instances", rows) if isinstance(rows, dict) else rows, headers=headers)
    typer.echo(json.dumps(answer, indent=2 if as_json else None))


def _connect(address: str | None) -> None:
    """The cluster the app runs on: ``--address``, ``$RAY_ADDRESS`` or the local head mlray started."""
    from mlray import cluster, settings

    record = settings.home() / "cluster.json"
    if address is None and "RAY_ADDRESS" not in os.environ and record.exists():
        address = json.loads(record.read_text())["address"]
    try:
        cluster.connect(address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    except ConnectionError as err:
        raise MlrayError(f"no running Ray cluster found ({err}); pass --address or set RAY_ADDRESS") from None


@app.command()
def rollout(name: Annotated[str, typer.Argument(help="NAME or models:/NAME@ALIAS")], app_name: AppOpt = None,
            address: AddressOpt = None, timeout: float = 120.0, as_json: JsonOpt = False) -> None:
    """Make a running app follow the registry now: load, warm up, switch to what the aliases name (NAME's only)."""
    from mlray.serving.deploy import rollout as do_rollout

    _setup_logging(False)
    ref = _model(name)
    _connect(address)
    with console.progress(f"rolling out {ref.name}"):
        status = do_rollout(app_name or ref.name, timeout_s=timeout, model=ref.name)
    console.print_json(status) if as_json else console.print_status(status)
    if status["failures"] or not status["on_target"]:
        raise typer.Exit(code=1)


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="NAME or models:/NAME@ALIAS (the alias to move back)")],
             alias: Annotated[str | None, typer.Option(help="the alias (default champion)")] = None,
             app_name: AppOpt = None, address: AddressOpt = None,
             no_rollout: Annotated[bool, typer.Option(help="only move the alias")] = False,
             as_json: JsonOpt = False) -> None:
    """Move the alias back to its previous version, then make the running app follow at once."""
    from mlray.registry import rollback as do_rollback
    from mlray.serving.deploy import rollout as do_rollout

    _setup_logging(False)
    ref = _model(name)
    alias = alias or ref.alias or "champion"
    result = do_rollback(ref.name, alias=alias)
    out: dict[str, Any] = {"rollback": vars(result)}
    if not as_json:
        typer.echo(f"{ref.name}@{alias} -> version {result.version} (was {result.previous_version})")
    if not no_rollout:
        _connect(address)
        with console.progress(f"rolling out {ref.name}"):
            out["status"] = do_rollout(app_name or ref.name, model=ref.name)
        if not as_json:
            console.print_status(out["status"])
    if as_json:
        console.print_json(out)


@app.command()
def status(name: Annotated[str, typer.Argument(help="NAME or models:/NAME@ALIAS")], app_name: AppOpt = None,
           address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """What a running app serves (per model): registry targets, each replica's versions, failures, shadow summary."""
    from mlray.serving.deploy import app_status

    _setup_logging(False)
    ref = _model(name)
    _connect(address)
    result = app_status(app_name or ref.name)
    console.print_json(result) if as_json else console.print_status(result)


keys = typer.Typer(help="API keys for the Serve app (stored as sha256 hashes).")
app.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(file: Annotated[Path, typer.Option(help="the secret file the app reads (auth.keys_file)")],
                as_json: JsonOpt = False) -> None:
    """Create an API key: its hash is appended to FILE (mode 600); the key is printed once, here."""
    from mlray.serving.auth import add_key_to_file

    key = add_key_to_file(file)
    console.print_json({"key": key, "file": str(file)}) if as_json else typer.echo(key)


@app.command()
def schema(
    which: Annotated[str, typer.Argument(help="job (configs/*.yaml) or serve (a Serve app's args)")] = "job",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the schema to this file")] = None,
) -> None:
    """The JSON Schema of a config file, from the same models that validate it (for editors' completion)."""
    from mlray.schema import config_schema

    text = json.dumps(config_schema(which), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote the {which} config schema to {out}", err=True)


@app.command()
def quickstart(
    config: ConfigOpt = Path("configs/digits.yaml") if Path("configs/digits.yaml").exists() else None,
    port: Annotated[int | None, typer.Option(help="Serve HTTP port (default 8000)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train, register, promote and serve the digits classifier on a local cluster, then query it."""
    from mlray.cluster.quickstart import quickstart as run

    _setup_logging(False)
    cfg = _job_config(config, {"train.epochs": epochs})
    steps = (lambda m: typer.echo(f"==> {m}", err=True)) if as_json else (
        lambda m: typer.secho(f"==> {m}", fg=typer.colors.CYAN))
    result = run(cfg, port=port, progress=steps)
    if as_json:
        console.print_json({"run_id": result.train.run_id, "model": result.train.model_name,
                            "version": result.train.version, "test_accuracy": result.train.test_accuracy,
                            "url": result.url, "dashboard_url": result.dashboard_url,
                            "tracking_uri": result.tracking_uri, "ray_token_path": result.ray_token_path,
                            "seconds": result.seconds,
                            "samples": [{k: v for k, v in s.items() if k != "pixels"} for s in result.samples]})
    else:
        typer.echo(console.quickstart_report(result))


@app.command()
def down(as_json: JsonOpt = False) -> None:
    """Stop what the quickstart / `mlray serve` started: the Serve apps and the local Ray head."""
    from mlray.cluster import monitoring
    from mlray.cluster.quickstart import down as do_down

    _setup_logging(False)
    prometheus = monitoring.down()
    stopped = do_down()
    if as_json:
        console.print_json({"stopped": stopped, "prometheus_stopped": prometheus})
    else:
        if prometheus:
            typer.echo("stopped Prometheus")
        typer.echo("stopped the local Ray cluster" if stopped else "no local cluster started by mlray is running")


def run(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code (what :func:`main` exits with)."""
    try:
        code = app(args=argv, prog_name="mlray", standalone_mode=False)
        return int(code) if isinstance(code, int) else 0
    except typer.Exit as done:
        return int(done.exit_code)
    except typer.Abort:
        return console.FAILURE_EXIT
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if hasattr(err, "show") and hasattr(err, "exit_code"):  # Click's usage errors (Typer vendors Click)
            err.show()
            return int(err.exit_code)
        message = console.one_line(err)
        if message is None:
            raise  # a bug: keep the traceback
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        return console.FAILURE_EXIT


app.add_typer(monitor, name="monitor")
app.add_typer(pipeline, name="pipeline")
app.command("lineage")(lineage)
app.command()(compress)


def main() -> None:
    sys.exit(run())

