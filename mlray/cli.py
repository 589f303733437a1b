"""The ``mlray`` command: thin Typer commands over library functions that return values."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mlray.errors import MlrayError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train on Ray, track in MLflow, serve on Ray Serve.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML job config (configs/*.yaml)")]


def _setup_logging(verbose: bool) -> None:
    """Quiet by default: the commands print their own progress; --verbose shows mlray's, MLflow's and
    Serve's INFO logs as well."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("mlray", "mlflow", "ray.serve", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(level)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _job_config(config: Path | None, overrides: dict[str, Any]):  # type: ignore[no-untyped-def]
    from mlray.config import load_config

    return load_config(config, overrides=overrides)


@app.command()
def train(
    config: ConfigOpt = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    workers: Annotated[int | None, typer.Option(help="override train.num_workers")] = None,
    name: Annotated[str | None, typer.Option(help="override the registered model name")] = None,
    run_name: Annotated[
        str | None, typer.Option(help="train.run_name: re-run with it to continue a killed run")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray address; default: a running cluster or a new local one")
    ] = None,
    verbose: bool = False,
) -> None:
    """Train data-parallel on Ray, record the run in MLflow, register a new model version."""
    from mlray.train import train as run_training

    _setup_logging(verbose)
    try:
        cfg = _job_config(config, {"train.epochs": epochs, "train.num_workers": workers, "name": name,
                                   "train.run_name": run_name})
        from mlray import cluster

        cluster.connect(address, log_to_driver=verbose)  # worker logs stay in the dashboard unless --verbose
        result = run_training(cfg, address=address, progress=typer.echo)
    except MlrayError as err:
        _fail(err)
    typer.echo(json.dumps({"run_id": result.run_id, "model": result.model_name, "version": result.version,
                           "metrics": result.metrics}, indent=2))


@app.command()
def tune(
    config: ConfigOpt = None,
    sweep_name: Annotated[str | None, typer.Option(help="tune.sweep_name: run again with it to resume")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    num_samples: Annotated[int | None, typer.Option(help="override tune.num_samples")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address")] = None,
    verbose: bool = False,
) -> None:
    """Sweep hyperparameters on Ray Tune (each trial a distributed training); register the best model."""
    from mlray import cluster
    from mlray.tune import sweep

    _setup_logging(verbose)
    try:
        cfg = _job_config(config, {"tune.sweep_name": sweep_name, "train.epochs": epochs,
                                   "tune.num_samples": num_samples})
        cluster.connect(address, log_to_driver=verbose)
        result = sweep(cfg, address=address)
    except MlrayError as err:
        _fail(err)
    typer.echo(json.dumps({"sweep": result.sweep_name, "parent_run_id": result.parent_run_id,
                           "best_run_id": result.best_run_id, "best_config": result.best_config,
                           "best_metric": result.best_metric, "version": result.version,
                           "trials": result.trials}, indent=2))


@app.command()
def promote(
    name: str,
    version: Annotated[int, typer.Option(help="the candidate version")],
    alias: str = "champion",
    force: Annotated[bool, typer.Option(help="move the alias even if the gate refuses (recorded)")] = False,
    reason: str = "",
    config: ConfigOpt = None,
) -> None:
    """Move an alias to a version through the promotion gate (metric, direction, min improvement)."""
    from mlray.registry import promote as do_promote

    _setup_logging(False)
    try:
        gate = _job_config(config, {}).registry.gate
        result = do_promote(name, version=version, alias=alias, gate=gate, force=force, reason=reason)
    except MlrayError as err:
        _fail(err)
    typer.echo(f"{name}@{alias} -> version {result.version} (was {result.previous_version}): {result.reason}")


@app.command()
def models() -> None:
    """List registered models with their versions, aliases and metrics."""
    from mlray.registry import list_models

    for model in list_models():
        aliases = ", ".join(f"@{a}={v}" for a, v in sorted(model["aliases"].items())) or "no aliases"
        typer.echo(f"{model['name']}  ({aliases})")
        for v in model["versions"]:
            acc = v["metrics"].get("test_accuracy")
            shown = f"test_accuracy={acc:.4f}" if acc is not None else ""
            tags = " ".join("@" + a for a in v["aliases"])
            typer.echo(f"  v{v['version']:<4} {tags:<12} run {v['run_id'][:12]}  {shown}")


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve YAML (serve_apps/*.yaml)")] = None,
    model: Annotated[str | None, typer.Option(help="override args.model")] = None,
    alias: Annotated[str | None, typer.Option(help="override args.alias")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default from the YAML, 8000)")] = None,
    num_cpus: int = 4,
) -> None:
    """Deploy the Serve app on the local cluster (started if needed); it keeps serving until `mlray down`."""
    from mlray import cluster
    from mlray.serving.deploy import deploy, load_plan

    _setup_logging(False)
    try:
        plan = load_plan(config, overrides={"model": model, "alias": alias}, port=port)
        head = cluster.start_head(num_cpus=num_cpus)
        cluster.connect(head.address)
        url = deploy(plan)
    except MlrayError as err:
        _fail(err)
    typer.echo(f"serving models:/{plan.args['model']}@{plan.args.get('alias')} at {url}")


@app.command()
def predict(
    model: str,
    instances: Annotated[str, typer.Option(help="JSON list of rows, or @file.json")],
    url: str = "http://127.0.0.1:8000",
) -> None:
    """Send rows to a served model and print its answer."""
    from mlray.client import predict as do_predict

    text = Path(instances[1:]).read_text() if instances.startswith("@") else instances
    try:
        rows = json.loads(text)
        typer.echo(json.dumps(do_predict(url, model, rows.get("instances", rows) if isinstance(rows, dict) else rows)))
    except (MlrayError, json.JSONDecodeError) as err:
        _fail(err)


def _connect(address: str | None) -> None:
    """The cluster the app runs on: ``--address``, ``$RAY_ADDRESS`` or the local head mlray started."""
    import os

    from mlray import cluster, settings

    record = settings.home() / "cluster.json"
    if address is None and "RAY_ADDRESS" not in os.environ and record.exists():
        address = json.loads(record.read_text())["address"]
    try:
        cluster.connect(address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    except ConnectionError as err:
        raise MlrayError(f"no running Ray cluster found ({err}); pass --address or set RAY_ADDRESS") from None


def _print_status(status: dict[str, Any]) -> None:
    targets = ", ".join(f"{role}=v{v}" for role, v in status["targets"].items() if v is not None)
    typer.echo(f"{status['model']}: registry says {targets}; on target: {status['on_target']}")
    for replica, r in sorted(status["replicas"].items()):
        versions = ", ".join(f"{role}=v{v}" for role, v in r["versions"].items())
        typer.echo(f"  replica {replica[:12]}  {versions}  (seen {r['seen_s_ago']} s ago)")
        for key, error in r["failures"].items():
            typer.secho(f"    FAILED {key}: {error}", fg=typer.colors.RED)
    shadow = status["shadow"]
    if shadow["compared"]:
        typer.echo(f"  shadow: {shadow['agreed']}/{shadow['compared']} answers agreed with the champion")


AppOpt = Annotated[str | None, typer.Option("--app", help="Serve application name (default: the model name)")]
AddressOpt = Annotated[str | None, typer.Option(help="Ray address (default: the local head mlray started)")]


@app.command()
def rollout(name: str, app_name: AppOpt = None, address: AddressOpt = None, timeout: float = 120.0) -> None:
    """Make a running app follow the registry now: load, warm up and switch to what its aliases name."""
    from mlray.serving.deploy import rollout as do_rollout

    _setup_logging(False)
    try:
        _connect(address)
        status = do_rollout(app_name or name, timeout_s=timeout)
    except MlrayError as err:
        _fail(err)
    _print_status(status)
    if status["failures"] or not status["on_target"]:
        raise typer.Exit(code=1)


@app.command()
def rollback(name: str, alias: str = "champion", app_name: AppOpt = None, address: AddressOpt = None,
             no_rollout: Annotated[bool, typer.Option(help="only move the alias")] = False) -> None:
    """Move the alias back to its previous version, then make the running app follow at once."""
    from mlray.registry import rollback as do_rollback
    from mlray.serving.deploy import rollout as do_rollout

    _setup_logging(False)
    try:
        result = do_rollback(name, alias=alias)
        typer.echo(f"{name}@{alias} -> version {result.version} (was {result.previous_version})")
        if not no_rollout:
            _connect(address)
            _print_status(do_rollout(app_name or name))
    except MlrayError as err:
        _fail(err)


@app.command()
def status(name: str, app_name: AppOpt = None, address: AddressOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="print the raw status")] = False) -> None:
    """What a running app serves: registry targets, each replica's versions, load failures, shadow summary."""
    from mlray.serving.deploy import app_status

    _setup_logging(False)
    try:
        _connect(address)
        result = app_status(app_name or name)
    except MlrayError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_status(result)


keys = typer.Typer(help="API keys for the Serve app (stored as sha256 hashes).")
app.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(file: Annotated[Path, typer.Option(help="the secret file the app reads (auth.keys_file)")]) -> None:
    """Create an API key: its hash is appended to FILE (mode 600); the key is printed once, here."""
    from mlray.serving.auth import add_key_to_file

    typer.echo(add_key_to_file(file))


monitor = typer.Typer(help="Prometheus for the local cluster: Ray's scrape targets and mlray's alert rules.")
app.add_typer(monitor, name="monitor")


@monitor.command("up")
def monitor_up(
    port: Annotated[int, typer.Option(help="Prometheus port on 127.0.0.1 (the Ray dashboard reads 9090)")] = 9090,
    min_replicas: Annotated[int, typer.Option(help="alert when fewer healthy replicas serve a deployment")] = 1,
    error_ratio: Annotated[float, typer.Option(help="alert above this share of 5xx answers")] = 0.05,
    p99: Annotated[float, typer.Option("--p99-seconds", help="alert above this p99 latency")] = 0.25,
    address: AddressOpt = None,
) -> None:
    """Start Prometheus scraping the Ray cluster's metrics, with mlray's alert rules."""
    from mlray import monitoring

    _setup_logging(False)
    try:
        thresholds = monitoring.AlertThresholds(error_ratio=error_ratio, p99_seconds=p99, min_replicas=min_replicas)
        nodes = None
        if monitoring.ray_discovery_file(monitoring.session_dir()) is None:  # no dashboard: ask Ray for the nodes
            import ray

            _connect(address)
            nodes = ray.nodes()
        running = monitoring.up(port=port, thresholds=thresholds, nodes=nodes)
    except MlrayError as err:
        _fail(err)
    typer.echo(f"""Prometheus:      {running.url}  (targets: {running.discovery})
Alert rules:     {running.folder / 'mlray-alerts.yml'}  (firing: {running.url}/alerts)
Ray dashboard:   its Metrics tab reads Prometheus at http://localhost:9090 (RAY_PROMETHEUS_HOST for another)
Grafana:         import {monitoring.GRAFANA_DASHBOARD} with this Prometheus as its data source
Stop it:         mlray monitor down""")


@monitor.command("down")
def monitor_down() -> None:
    """Stop the Prometheus that `mlray monitor up` started."""
    from mlray import monitoring

    typer.echo("stopped Prometheus" if monitoring.down() else "no Prometheus started by mlray is running")


@app.command()
def quickstart(
    config: ConfigOpt = Path("configs/digits.yaml") if Path("configs/digits.yaml").exists() else None,
    port: Annotated[int | None, typer.Option(help="Serve HTTP port (default 8000)")] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
) -> None:
    """Train, register, promote and serve the digits classifier on a local cluster, then query it."""
    from mlray.quickstart import quickstart as run

    _setup_logging(False)
    try:
        cfg = _job_config(config, {"train.epochs": epochs})
        result = run(cfg, port=port, progress=lambda m: typer.secho(f"==> {m}", fg=typer.colors.CYAN))
    except MlrayError as err:
        _fail(err)
    model = result.train.model_name
    typer.echo("\nPredictions for real test images:")
    for sample in result.samples:
        typer.echo(f"  true {sample['true']}  predicted {sample['predicted']}  (p={sample['confidence']:.3f})")
    store = result.tracking_uri
    pixels = ", ".join(str(int(v)) for v in result.samples[0]["pixels"])
    typer.echo(f"""
Test accuracy:   {result.train.test_accuracy:.4f}  (run {result.train.run_id}, version {result.train.version})
Done in:         {result.seconds:.0f} s
Ray dashboard:   {result.dashboard_url}
MLflow UI:       mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000
Endpoint:        {result.url}/v1/models/{model}:predict
Try it (a {result.samples[0]["true"]}): curl -s -X POST {result.url}/v1/models/{model}:predict \\
                   -H 'Content-Type: application/json' -d '{{"instances": [[{pixels}]]}}'
Stop everything: mlray down""")


@app.command()
def down() -> None:
    """Stop what the quickstart / `mlray serve` started: the Serve apps and the local Ray head."""
    from mlray import monitoring
    from mlray.quickstart import down as do_down

    _setup_logging(False)
    if monitoring.down():
        typer.echo("stopped Prometheus")
    typer.echo("stopped the local Ray cluster" if do_down() else "no local cluster started by mlray is running")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
