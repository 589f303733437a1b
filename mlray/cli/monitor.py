"""``mlray monitor up|down``: Prometheus for the local cluster (see :mod:`mlray.cluster.monitoring`)."""

from __future__ import annotations

from typing import Annotated

import typer

from mlray.cli import console
from mlray.cli.options import AddressOpt, JsonOpt

monitor = typer.Typer(help="Prometheus for the local cluster: Ray's scrape targets and mlray's alert rules.")


@monitor.command("up")
def monitor_up(
    port: Annotated[int, typer.Option(help="Prometheus port on 127.0.0.1 (the Ray dashboard reads 9090)")] = 9090,
    min_replicas: Annotated[int, typer.Option(help="alert when fewer healthy replicas serve a deployment")] = 1,
    error_ratio: Annotated[float, typer.Option(help="alert above this share of 5xx answers")] = 0.05,
    p99: Annotated[float, typer.Option("--p99-seconds", help="alert above this p99 latency")] = 0.25,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start Prometheus scraping the Ray cluster's metrics, with mlray's alert rules."""
    from mlray.cli.commands import _connect, _setup_logging
    from mlray.cluster import monitoring

    _setup_logging(False)
    thresholds = monitoring.AlertThresholds(error_ratio=error_ratio, p99_seconds=p99, min_replicas=min_replicas)
    nodes = None
    if monitoring.ray_discovery_file(monitoring.session_dir()) is None:  # no dashboard: ask Ray for the nodes
        import ray

        _connect(address)
        nodes = ray.nodes()
    running = monitoring.up(port=port, thresholds=thresholds, nodes=nodes)
    rules = running.folder / "mlray-alerts.yml"
    if as_json:
        console.print_json({"url": running.url, "pid": running.pid, "targets": str(running.discovery),
                            "rules": str(rules)})
        return
    typer.echo(f"""Prometheus:      {running.url}  (targets: {running.discovery})
Alert rules:     {rules}  (firing: {running.url}/alerts)
Ray dashboard:   its Metrics tab reads Prometheus at http://localhost:9090 (RAY_PROMETHEUS_HOST for another)
Grafana:         import {monitoring.GRAFANA_DASHBOARD} with this Prometheus as its data source
Stop it:         mlray monitor down""")


@monitor.command("down")
def monitor_down(as_json: JsonOpt = False) -> None:
    """Stop the Prometheus that `mlray monitor up` started."""
    from mlray.cluster import monitoring

    stopped = monitoring.down()
    if as_json:
        console.print_json({"stopped": stopped})
    else:
        typer.echo("stopped Prometheus" if stopped else "no Prometheus started by mlray is running")
